"""Clients at streamrec's edges: web backends send events and catalogue upserts with ``EventProducer``;
services (and ``streamrec recs tail``) read recommendations with ``RecommendationConsumer``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from streamrec.pseudonym import pseudonym
from streamrec.records import EVENT_SCHEMAS, CatalogItem, Event, EventKind, Recommendation
from streamrec.serde import Codec, DecodeError, EncodeError, RecordSchema
from streamrec.settings import Settings
from streamrec.streams.kafka_security import client_config
from streamrec.streams.reading import consume_arrived
from streamrec.streams.schema_store import RegistryCodec, make_codec, publish_schema
from streamrec.validation import (
    ValidationRules,
    currency_problem,
    id_problem,
    price_problem,
    quantity_problem,
    validate_deletion,
    validate_event,
    validate_item,
)

log = logging.getLogger(__name__)

CONTEXT_FIELDS = ("device", "page", "referrer", "locale")


class InvalidRecordError(EncodeError):
    """A record that would be rejected downstream; raised before anything leaves the process."""


@dataclass(frozen=True)
class DeliveryFailure:
    """A record the broker did not acknowledge, with its bytes: a caller may send it again (``send_raw``);
    the worker de-duplicates by event id, so a record that did arrive after all is applied once."""

    topic: str
    partition: int
    key: bytes | None
    error: str
    value: bytes | None = None


class TopicNotReadable(ValueError):
    """A topic to read that the cluster does not have (or does not let this client read)."""


class DeliveryError(RuntimeError):
    """Records the broker did not acknowledge (``failures``), or that were still queued at the deadline."""

    def __init__(self, failures: list[DeliveryFailure], undelivered: int = 0) -> None:
        self.failures = failures
        self.undelivered = undelivered
        # Without the keys: they are user ids, and this message ends up in logs (``failures`` has them).
        shown = "; ".join(f"{f.topic}[{f.partition}]: {f.error}" for f in failures[:5])
        more = f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""
        parts = [f"{len(failures)} record(s) not delivered: {shown}{more}"] if failures else []
        if undelivered:
            parts.append(f"{undelivered} record(s) not acknowledged by the broker in time")
        super().__init__("; ".join(parts))


# Delivery errors after which the client's librdkafka producer is replaced: the record timed out (the broker
# was away longer than STREAMREC_PRODUCER_DELIVERY_TIMEOUT_MS, or an idempotent producer loops on a broker
# that forgot its producer id), or the producer's id or epoch is refused (streams/event_stage.py replaces
# the worker's producers on the same errors).
# The broker refuses an idempotent producer's id or epoch, or fenced it: that producer never delivers again.
PRODUCER_REFUSED = frozenset(
    [
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
    ]
)
RENEW_AFTER = PRODUCER_REFUSED | {KafkaError._MSG_TIMED_OUT}


def _check(problem: str | None) -> None:
    if problem is not None:
        raise InvalidRecordError(problem)


def _key(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


class EventProducer:
    """Sends validated, Avro-encoded events and catalogue upserts; thread-safe.

    Idempotent (``acks=all``), compressed with ``STREAMREC_INTERNAL_COMPRESSION``, and partitioned with
    ``murmur2_random``: the Java client's default and faust's, so a user lands on the same partition
    whichever language the backend is written in. Sending is asynchronous: failures are collected by the
    delivery callback and raised by ``flush()`` (and ``close()``) as ``DeliveryError``; they are logged as
    they happen too.

    While the broker is away, records wait in the client, up to ``STREAMREC_PRODUCER_BUFFER_MESSAGES`` of
    them (a send beyond it waits up to ``schema_timeout_s`` for room, then raises ``BufferError``) and for up
    to ``STREAMREC_PRODUCER_DELIVERY_TIMEOUT_MS`` each; a record not delivered by then is a failure that
    ``flush()`` raises. After such a failure, or one after which librdkafka's idempotent producer can
    deliver no more (a broker that lost its producer ids: a restarted embedded broker), the client replaces
    its librdkafka producer before the next send: records still queued in the old one are reported as not
    delivered too, never dropped. Nothing is sent twice by the client itself; a caller that sends a
    reported record again may duplicate it, which the worker's de-duplication by event id absorbs.

    Without a schema registry, each writer schema is published to the schemas topic, and acknowledged,
    before the first record written with it, so a worker can always resolve what it receives.

    With ``STREAMREC_PSEUDONYM_KEY`` set (or ``pseudonymise=True``), every user id given to ``click``,
    ``search``, ``purchase``, ``send_event`` and ``delete_user`` is checked as a raw id, then sent as its
    pseudonym (streamrec/pseudonym.py): record and key both, so raw ids never enter Kafka.
    ``pseudonymise=False`` sends ids as they are given (ids that are pseudonyms already).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        codec: Codec | None = None,
        config: Mapping[str, Any] | None = None,
        schema_timeout_s: float = 10.0,
        pseudonymise: bool | None = None,
    ) -> None:
        self.settings = settings
        key = settings.pseudonym_key
        if pseudonymise is None:
            pseudonymise = key is not None
        if pseudonymise and key is None:
            raise ValueError("pseudonymise=True needs STREAMREC_PSEUDONYM_KEY (or _FILE)")
        self._pseudonym_key = key.get_secret_value().encode() if pseudonymise and key is not None else None
        self.rules = ValidationRules.from_settings(settings)
        self.history_rules = ValidationRules.from_settings(settings, historical=True)
        self.codec = codec or make_codec(settings, resolve_from_topic=False)
        self.schema_timeout_s = schema_timeout_s
        self._config = {  # beyond client_config(settings)
            "client.id": "streamrec-producer",
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "compression.type": settings.internal_compression,
            "linger.ms": 5,  # small batches for a web backend; a few ms add nothing a user notices
            "queue.buffering.max.messages": settings.producer_buffer_messages,
            "message.timeout.ms": settings.producer_delivery_timeout_ms,
            **(config or {}),
        }
        self._producer = self._new_producer()
        self._producer_lock = threading.Lock()  # held to send, and to replace the producer
        self._stale = False  # the producer can deliver no more: replaced before the next send
        self._publish_schemas = not isinstance(self.codec, RegistryCodec)
        self._published: set[bytes] = set()
        self._schema_lock = threading.Lock()
        self._failures: list[DeliveryFailure] = []
        self._failures_lock = threading.Lock()
        self._closed = False

    # --- events --------------------------------------------------------------------------------------

    def click(
        self,
        user_id: str,
        item_id: str,
        *,
        session_id: str | None = None,
        context: Mapping[str, str | None] | None = None,
        timestamp: int | datetime | None = None,
        event_id: str | None = None,
    ) -> str:
        """A user viewed or clicked an item; returns the event id."""
        return self._event(
            EventKind.CLICK, user_id, session_id, context, timestamp, event_id, item_id=item_id
        )

    def search(
        self,
        user_id: str,
        query: str,
        *,
        session_id: str | None = None,
        context: Mapping[str, str | None] | None = None,
        timestamp: int | datetime | None = None,
        event_id: str | None = None,
    ) -> str:
        """A user searched the catalogue; returns the event id."""
        return self._event(EventKind.SEARCH, user_id, session_id, context, timestamp, event_id, query=query)

    def purchase(
        self,
        user_id: str,
        item_id: str,
        price: float,
        quantity: int = 1,
        *,
        currency: str | None = None,
        session_id: str | None = None,
        context: Mapping[str, str | None] | None = None,
        timestamp: int | datetime | None = None,
        event_id: str | None = None,
    ) -> str:
        """A user bought ``quantity`` of an item at unit ``price``; returns the event id."""
        _check(price_problem(price) or quantity_problem(quantity) or currency_problem(currency))
        return self._event(
            EventKind.PURCHASE,
            user_id,
            session_id,
            context,
            timestamp,
            event_id,
            item_id=item_id,
            price=float(price),
            quantity=quantity,
            currency=currency,
        )

    def send_event(self, event: Event, *, topic: str | None = None, historical: bool = False) -> str:
        """Send a ready-made event (replay), validated as the methods above validate theirs.

        ``historical`` lifts the age limit: for the backfill topic, where the worker accepts old events.
        """
        if event.kind is EventKind.SEARCH:
            fields: dict[str, Any] = {"query": event.query}
        else:
            fields = {"item_id": event.item_id}
        if event.kind is EventKind.PURCHASE:
            _check(price_problem(event.price) or quantity_problem(event.quantity))
            fields |= {"price": float(event.price or 0.0), "quantity": event.quantity}
        return self._event(
            event.kind,
            event.user_id,
            event.session_id,
            event.context,
            event.timestamp,
            event.event_id,
            topic=topic,
            historical=historical,
            **fields,
        )

    def delete_user(
        self,
        user_id: str,
        *,
        requested_by: str | None = None,
        timestamp: int | datetime | None = None,
        event_id: str | None = None,
    ) -> str:
        """Erase a user (privacy request): keyed by user, so it is ordered after that user's events. The id
        is the one given to ``click`` and the others: a pseudonymising producer erases its pseudonym."""
        user_id = self.sent_user_id(user_id)
        record = {
            "event_id": self._event_id(event_id),
            "user_id": user_id,
            "timestamp": self._timestamp(timestamp),
            "requested_by": requested_by,
        }
        rejection = validate_deletion(record, int(time.time() * 1000), self.rules)
        _check(rejection.detail if rejection is not None else None)
        self.send("UserDeletion", record, key=user_id)
        return str(record["event_id"])

    def upsert_item(self, item: CatalogItem | None = None, **fields: Any) -> str:
        """Add or change a catalogue item (a ``CatalogItem`` or its fields); returns its item id.

        ``updated_at`` (epoch ms) defaults to now: the latest upsert of an item wins.
        """
        if item is None:
            try:
                item = CatalogItem(**fields)
            except TypeError as exc:
                raise InvalidRecordError(f"not a catalogue item: {exc}") from exc
        elif fields:
            raise TypeError("pass a CatalogItem or its fields, not both")
        now = int(time.time() * 1000)
        if not item.updated_at:
            item = dataclasses.replace(item, updated_at=now)
        rejection = validate_item(item, now, self.rules)
        _check(rejection.detail if rejection is not None else None)
        record = item.to_avro()
        self.send("CatalogItem", record, key=item.item_id, topic=self.settings.catalog_topic)
        return item.item_id

    @property
    def pseudonymises(self) -> bool:
        return self._pseudonym_key is not None

    def sent_user_id(self, user_id: str) -> str:
        """The id this producer sends for ``user_id``: its pseudonym when pseudonymising, else ``user_id``.
        A raw id is checked first (InvalidRecordError): a blank or oversized one must not hide behind a
        well-formed hash."""
        if self._pseudonym_key is None:
            return user_id
        _check(id_problem("user_id", user_id, self.settings.max_id_bytes))
        return pseudonym(self._pseudonym_key, user_id)

    # --- lower level ---------------------------------------------------------------------------------

    def send(
        self, schema_name: str, record: dict[str, Any], *, key: str | bytes, topic: str | None = None
    ) -> None:
        """Encode ``record`` with this producer's version of ``schema_name`` and send it (default: events)."""
        try:
            schema = self.codec.schema(schema_name)
        except KeyError as exc:
            raise InvalidRecordError(f"no schema named {schema_name!r}") from exc
        value = self.codec.encode(schema_name, record, schema)  # EncodeError (a ValueError) when invalid
        self._ensure_published(schema)
        self._produce(topic or self.settings.events_topic, _key(key), value)

    def send_raw(
        self,
        topic: str,
        key: str | bytes | None,
        value: bytes | None,
        *,
        partition: int | None = None,
        headers: Mapping[str, bytes] | None = None,
    ) -> None:
        """Send bytes as they are (tools and tests): no validation, delivery still tracked."""
        self._produce(topic, _key(key), value, partition=partition, headers=headers)

    def prepare(self, schema_names: tuple[str, ...] = (*EVENT_SCHEMAS, "UserDeletion")) -> None:
        """Publish these writer schemas now (each is otherwise published, and acknowledged, before its first
        record): a backend calls this at start-up so its first events do not wait for that round trip."""
        for name in schema_names:
            self._ensure_published(self.codec.schema(name))

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve delivery reports (a long-running sender calls this now and then); returns how many."""
        served = self._serve(lambda: self._producer.poll(timeout_s))
        self._renew_if_stale()
        return served

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every queued record; raise ``DeliveryError`` for failures since the last flush."""
        self._renew_if_stale()
        remaining = self._serve(lambda: self._producer.flush(timeout_s))
        if self._stale:  # what the failed producer still holds is purged: reported below, one by one
            self._renew_if_stale()
            remaining = 0
        with self._failures_lock:
            failures, self._failures = self._failures, []
        if failures or remaining:
            raise DeliveryError(failures, remaining)

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush (raising ``DeliveryError`` as ``flush()`` does), then release the client: its connections
        close now, not whenever it is garbage-collected, when its broker may be gone (librdkafka logs that
        as a failure)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout_s)
        finally:
            self._producer.purge()  # what flush() left is in its DeliveryError; close() would wait for it
            self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the original error behind a DeliveryError
            try:
                self.close()
            except DeliveryError as exc:
                log.error("while closing after an error: %s", exc)

    # --- internals -----------------------------------------------------------------------------------

    def _event(
        self,
        kind: EventKind,
        user_id: str,
        session_id: str | None,
        context: Mapping[str, str | None] | None,
        timestamp: int | datetime | None,
        event_id: str | None,
        currency: str | None = None,
        topic: str | None = None,
        historical: bool = False,
        **fields: Any,
    ) -> str:
        user_id = self.sent_user_id(user_id)
        try:  # the compiled Event checks its field types itself
            event = Event(
                event_id=self._event_id(event_id),
                user_id=user_id,
                kind=kind,
                timestamp=self._timestamp(timestamp, historical),
                session_id=session_id,
                context=self._context(context),
                **fields,
            )
        except TypeError as exc:
            raise InvalidRecordError(f"not a {kind.name.lower()} event: {exc}") from exc
        # The worker's own rules (the catalogue aside): what passes here is never dead-lettered as invalid.
        rules = self.history_rules if historical else self.rules
        rejection = validate_event(event, int(time.time() * 1000), rules, lambda _: True)
        _check(rejection.detail if rejection is not None else None)
        record = event.to_avro()
        if kind is EventKind.PURCHASE:
            record["currency"] = currency
        self.send(event.schema_name, record, key=user_id, topic=topic)
        return event.event_id

    @staticmethod
    def _event_id(event_id: str | None) -> str:
        return uuid.uuid4().hex if event_id is None else event_id

    def _timestamp(self, timestamp: int | datetime | None, historical: bool = False) -> int:
        now = int(time.time() * 1000)
        if timestamp is None:
            return now
        if isinstance(timestamp, datetime):
            if timestamp.tzinfo is None:
                raise InvalidRecordError("timestamp must be timezone-aware (a naive datetime is ambiguous)")
            timestamp = int(timestamp.timestamp() * 1000)
        if isinstance(timestamp, bool) or not isinstance(timestamp, int):
            raise InvalidRecordError(f"timestamp must be epoch milliseconds (int), got {timestamp!r}")
        # The worker dead-letters events outside this window: reject them here, where the caller can react.
        oldest = 0 if historical else now - self.settings.max_event_age_days * 86_400_000
        newest = now + self.settings.max_clock_skew_s * 1000
        if not oldest <= timestamp <= newest:
            raise InvalidRecordError(
                f"timestamp {timestamp} is not a plausible epoch-milliseconds time "
                f"(allowed {oldest}..{newest}; seconds instead of milliseconds?)"
            )
        return timestamp

    @staticmethod
    def _context(context: Mapping[str, str | None] | None) -> dict[str, str | None] | None:
        if context is None:
            return None
        unknown = set(context) - set(CONTEXT_FIELDS)
        if unknown:  # Avro would drop them silently; a typo should fail loudly
            raise InvalidRecordError(f"unknown context field(s) {sorted(unknown)}; known: {CONTEXT_FIELDS}")
        return {name: context.get(name) for name in CONTEXT_FIELDS}

    def _ensure_published(self, schema: RecordSchema) -> None:
        if not self._publish_schemas or schema.fingerprint in self._published:
            return
        with self._schema_lock:
            if schema.fingerprint in self._published:
                return
            outcome: list[KafkaError | None] = []
            publish_schema(self._producer, self.settings, schema, on_delivery=lambda e, _m: outcome.append(e))
            # Wait for the acknowledgement: a record must never reach a worker before its schema can.
            self._producer.flush(self.schema_timeout_s)
            if not outcome or outcome[0] is not None:
                error = str(outcome[0]) if outcome else "not acknowledged in time"
                failure = DeliveryFailure(self.settings.schemas_topic, -1, schema.fingerprint, error)
                raise DeliveryError([failure])
            self._published.add(schema.fingerprint)

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        *,
        partition: int | None = None,
        headers: Mapping[str, bytes] | None = None,
    ) -> None:
        if self._closed:
            raise RuntimeError("EventProducer is closed")
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": self._on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = dict(headers)
        deadline = time.monotonic() + self.schema_timeout_s
        while True:
            self._renew_if_stale()
            with self._producer_lock:
                producer = self._producer
                try:
                    producer.produce(topic, **kwargs)
                    break
                except BufferError:  # local queue full: serve delivery reports to make room, then retry
                    if time.monotonic() > deadline:
                        raise
                except KafkaException as exc:  # a fatal error: the producer is replaced, and sent to again
                    if not exc.args[0].fatal():
                        raise
                    self._stale = True
                    continue
            self._serve(partial(producer.poll, 0.1))
        self._serve(lambda: producer.poll(0))

    def _serve(self, call: Callable[[], int]) -> int:
        """The producer's ``poll`` or ``flush``, which raise its fatal error (an idempotent producer that can
        deliver no more): the producer is then replaced before the next send, and what it held reported."""
        try:
            return int(call())
        except KafkaException as exc:
            if not exc.args[0].fatal():
                raise
            log.error("the producer failed: %s", exc.args[0].str())
            self._stale = True
            return 0

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            return
        if self._closed and err.code() in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT):
            return  # purged by close(), after flush() reported it
        if err.fatal() or err.code() in RENEW_AFTER:
            self._stale = True
        partition = msg.partition()
        failure = DeliveryFailure(
            msg.topic() or "", -1 if partition is None else partition, msg.key(), str(err), msg.value()
        )
        log.error("record not delivered to %s[%d]: %s", failure.topic, failure.partition, failure.error)
        with self._failures_lock:
            self._failures.append(failure)

    def _new_producer(self) -> Producer:
        return Producer({**client_config(self.settings), **self._config})

    def _renew_if_stale(self) -> None:
        """Replace a producer that can deliver no more with a new one (a new producer id). What the old one
        still holds is purged, and each purged record is reported as not delivered (``flush()`` raises it)."""
        if not self._stale or self._closed:
            return
        with self._producer_lock:
            if not self._stale:
                return
            old, self._producer = self._producer, self._new_producer()
            self._stale = False
            old.purge()
        old.flush(5.0)  # serves the purged records' reports: failures, kept for flush()
        old.close()
        log.warning("the producer could deliver no more (broker restarted or away too long); replaced it")


