"""The worker's high-rate event path: a batched confluent-kafka stage with RocksDB state and a changelog.

Per micro-batch: decode, validate (rejects go to the dead-letter topic with a reason), de-duplicate by event
id, apply to per-user state, encode every changed user in one encoder call and search the index once, publish
the recommendations and the changed states to the changelog, wait for delivery, write the states locally, and
only then commit the input offsets. A crash anywhere before the commit redelivers the batch; de-duplication by
event id makes that harmless (at-least-once in, idempotent state).

One writer per user's state: the consumer group subscribes to the events topic only. Whichever partitions the
assignor gives a member, the member also assigns itself the backfill topic's partitions of the same numbers
(the topics are co-partitioned: same count, same key, same partitioner). So the owner of a user's state is
the only one that applies that user's replayed history, under any assignment strategy. Backfill events
change state and the changelog like live ones; their recommendations go to the shadow topic, or nowhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from streamrec.catalog import Catalog
from streamrec.records import (
    EVENT_SCHEMAS,
    CatalogItem,
    Event,
    EventKind,
    Recommendation,
    RecommendedItem,
    UserState,
)
from streamrec.serde import AvroCodec, DecodeError, RecommendationWriter
from streamrec.settings import Settings
from streamrec.state import (
    Rejection,
    StateBytes,
    StateLimits,
    ValidationRules,
    appends_to_history,
    apply_event,
    decode_state,
    encode_state_bytes,
    validate_event,
)
from streamrec.streams.metrics import WorkerMetrics
from streamrec.streams.state_store import StateCache, StateStore
from streamrec.triggers import OnlineAccuracy

log = logging.getLogger(__name__)

ACCEPTED_SCHEMAS = frozenset([*EVENT_SCHEMAS, "UserDeletion"])
ANY_PARTITION = -1  # librdkafka's RD_KAFKA_PARTITION_UA: the producer's partitioner picks (murmur2 by key)


class Recommender(Protocol):
    """What the stage needs from a model (implemented by streamrec.models.serving.Recommender)."""

    model_version: str
    index_version: str

    def upsert_items(self, items: list[CatalogItem]) -> None: ...

    def recommend(self, users: list[UserState], k: int) -> list[list[RecommendedItem]]: ...


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class BatchOutcome:
    events: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    recommendations: int = 0
    deleted_users: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class DeliveryFailed(RuntimeError):
    pass


class CoPartitioningError(RuntimeError):
    """The backfill topic cannot follow the events topic partition for partition."""


def check_co_partitioned(partition_counts: dict[str, int | None], events: str, backfill: str) -> None:
    """Refuse to start unless both topics exist with the same partition count."""
    ours, theirs = partition_counts.get(events), partition_counts.get(backfill)
    if ours is None or theirs is None:
        missing = [t for t, n in ((events, ours), (backfill, theirs)) if n is None]
        raise CoPartitioningError(f"topic(s) {missing} missing: run `streamrec topics create`")
    if ours != theirs:
        raise CoPartitioningError(
            f"{backfill} has {theirs} partitions and {events} has {ours}: a user's replayed events would "
            "reach another worker than the one that owns the user's state"
        )


def follow(partitions: list[TopicPartition], backfill: str) -> list[TopicPartition]:
    """The backfill partitions that go with the given events partitions: the same numbers."""
    return [TopicPartition(backfill, p.partition) for p in partitions]


class EventStage:
    """Runs in its own thread inside the worker process (confluent-kafka calls block)."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        recommender: Recommender,
        codec: AvroCodec,
        metrics: WorkerMetrics | None = None,
        accuracy: OnlineAccuracy | None = None,
        on_events: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.recommender = recommender
        self.codec = codec
        self.metrics = metrics or WorkerMetrics()
        self.accuracy = accuracy or OnlineAccuracy()
        self.on_events = on_events
        self.worker_id = settings.worker_id or f"worker-{id(self):x}"
        self.limits = StateLimits(settings.history_length, settings.max_purchased, settings.dedupe_window)
        self.rules = ValidationRules.from_settings(settings)
        self.backfill_rules = ValidationRules.from_settings(settings, historical=True)
        self.events_topic = settings.events_topic
        self.backfill_topic = settings.backfill_topic
        self.cooperative = settings.assignment_strategy == "cooperative-sticky"
        self.store = StateStore(
            settings.data_dir,
            settings.state_changelog_topic,
            settings.bootstrap_servers,
            memtable_mb=settings.state_memtable_mb,
            block_cache_mb=settings.state_block_cache_mb,
        )
        self.cache = StateCache(settings.state_cache_users)
        self.rec_writer = RecommendationWriter()  # byte for byte codec.encode("Recommendation", ...), faster
        self._pending_model: Recommender | None = None
        self._lock = threading.Lock()
        self.ready = threading.Event()  # set once partitions are assigned and restored
        self.error: BaseException | None = None
        self._consumer: Consumer | None = None
        self._assigned: dict[str, set[int]] = {}
        self._producer: Producer | None = None
        # (topic, partition) -> the last offset committed, for the events and the backfill topic
        self._committed: dict[tuple[str, int], TopicPartition] = {}

    # --- control from other threads -------------------------------------------------------------------

    def swap_model(self, recommender: Recommender) -> None:
        """Serve a newly promoted model from the next micro-batch on (encoder and its index together)."""
        with self._lock:
            self._pending_model = recommender

    def lookup(self, user_id: str) -> UserState | None:
        """A user's state if one of this worker's partitions holds it (RocksDB reads are thread-safe)."""
        for partition in list(self.store.partitions):
            try:
                raw = self.store.get_many(partition, [user_id])[0]
            except KeyError:
                continue  # revoked meanwhile
            if raw is not None:
                return decode_state(raw)
        return None

    # --- the loop ---------------------------------------------------------------------------------------

    def _make_clients(self) -> tuple[Consumer, Producer]:
        s = self.settings
        consumer = Consumer(
            {
                "bootstrap.servers": s.bootstrap_servers,
                "group.id": s.events_group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": s.session_timeout_ms,
                "heartbeat.interval.ms": s.heartbeat_interval_ms,
                "partition.assignment.strategy": s.assignment_strategy,
                "client.id": self.worker_id,
                "fetch.wait.max.ms": max(1, s.batch_wait_ms),
                "queued.max.messages.kbytes": s.consumer_queue_kbytes,
                "queued.min.messages": s.consumer_queue_messages,
            }
        )
        producer = Producer(
            {
                "bootstrap.servers": s.bootstrap_servers,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "compression.type": "lz4",
                "partitioner": "murmur2_random",
                "queue.buffering.max.messages": 1_000_000,  # bounded by bytes instead
                "queue.buffering.max.kbytes": s.producer_queue_kbytes,
                "client.id": self.worker_id,
            }
        )
        return consumer, producer

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Restore before fetching starts, then take the backfill partitions of the same numbers along.
        self.cache.clear()
        self.store.assign(p.partition for p in partitions)
        with_backfill = partitions + follow(partitions, self.backfill_topic)
        if self.cooperative:
            consumer.incremental_assign(with_backfill)
        else:
            consumer.assign(with_backfill)
        self._note_assignment(with_backfill, added=True)
        self.metrics.partitions.set(len(self.store.partitions))
        log.info("%s assigned %s", self.worker_id, sorted(p.partition for p in partitions))
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Everything consumed before this call has been published (the loop is synchronous); its offsets
        # were committed asynchronously: commit them once more, waiting, before the partitions move.
        revoked = {p.partition for p in partitions}
        self._commit_synchronously(consumer, revoked)
        for key in [key for key in self._committed if key[1] in revoked]:
            del self._committed[key]  # both topics: backfill partitions follow the events partitions
        self.cache.clear()
        self.store.revoke(p.partition for p in partitions)
        with_backfill = partitions + follow(partitions, self.backfill_topic)
        if self.cooperative:
            consumer.incremental_unassign(with_backfill)
        else:
            consumer.unassign()
        self._note_assignment(with_backfill, added=False)
        self.metrics.partitions.set(len(self.store.partitions))

    def _commit_synchronously(self, consumer: Consumer, partitions: set[int] | None = None) -> None:
        offsets = [tp for tp in self._committed.values() if partitions is None or tp.partition in partitions]
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # the batch is consumed again by the next owner: state is idempotent
            log.warning("commit of %s failed: %s", offsets, exc)

    def assignment(self) -> dict[str, list[int]]:
        """Partitions this stage reads, by topic (the backfill ones follow the events ones)."""
        with self._lock:
            return {topic: sorted(ps) for topic, ps in self._assigned.items()}

    def _note_assignment(self, partitions: list[TopicPartition], added: bool) -> None:
        # Kept here for the web thread: asking the consumer from another thread can block on a rebalance.
        with self._lock:
            for tp in partitions:
                held = self._assigned.setdefault(tp.topic, set())
                if added:
                    held.add(tp.partition)
                else:
                    held.discard(tp.partition)

    def run(self, stop: threading.Event) -> None:
        try:
            self._run(stop)
        except BaseException as exc:
            self.error = exc
            log.exception("event stage stopped")
            raise

    def _run(self, stop: threading.Event) -> None:
        consumer, producer = self._make_clients()
        self._consumer, self._producer = consumer, producer
        topics = consumer.list_topics(timeout=10).topics
        counts = {
            name: (len(meta.partitions) if meta.error is None else None)
            for name in (self.events_topic, self.backfill_topic)
            if (meta := topics.get(name)) is not None
        }
        check_co_partitioned(counts, self.events_topic, self.backfill_topic)
        consumer.subscribe([self.events_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        wait_s, size = self.settings.batch_wait_ms / 1000, self.settings.batch_size
        try:
            while not stop.is_set():
                self._between_batches()
                # A batch is what arrived while the previous one was processed: under a backlog it fills
                # up to batch_size (per-batch costs amortised, more coalescing per user); at low load a
                # record is taken as soon as it arrives instead of after the whole wait.
                msgs = consumer.consume(num_messages=size, timeout=0)
                if not msgs:
                    msgs = consumer.consume(num_messages=1, timeout=wait_s)
                    if not msgs:
                        continue
                    msgs += consumer.consume(num_messages=size - 1, timeout=0)
                try:
                    self.process(msgs)
                except DeliveryFailed as exc:
                    # Nothing of the batch was committed or written locally; it is consumed again.
                    log.error("batch not delivered, retrying: %s", exc)
                    stop.wait(1.0)
        finally:
            producer.flush(10)
            self._commit_synchronously(consumer)
            consumer.close()  # leaves the group now, so partitions move without waiting for a timeout
            self.store.close()

    def _between_batches(self) -> None:
        with self._lock:
            pending, self._pending_model = self._pending_model, None
        if pending is not None:
            pending.upsert_items(self.catalog.items())
            self.recommender = pending
            self.accuracy.reset()
            log.info("now serving model %s", pending.model_version)
        changes = self.catalog.drain_changes()
        if changes:
            self.recommender.upsert_items(changes)
            self.metrics.catalog_items.set(len(self.catalog))

    # --- one micro-batch --------------------------------------------------------------------------------

    def process(self, msgs: list[Message]) -> BatchOutcome:
        assert self._consumer is not None and self._producer is not None
        started = time.perf_counter()
        out = BatchOutcome()
        producer = self._producer
        failures: list[str] = []
        changelog_offsets: dict[int, int] = {}

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failures.append(f"{msg.topic()}[{msg.partition()}]: {err}")
            elif msg.topic() == self.settings.state_changelog_topic:
                p, offset = msg.partition(), msg.offset()
                assert p is not None and offset is not None  # set on every delivered record
                changelog_offsets[p] = max(changelog_offsets.get(p, -1), offset)

        # 1. decode and validate, in input order; group valid events per (partition, user). Partition p of the
        # backfill topic holds the same users as partition p of the events topic.
        by_partition: dict[int, dict[str, list[tuple[Event | None, bool]]]] = {}  # None = erase the user
        first_offsets: dict[tuple[str, int], int] = {}
        last_offsets: dict[tuple[str, int], int] = {}
        now = now_ms()
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", err)
                continue
            topic, p, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and p is not None and offset is not None  # set on every fetched record
            backfill = topic == self.backfill_topic
            first_offsets.setdefault((topic, p), offset)
            last_offsets[(topic, p)] = offset
            outcome = self._decode(msg, now, self.backfill_rules if backfill else self.rules)
            if isinstance(outcome, Rejection):
                self._dead_letter(producer, msg, outcome, delivered)
                out.dead_letters += 1
                continue
            by_partition.setdefault(p, {}).setdefault(outcome[0], []).append((outcome[1], backfill))

        clock = time.perf_counter
        phases = self.metrics.batch_phase_seconds
        t_decoded = clock()
        phases.labels("decode").inc(t_decoded - started)

        # 2. apply to state: active users' decoded states come from the cache, the others from RocksDB. A
        # user's recommendation is caused by their last live event, else by their last backfill event (shadow
        # topic), so consumers of the live topic never see history as new.
        changed: list[tuple[UserState, Event, bool]] = []  # (state, cause, caused by backfill)
        changes: dict[int, dict[str, bytes | None]] = {}
        cache_updates: list[tuple[int, UserState, StateBytes]] = []
        applied: Counter[EventKind] = Counter()
        shadow = self.settings.backfill_recommendations == "shadow"
        for p, users in by_partition.items():
            cached = {user_id: self.cache.get(p, user_id) for user_id in users}
            missing = [user_id for user_id, hit in cached.items() if hit is None]
            stored = dict(zip(missing, self.store.get_many(p, missing), strict=True))
            for user_id, events in users.items():
                hit = cached[user_id]
                parts: StateBytes | None = None
                if hit is not None:
                    state, parts = hit
                else:
                    raw = stored[user_id]
                    state = decode_state(raw) if raw is not None else None
                live_cause: Event | None = None
                backfill_cause: Event | None = None
                erased = False
                new_events = 0
                for event, backfill in events:
                    if event is None:
                        state, parts, live_cause, backfill_cause, erased, new_events = (
                            None, None, None, None, True, 0
                        )  # fmt: skip
                        continue
                    appends = appends_to_history(state, event)
                    state, was_applied = apply_event(state, event, self.limits)
                    if not was_applied:
                        out.duplicates += 1
                        continue
                    out.events += 1
                    new_events += 1
                    applied[event.kind] += 1
                    if not appends:
                        parts = None  # inserted by time, not appended: re-encode the whole history
                    if backfill:
                        backfill_cause = event
                        continue
                    if event.kind is not EventKind.SEARCH and event.item_id is not None:
                        self.accuracy.interacted(user_id, event.item_id)
                    live_cause = event
                if state is None:
                    if erased:
                        changes.setdefault(p, {})[user_id] = None
                        self.accuracy.forget(user_id)
                        out.deleted_users += 1
                    continue
                if new_events:
                    encoded, parts = encode_state_bytes(state, parts, new_events)
                    changes.setdefault(p, {})[user_id] = encoded
                    cache_updates.append((p, state, parts))
                    if live_cause is not None:
                        changed.append((state, live_cause, False))
                    elif backfill_cause is not None and shadow:
                        changed.append((state, backfill_cause, True))
        for kind, n in applied.items():
            self.metrics.events.labels(kind.name.lower()).inc(n)

        t_applied = clock()
        phases.labels("state").inc(t_applied - t_decoded)

        # 3. one encoder call and one index search for every user to recommend to
        if changed:
            ranked = self.recommender.recommend([s for s, _, _ in changed], self.settings.top_k)
            t_recommended = clock()
            phases.labels("recommend").inc(t_recommended - t_applied)
            t_applied = t_recommended
            publish = now_ms()
            model, index = self.recommender.model_version, self.recommender.index_version
            header, body = self.codec.header("Recommendation"), self.rec_writer.body
            for (state, cause, backfill), items in zip(changed, ranked, strict=True):
                rec = Recommendation(
                    user_id=state.user_id,
                    items=items,
                    model_version=model,
                    index_version=index,
                    cause_event_id=cause.event_id,
                    event_time=cause.timestamp,
                    publish_time=publish,
                    mode="backfill" if backfill else "live",
                )
                out_topic = self.settings.shadow_topic if backfill else self.settings.recommendations_topic
                self._produce(producer, out_topic, state.user_id.encode(), header + body(rec), delivered)
                if not backfill:
                    self.accuracy.recommended(state.user_id, [i.item_id for i in items])
                    out.latencies_ms.append(publish - cause.timestamp)
            out.recommendations = len(changed)

        # 4. the changelog, keyed by user, on the partition of the same number
        for p, user_changes in changes.items():
            for user_id, value in user_changes.items():
                self._produce(
                    producer,
                    self.settings.state_changelog_topic,
                    user_id.encode(),
                    value,
                    delivered,
                    partition=p,
                )

        t_produced = clock()
        phases.labels("produce").inc(t_produced - t_applied)

        # 5. commit only what has been delivered
        remaining = producer.flush(30)
        t_flushed = clock()
        phases.labels("flush").inc(t_flushed - t_produced)
        if remaining or failures:
            self.cache.clear()  # it holds this batch's states, updated in place: RocksDB has the truth
            self._rewind(first_offsets)
            raise DeliveryFailed(f"{remaining} undelivered, failures: {failures[:5]}")
        for p, user_changes in changes.items():
            self.store.write(p, user_changes, changelog_offsets.get(p))
            for user_id, value in user_changes.items():
                if value is None:
                    self.cache.put(p, user_id, None)
        for p, state, parts in cache_updates:
            self.cache.put(p, state.user_id, (state, parts))
        # Asynchronous: everything before it is delivered, so a lost commit only means the batch is consumed
        # again, and de-duplication makes that harmless; a revoke or a stop commits once more, waiting.
        commits = [TopicPartition(t, p, o + 1) for (t, p), o in last_offsets.items()]
        self._consumer.commit(offsets=commits, asynchronous=True)
        self._committed.update(((tp.topic, tp.partition), tp) for tp in commits)
        phases.labels("commit").inc(clock() - t_flushed)

        self._record(out, time.perf_counter() - started)
        return out

    def _decode(self, msg: Message, now: int, rules: ValidationRules) -> tuple[str, Event | None] | Rejection:
        value = msg.value()
        if value is None:
            return Rejection("undecodable", "empty record (tombstone) on the events topic")
        try:
            name, record = self.codec.decode(value, accept=ACCEPTED_SCHEMAS)
        except DecodeError as exc:
            return Rejection(exc.reason, exc.detail)
        if name == "UserDeletion":
            if not record["user_id"]:
                return Rejection("invalid_record", "user_id must be non-empty")
            return record["user_id"], None
        event = Event.from_avro(name, record)
        rejection = validate_event(event, now, rules, self.catalog.__contains__)
        return rejection if rejection is not None else (event.user_id, event)

    def _produce(
        self,
        producer: Producer,
        topic: str,
        key: bytes,
        value: bytes | None,
        on_delivery: Callable[[KafkaError | None, Message], None],
        partition: int = ANY_PARTITION,
    ) -> None:
        while True:
            try:
                producer.produce(topic, value=value, key=key, partition=partition, on_delivery=on_delivery)
                return
            except BufferError:
                producer.poll(0.05)  # local queue full: let deliveries drain

    def _dead_letter(
        self,
        producer: Producer,
        msg: Message,
        rejection: Rejection,
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        record = {
            "source_topic": msg.topic(),
            "partition": msg.partition(),
            "offset": msg.offset(),
            "key": msg.key(),
            "value": msg.value(),
            "reason": rejection.reason,
            "detail": rejection.detail[:2000],
            "failed_at": now_ms(),
            "worker_id": self.worker_id,
        }
        self._produce(
            producer,
            self.settings.dead_letter_topic,
            msg.key() or b"",
            self.codec.encode("DeadLetter", record),
            on_delivery,
        )
        self.metrics.dead_letters.labels(rejection.reason).inc()

    def _rewind(self, first_offsets: dict[tuple[str, int], int]) -> None:
        assert self._consumer is not None
        for (topic, p), offset in first_offsets.items():
            self._consumer.seek(TopicPartition(topic, p, offset))

    def _record(self, out: BatchOutcome, seconds: float) -> None:
        m = self.metrics
        m.batches.inc()
        m.batch_seconds.observe(seconds)
        m.duplicates.inc(out.duplicates)
        m.recommendations.inc(out.recommendations)
        for latency in out.latencies_ms:
            m.latency.observe(latency / 1000)
        rate = self.accuracy.rate
        if rate is not None:
            m.online_hit_rate.set(rate)
        if self.on_events is not None and out.events:
            self.on_events(out.events)
