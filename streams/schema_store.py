"""Where writer schemas live: the schemas topic (no registry), or a Confluent Schema Registry.

``make_codec(settings)`` picks the codec the worker and the clients use; both accept both framings.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer

from streamrec.serde import (
    HEADER_LEN,
    REGISTRY_HEADER_LEN,
    REGISTRY_MAGIC,
    AvroCodec,
    Codec,
    DecodeError,
    RecordSchema,
    WriterSchemaResolver,
    make_schema,
    registry_header,
    registry_schema_id,
)
from streamrec.settings import Settings
from streamrec.streams.kafka_security import client_config
from streamrec.streams.reading import ReadError, ReadToEnd

log = logging.getLogger(__name__)


def publish_schema(
    producer: Producer,
    settings: Settings,
    schema: RecordSchema,
    on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
) -> None:
    """Queue one writer schema on the schemas topic (compacted, keyed by fingerprint); the caller flushes."""
    producer.produce(
        settings.schemas_topic, key=schema.fingerprint, value=schema.json.encode(), on_delivery=on_delivery
    )


class SchemaTopicResolver:
    """Writer schemas by fingerprint, read from the schemas topic; a ``WriterSchemaResolver`` for AvroCodec.

    Reads with ``assign()`` (no consumer group, no join delay) up to partition EOF, because the embedded
    broker's ListOffsets under-reports the end. The first lookup reads the whole topic; later, only an
    unknown fingerprint triggers a read, from where the last one stopped. Re-reads are rate-limited per
    fingerprint and overall, so a flood of records with made-up fingerprints costs a bounded share of a
    worker's time; a refused lookup answers None (the worker dead-letters the record as unknown_schema,
    and the dead letter keeps its bytes for replay).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        retry_interval_s: float = 1.0,
        max_rereads_per_s: int = 10,
        read_timeout_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.retry_interval_s = retry_interval_s
        self.max_rereads_per_s = max_rereads_per_s
        self.read_timeout_s = read_timeout_s
        self._schemas: dict[bytes, str] = {}
        self._last_miss: dict[bytes, float] = {}  # fingerprint -> when a re-read last failed to find it
        self._recent_reads: deque[float] = deque()
        self._next_offsets: dict[int, int] = {}  # partition -> next offset to read
        self._consumer: Consumer | None = None
        self._loaded = False
        self._lock = threading.Lock()  # the worker may resolve from more than one thread
        self.reads = 0  # topic reads done, for tests and metrics

    def __call__(self, fp: bytes) -> str | None:
        with self._lock:
            found = self._schemas.get(fp)
            if found is not None or not self._may_read(fp):
                return found
            self._read_to_end()
            found = self._schemas.get(fp)
            if found is None:
                self._last_miss[fp] = time.monotonic()
            return found

    def known(self) -> dict[bytes, str]:
        """Every schema read so far, by fingerprint (after ``refresh()`` if called)."""
        with self._lock:
            return dict(self._schemas)

    def refresh(self) -> None:
        """Read what is new on the schemas topic now (e.g. at worker start-up), bypassing the rate limits."""
        with self._lock:
            self._read_to_end()

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None

    def _may_read(self, fp: bytes) -> bool:
        if not self._loaded:
            return True
        now = time.monotonic()
        missed = self._last_miss.get(fp)
        if missed is not None and now - missed < self.retry_interval_s:
            return False
        while self._recent_reads and now - self._recent_reads[0] >= 1.0:
            self._recent_reads.popleft()
        if len(self._recent_reads) >= self.max_rereads_per_s:
            return False
        # Forget old misses so made-up fingerprints cannot grow this dict without bound.
        if len(self._last_miss) > 10_000:
            self._last_miss = {k: t for k, t in self._last_miss.items() if now - t < self.retry_interval_s}
        return True

    def _consumer_for_reads(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(
                {
                    **client_config(self.settings),
                    "group.id": "streamrec-schema-resolver",  # required by the client; never joined (assign)
                    "enable.auto.commit": False,
                    "enable.partition.eof": True,
                    "fetch.wait.max.ms": 10,  # an idle topic must answer EOF fast
                }
            )
        return self._consumer

    def _read_to_end(self) -> None:
        self._recent_reads.append(time.monotonic())
        self.reads += 1
        consumer = self._consumer_for_reads()
        topic = self.settings.schemas_topic
        metadata = consumer.list_topics(topic, timeout=self.read_timeout_s).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            log.warning("schemas topic %s is not readable: %s", topic, metadata and metadata.error)
            return
        starts = {p: self._next_offsets.get(p, 0) for p in sorted(metadata.partitions)}  # 0 = beginning
        schemas = ReadToEnd(consumer, topic, starts, self.read_timeout_s, max_messages=500, poll_s=0.2)
        try:
            for records in schemas:
                for msg in records:
                    partition, offset = msg.partition(), msg.offset()
                    if partition is not None and offset is not None:
                        self._next_offsets[partition] = offset + 1
                    self._learn(msg.key(), msg.value())
        except ReadError as exc:  # what was read is kept; a later miss reads from there
            log.warning("schemas topic: %s", exc)
        self._loaded = True

    def _learn(self, key: bytes | None, value: bytes | None) -> None:
        # The fingerprint is recomputed from the schema, so a wrong key or garbage cannot poison the cache.
        try:
            schema = make_schema(json.loads(value or b""))
        except Exception as exc:  # anything a malformed record can make json or fastavro raise
            log.warning("ignoring unreadable record on the schemas topic (key %r): %s", key, exc)
            return
        self._schemas.setdefault(schema.fingerprint, schema.json)
        self._last_miss.pop(schema.fingerprint, None)
        # A producer's library may compute another fingerprint than the specification's (Apache avro for
        # Python keeps a logical type's {"type": "long"} in its canonical form): records carry the key it
        # published, so that key finds the schema too. The first schema published under a key keeps it.
        if key is not None and len(key) == 8 and key != schema.fingerprint:
            log.info("schemas topic: %s published under %s, not its fingerprint", schema.full_name, key.hex())
            self._schemas.setdefault(key, schema.json)
            self._last_miss.pop(key, None)


# --- Confluent Schema Registry ---------------------------------------------------------------------------

_registry_clients: dict[str, Any] = {}
_registry_clients_lock = threading.Lock()


def registry_client(url: str) -> Any:
    """One client per registry URL in this process (its caches are shared; ``mock://`` URLs share a store)."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    with _registry_clients_lock:
        if url not in _registry_clients:
            # new_client gives the in-process mock for mock:// URLs, a REST client otherwise.
            _registry_clients[url] = SchemaRegistryClient.new_client({"url": url})
        return _registry_clients[url]


def home_topics(settings: Settings) -> dict[str, str]:
    """The topic each record type is written to, which names its registry subject."""
    events = settings.events_topic
    return {
        "ClickEvent": events,
        "SearchEvent": events,
        "PurchaseEvent": events,
        "UserDeletion": events,
        "CatalogItem": settings.catalog_topic,
        "Recommendation": settings.recommendations_topic,
        "DeadLetter": settings.dead_letter_topic,
        "UserState": settings.state_changelog_topic,
        "FineTuneTrigger": settings.triggers_topic,
        "ModelUpdate": settings.model_updates_topic,
        "CanaryReport": settings.canary_reports_topic,
    }


def subject_for(settings: Settings, schema: RecordSchema) -> str:
    """``<topic>-value`` (TopicNameStrategy), but ``<topic>-<record full name>`` on the events topic.

    The events topic carries four record types; under one ``-value`` subject a registry's default BACKWARD
    compatibility would reject the second type, so that topic uses TopicRecordNameStrategy.
    """
    topics = home_topics(settings)
    topic = topics.get(schema.name, f"streamrec.{schema.name}")
    if list(topics.values()).count(topic) > 1:
        return f"{topic}-{schema.full_name}"
    return f"{topic}-value"


class RegistryCodec(AvroCodec):
    """AvroCodec with Confluent framing (``00`` + 4-byte schema id + body) for what it encodes.

    Decodes both framings: ``00`` through the registry, ``C3 01`` (backends without a registry client)
    through the single-object path and its resolver. A registry that does not know an id gives
    ``DecodeError("unknown_schema")``; a registry that cannot be reached raises its own error, because
    that record is valid and must be retried, not dead-lettered.
    """

    def __init__(
        self,
        settings: Settings,
        schemas: dict[str, RecordSchema] | None = None,
        resolver: WriterSchemaResolver | None = None,
        *,
        auto_register: bool = True,
        retry_interval_s: float = 1.0,
    ) -> None:
        if not settings.schema_registry_url:
            raise ValueError("RegistryCodec needs settings.schema_registry_url")
        super().__init__(schemas, resolver)
        self.settings = settings
        self.client = registry_client(settings.schema_registry_url)
        self.auto_register = auto_register
        self.retry_interval_s = retry_interval_s
        self._ids: dict[bytes, int] = {}  # writer fingerprint -> registry id, for encoding
        self._by_id: dict[int, RecordSchema] = {}
        self._id_misses: dict[int, float] = {}

    def schema_id(self, schema: RecordSchema) -> int:
        """The registry id of a writer schema: registered on first use, or looked up (no auto-register)."""
        found = self._ids.get(schema.fingerprint)
        if found is None:
            from confluent_kafka.schema_registry import Schema

            subject = subject_for(self.settings, schema)
            registry_schema = Schema(schema.json, schema_type="AVRO")
            if self.auto_register:
                found = int(self.client.register_schema(subject, registry_schema))
            else:
                found = int(self.client.lookup_schema(subject, registry_schema).schema_id)
            self._ids[schema.fingerprint] = found
            self._by_id[found] = schema
        return found

    def header(self, name: str) -> bytes:
        return registry_header(self.schema_id(self.schemas[name]))

    def encode(self, name: str, record: dict[str, Any], schema: RecordSchema | None = None) -> bytes:
        schema = schema or self.schemas[name]
        single_object = super().encode(name, record, schema)  # validates before anything is registered
        return registry_header(self.schema_id(schema)) + single_object[HEADER_LEN:]

    def writer_schema(self, data: bytes) -> RecordSchema:
        if isinstance(data, bytes | bytearray) and data[:1] == REGISTRY_MAGIC:
            return self._registry_writer(registry_schema_id(data))
        return super().writer_schema(data)

    def decode(self, data: bytes, accept: Iterable[str] | None = None) -> tuple[str, dict[str, Any]]:
        if isinstance(data, bytes | bytearray) and data[:1] == REGISTRY_MAGIC:
            writer = self._registry_writer(registry_schema_id(data))
            return self.read_body(writer, data[REGISTRY_HEADER_LEN:], accept)
        return super().decode(data, accept)

    def _registry_writer(self, schema_id: int) -> RecordSchema:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        writer = self._by_id.get(schema_id)
        if writer is not None:
            return writer
        missed = self._id_misses.get(schema_id)
        if missed is not None and time.monotonic() - missed < self.retry_interval_s:
            raise DecodeError("unknown_schema", f"no schema with registry id {schema_id}")
        try:
            found = self.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code != 404:
                raise
            self._id_misses[schema_id] = time.monotonic()
            raise DecodeError("unknown_schema", f"no schema with registry id {schema_id}") from exc
        if found.schema_type not in (None, "AVRO"):
            raise DecodeError("unknown_schema", f"registry id {schema_id} is a {found.schema_type} schema")
        try:
            writer = make_schema(json.loads(found.schema_str))
        except Exception as exc:  # a registered schema this process cannot parse (references, ...)
            raise DecodeError("unknown_schema", f"registry id {schema_id}: {exc}") from exc
        self._by_id[schema_id] = writer
        return writer


def make_codec(settings: Settings, *, resolve_from_topic: bool = True) -> Codec:
    """The codec for this deployment: registry framing when a registry URL is set, else single-object.

    With ``resolve_from_topic`` (readers: the worker, consumers), unknown single-object fingerprints are
    looked up on the schemas topic; producers need no resolver.
    """
    resolver = SchemaTopicResolver(settings) if resolve_from_topic else None
    if settings.schema_registry_url:
        return RegistryCodec(settings, resolver=resolver)
    return AvroCodec(resolver=resolver)