# The embedded broker holds a fetch that finds no record for up to about half of its fetch.wait.max.ms, even
# when records arrive meanwhile; Kafka answers it as soon as one does. Measured from produce to consume at
# 100 and 1,000 records/s: librdkafka's default wait (500 ms) gave p50 135 / p99 260 ms, 20 ms gave 14 / 25
# ms. Shorter waits are not free there either: each fetch costs the embedded broker CPU, more the more it
# stores (docs/performance.md, "Round 12").
EMBEDDED_FETCH_WAIT_MS = 20


def reader_config(settings: Settings, group_id: str | None, from_beginning: bool) -> dict[str, Any]:
    """librdkafka settings of a recommendation reader: without ``group_id`` one that never joins a group
    (it is assign()ed every partition and commits nothing), with one a group member."""
    config: dict[str, Any] = {
        **client_config(settings),
        "client.id": "streamrec-recommendation-consumer",
        "auto.offset.reset": "earliest" if from_beginning else "latest",
    }
    if settings.embedded_broker:
        config["fetch.wait.max.ms"] = EMBEDDED_FETCH_WAIT_MS
    if group_id is None:
        return config | {"group.id": "streamrec-recs-unused", "enable.auto.commit": False}  # never joined
    return config | {
        "group.id": group_id,
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": settings.heartbeat_interval_ms,
        "partition.assignment.strategy": settings.assignment_strategy,
    }


class RecommendationConsumer:
    """Reads typed ``Recommendation``s from the output topic, skipping (and logging) undecodable records.

    Without ``group_id`` it ``assign()``s every partition: no group join, nothing committed (tools, tail).
    With one it joins that consumer group and commits as it goes (services that must not miss records).
    """

    def __init__(
        self,
        settings: Settings,
        group_id: str | None = None,
        from_beginning: bool = False,
        topic: str | None = None,
        *,
        codec: Codec | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = topic or settings.recommendations_topic
        self.codec = codec or make_codec(settings)
        self.skipped = 0
        self._buffer: deque[Message] = deque()
        self._started_ms = int(time.time() * 1000)
        # The embedded broker's "latest" offset is the first of the last batch + 1, so a tail from the end
        # would replay part of that batch: skip what was written before this consumer started.
        self._skip_before_ms = self._started_ms if settings.embedded_broker and not from_beginning else 0
        if group_id is not None:
            self._skip_before_ms = 0  # committed offsets decide where a group member starts
        self._consumer = Consumer(reader_config(settings, group_id, from_beginning) | dict(config or {}))
        if group_id is None:
            metadata = self._consumer.list_topics(self.topic, timeout=10.0).topics.get(self.topic)
            if metadata is None or metadata.error is not None:
                self._consumer.close()
                why = metadata.error.str() if metadata is not None else "no metadata"
                raise TopicNotReadable(f"topic {self.topic} is not readable: {why}")
            start = OFFSET_BEGINNING if from_beginning else OFFSET_END
            self._consumer.assign([TopicPartition(self.topic, p, start) for p in sorted(metadata.partitions)])
        else:
            self._consumer.subscribe([self.topic])

    def poll(self, timeout_s: float = 1.0) -> Recommendation | None:
        """The next recommendation, or None when none arrived within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            while self._buffer:
                found = self._decode(self._buffer.popleft())
                if found is not None:
                    return found
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._buffer.extend(consume_arrived(self._consumer, 500, min(left, 1.0)))

    def iterate(self, idle_timeout_s: float | None = None) -> Iterator[Recommendation]:
        """Yield recommendations; stop after ``idle_timeout_s`` without one (None: never)."""
        idle_since = time.monotonic()
        while True:
            found = self.poll(1.0 if idle_timeout_s is None else min(1.0, idle_timeout_s))
            if found is not None:
                idle_since = time.monotonic()
                yield found
            elif idle_timeout_s is not None and time.monotonic() - idle_since >= idle_timeout_s:
                return

    def __iter__(self) -> Iterator[Recommendation]:
        return self.iterate()

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> RecommendationConsumer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _decode(self, msg: Message) -> Recommendation | None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consuming %s: %s", self.topic, err)
            return None
        _, timestamp = msg.timestamp()
        if timestamp < self._skip_before_ms or msg.value() is None:  # no value: a tombstone (erased user)
            return None
        try:
            _, record = self.codec.decode(msg.value() or b"", accept=("Recommendation",))
            return Recommendation.from_avro(record)
        except (DecodeError, KeyError, TypeError) as exc:
            self.skipped += 1
            log.warning("skipping %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
            return None
