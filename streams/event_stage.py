"""The worker's high-rate event path: a batched confluent-kafka stage with RocksDB state and a changelog.

Per micro-batch: decode, validate (rejects go to the dead-letter topic with a reason), de-duplicate by event
id, apply to per-user state, encode every changed user in one encoder call and search the index once, publish
the recommendations and the changed states to the changelog; once they are delivered, write the states locally
and only then commit the input offsets. A crash anywhere before the commit redelivers the batch;
de-duplication by event id makes that harmless (at-least-once in, idempotent state).

Delivery is pipelined (``delivery_pipeline_depth`` batches deep): while batch N's records travel to the
broker, the batches after it are consumed, applied and published. Batches are settled (delivered, written,
committed) in order, each as soon as its reports are in; the stage waits for the oldest only when more than
the depth are in flight. A later batch reads the states of the ones in flight from the cache, or from their
pending changes (newest first), never from RocksDB, which they have not written yet. If a batch's delivery
fails, it and every batch after it are consumed again from its offsets.

A backlog batch is ranked in the serving thread while its changelog goes out and earlier batches settle. With
``ranking_process`` the ranking runs in a child process holding the model, and it is pipelined too: it runs
on while the next batch is decoded and applied. That batch changes no state before the ranking has read it
(states change in place), and publishes the ranked recommendations before its own, so each user's
recommendations keep the order of their events. A batch whose recommendations are not out yet is not settled.
The child is sent the changed states as the bytes just encoded for the changelog and reads their windows
there (``RanksEncoded``): the worker process is the busier of the two.

One writer per user's state: the consumer group subscribes to the events topic only. Whichever partitions the
assignor gives a member, the member also assigns itself the backfill topic's partitions of the same numbers
(the topics are co-partitioned: same count, same key, same partitioner). So the owner of a user's state is
the only one that applies that user's replayed history, under any assignment strategy. Backfill events
change state and the changelog like live ones; their recommendations go to the shadow topic, or nowhere.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from streamrec import native
from streamrec.abuse import AbuseRules
from streamrec.catalog import Catalog
from streamrec.dead_letters import dead_letter
from streamrec.partitioner import partition_of
from streamrec.records import (
    EVENT_SCHEMAS,
    CatalogItem,
    Event,
    EventKind,
    RankedBatch,
    UserState,
)
from streamrec.serde import AvroCodec, DecodeError, RecommendationWriter
from streamrec.settings import Settings
from streamrec.state import (
    DUPLICATE,
    HISTORY,
    RATE_LIMITED,
    StateBytes,
    StateLimits,
    appends_to_history,
    apply_screened,
    decode_state_bytes,
    encode_state_bytes,
    largest_state_bytes,
)
from streamrec.streams.canary import Canary, SplitBatch
from streamrec.streams.client import PRODUCER_REFUSED
from streamrec.streams.kafka_security import client_config
from streamrec.streams.metrics import WorkerMetrics
from streamrec.streams.reading import consume_arrived
from streamrec.streams.schema_store import RegistryCodec, publish_schema
from streamrec.streams.state_store import (
    ERASURE_KEY,
    CachedState,
    StateCache,
    StateStore,
    erasure_digest,
    erasure_value,
)
from streamrec.triggers import NO_IDS, OnlineAccuracy
from streamrec.validation import Rejection, ValidationRules, shown, validate_deletion, validate_event

log = logging.getLogger(__name__)

ACCEPTED_SCHEMAS = frozenset([*EVENT_SCHEMAS, "UserDeletion"])
# what workers write for others to read
OUTPUT_SCHEMAS = ("Recommendation", "DeadLetter", "FineTuneTrigger", "CanaryReport")
ANY_PARTITION = -1  # librdkafka's RD_KAFKA_PARTITION_UA: the producer's partitioner picks (murmur2 by key)
THREAD_MIN_USERS = 200  # users to rank from which a batch's ranking runs in the serving thread
IDLE_POLL_S = 0.002  # with batches in flight, how long an idle loop waits for records before settling them


class Recommender(Protocol):
    """What the stage needs from a model (implemented by streamrec.models.serving.Recommender, and by
    streamrec.models.ranking_process.ProcessRecommender, which ranks in a child process)."""

    model_version: str
    index_version: str

    @property
    def serve_len(self) -> int:
        """The newest events per user it encodes (the model's serving window)."""
        ...

    def upsert_items(self, items: list[CatalogItem]) -> None: ...

    def rank(self, users: list[UserState], k: int) -> RankedBatch: ...

    def prepare(self, users: list[UserState], k: int) -> Callable[[], RankedBatch]:
        """``rank`` in two steps: read the states now, rank them in the call returned (they may change)."""
        ...


@runtime_checkable
class RanksEncoded(Protocol):
    """A recommender that reads the users to rank from their states' bytes (``encode_state_bytes``, which the
    stage has already made for the changelog): the ranking process
    (streamrec.models.ranking_process.ProcessRecommender), so that the busier worker process does not."""

    def prepare_encoded(self, states: list[bytes], k: int) -> Callable[[], RankedBatch]: ...


def prepare_ranking(
    recommender: Recommender, users: list[UserState], encoded: list[bytes], k: int
) -> Callable[[], RankedBatch]:
    """``recommender.prepare``: the users' states read now (from their bytes, for a recommender that reads
    those), ranked in the call returned."""
    if isinstance(recommender, RanksEncoded):
        return recommender.prepare_encoded(encoded, k)
    return recommender.prepare(users, k)


def sends_ahead(ranker: Recommender | Canary) -> bool:
    """Whether ``ranker``'s ``prepare`` only sends its request (to a ranking process, which answers its
    requests in order), so that the stage's own thread may make it while an earlier ranking is going on."""
    models = (ranker.serving, ranker.candidate) if isinstance(ranker, Canary) else (ranker,)
    return all(isinstance(model, RanksEncoded) for model in models)


def fetch_config(settings: Settings) -> dict[str, object]:
    """How the event stage's consumer fetches (librdkafka settings): its broker, fetch wait and prefetch
    queue. Also the bench's broker round trip, which measures a consumer configured as the stage's."""
    return {
        **client_config(settings),
        "fetch.wait.max.ms": max(1, settings.batch_wait_ms),
        "queued.max.messages.kbytes": settings.consumer_queue_kbytes,
        "queued.min.messages": settings.consumer_queue_messages,
        "fetch.queue.backoff.ms": settings.consumer_fetch_backoff_ms,
    }


def arrival_ms(record_timestamp: tuple[int, int], event_time: int) -> int:
    """When a record reached Kafka: its timestamp (create or log-append time), else the event's own time."""
    kind, at = record_timestamp
    return at if kind != TIMESTAMP_NOT_AVAILABLE and at > 0 else event_time


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


# Errors after which an idempotent producer never delivers again: librdkafka raises the fatal ones, and a
# broker may fence the producer's id or epoch (the embedded broker answers PRODUCER_FENCED to every write
# once a delivery has timed out and librdkafka has bumped the epoch). The stage replaces its producers.
PRODUCER_GONE = PRODUCER_REFUSED | {KafkaError._FATAL}


STATS_INTERVAL_MS = 5_000


def broker_up(stats: str) -> bool:
    """Whether librdkafka's statistics (JSON, ``stats_cb``) show a connection to a broker that is up."""
    try:
        brokers = json.loads(stats).get("brokers") or {}
    except ValueError:
        return False
    return any(isinstance(b, dict) and b.get("state") == "UP" for b in brokers.values())


def producer_gone(err: KafkaError) -> bool:
    return bool(err.fatal()) or err.code() in PRODUCER_GONE


@dataclass(slots=True)
class Erasure:
    """A UserDeletion record, decoded: erase the user, and refuse their events up to ``timestamp``."""

    timestamp: int


Applied = tuple[Event | Erasure, bool, Message]  # an event or erasure, whether from backfill, its record
# after applying a user's events: state, its bytes, erased at, encoding, live cause, backfill cause, kinds
UserUpdate = tuple[UserState, StateBytes, int, bytes, Event | None, Event | None, list[EventKind]]
CacheUpdate = tuple[int, UserState, StateBytes, int, int]  # partition, state, bytes, erased at, encoded size


@dataclass
class Ranking:
    """A batch's ranking running in the serving thread (in a child process with ``ranking_process``); its
    recommendations go out with its flight."""

    changed: list[tuple[UserState, Event, bool]]  # (state, cause, caused by backfill), row by row
    flight: InFlight
    recommender: Recommender | Canary
    result: Future[tuple[RankedBatch | SplitBatch, float]]
    taken: threading.Event = field(default_factory=threading.Event)  # the states are read: they may change


@dataclass
class InFlight:
    """A published batch whose records are not all delivered yet: settled (states written locally, offsets
    committed) once they are."""

    first_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    last_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    changes: dict[int, dict[str, bytes | None]] = field(default_factory=dict)  # None = user erased
    erasures: dict[int, dict[bytes, int]] = field(default_factory=dict)  # erasure digest -> erased at
    erased: dict[int, list[str]] = field(default_factory=dict)  # users erased: purged locally once settled
    changelog_offsets: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    producer_gone: bool = False  # a failure the producer cannot recover from (``PRODUCER_GONE``)
    sent: int = 0
    acked: int = 0
    open: bool = False  # its recommendations are still being ranked: not settled before they are published

    @property
    def delivered(self) -> bool:
        return self.acked >= self.sent

    @property
    def answered(self) -> bool:
        """Every report is in, or one has failed: nothing more to wait for."""
        return self.delivered or bool(self.failures)

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        """A record's report: a Python call for every record, so it only counts it and keeps a failure."""
        self.acked += 1
        if err is not None:
            self.failures.append(f"{msg.topic()}[{msg.partition()}]: {err}")
            self.producer_gone = self.producer_gone or producer_gone(err)

    def on_changelog_delivery(self, err: KafkaError | None, msg: Message) -> None:
        """A changelog record's report (``on_delivery``), which also moves its partition's offset."""
        self.on_delivery(err, msg)
        if err is not None:
            return
        p, offset = msg.partition(), msg.offset()
        assert p is not None and offset is not None  # set on every delivered record
        if offset > self.changelog_offsets.get(p, -1):
            self.changelog_offsets[p] = offset

    def pending_state(self, partition: int, user_id: str) -> tuple[bool, bytes | None]:
        """(True, bytes or None if erased) when this batch changed the user, else (False, None)."""
        users = self.changes.get(partition)
        if users is None or user_id not in users:
            return False, None
        return True, users[user_id]

    def pending_erasure(self, partition: int, user_id: str) -> int:
        """When this batch erased the user; 0 when it did not."""
        erased = self.erasures.get(partition)
        return erased.get(erasure_digest(user_id), 0) if erased else 0


class RecordLimitsError(ValueError):
    """Settings under which a state or recommendation could exceed the largest record a worker may produce."""


def check_record_limits(settings: Settings, limits: StateLimits) -> None:
    """Refuse to start when the validation limits let a user's state grow past ``max_record_bytes``: its
    changelog record could then never be written, and the user's events never settled."""
    largest = largest_state_bytes(limits, settings.max_id_bytes, settings.max_query_bytes)
    if largest > settings.max_record_bytes:
        raise RecordLimitsError(
            f"a user's state can take {largest:,} bytes with these limits (STREAMREC_HISTORY_LENGTH, "
            "STREAMREC_MAX_PURCHASED, STREAMREC_MAX_ID_BYTES, STREAMREC_MAX_QUERY_BYTES), more than "
            f"STREAMREC_MAX_RECORD_BYTES ({settings.max_record_bytes:,}): lower them or raise it"
        )


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
        check_record_limits(settings, self.limits)
        self.rules = ValidationRules.from_settings(settings)
        self.abuse = AbuseRules.from_settings(settings)
        self.backfill_rules = ValidationRules.from_settings(settings, historical=True)
        self.events_topic = settings.events_topic
        self.backfill_topic = settings.backfill_topic
        self.cooperative = settings.assignment_strategy == "cooperative-sticky"
        self.store = StateStore(settings)
        self.cache = StateCache(settings.state_cache_users, settings.state_cache_mb << 20)
        self.rec_writer = RecommendationWriter()  # byte for byte codec.encode("Recommendation", ...), faster
        self._pending_model: Recommender | None = None
        # A candidate served beside the model to a share of users (streams/canary.py), and one to come:
        # (candidate or None to end it, share, started at)
        self.canary: Canary | None = None
        self._pending_canary: tuple[Recommender | None, float, int] | None = None
        self._lock = threading.Lock()
        self.ready = threading.Event()  # set once partitions are assigned and restored
        self.error: BaseException | None = None
        self._consumer: Consumer | None = None
        self._assigned: dict[str, set[int]] = {}
        self._partition_count = 0  # of the events topic: a record's key must hash to its partition
        self._max_event_bytes = settings.max_event_bytes
        self._producer: Producer | None = None
        self._changelog_producer: Producer | None = None  # set when the changelog's compression differs
        self._producers_gone = False  # a delivery failed in a way the producers cannot recover from
        # When the clients lost every broker (epoch ms; None: connected), for /health: set by librdkafka's
        # error callback, cleared once records are consumed or partitions assigned again.
        self.disconnected_since: int | None = None
        self._lost_brokers = False  # since the last assignment: its producers are replaced then
        # (topic, partition) -> the last offset committed, for the events and the backfill topic
        self._committed: dict[tuple[str, int], TopicPartition] = {}
        self._flights: deque[InFlight] = deque()  # published batches not settled yet, oldest first
        self._ranking: Ranking | None = None  # the newest batch's, while the serving thread ranks it
        # A batch's ranking runs on while the next batch is decoded and applied only when it runs in a child
        # process: in this one, both threads run Python under one GIL and it was no faster
        # (docs/performance.md, round 10).
        self.defer_ranking = settings.ranking_process and settings.delivery_pipeline_depth > 0
        # One serving thread: a batch's ranking runs beside its changelog and the settling of earlier batches.
        self._serving = ThreadPoolExecutor(1, thread_name_prefix="streamrec-serving")

    # --- control from other threads -------------------------------------------------------------------

    def swap_model(self, recommender: Recommender) -> None:
        """Serve a newly promoted model from the next micro-batch on (encoder and its index together)."""
        with self._lock:
            self._pending_model = recommender

    def set_canary(self, candidate: Recommender | None, share: float, started_at: int = 0) -> None:
        """Serve ``candidate`` to ``share`` of the users beside the model from the next micro-batch on; None
        ends the canary. A newly promoted model ends it too (it was judged against the one before)."""
        with self._lock:
            self._pending_canary = (candidate, share, started_at)

    def canary_info(self) -> dict[str, object] | None:
        canary = self.canary
        return canary.info() if canary is not None else None

    def pending_model_version(self) -> str | None:
        """The version of a model swapped in but not served yet."""
        with self._lock:
            return self._pending_model.model_version if self._pending_model is not None else None

    def lookup(self, user_id: str) -> UserState | None:
        """A user's state if one of this worker's partitions holds it (RocksDB reads are thread-safe)."""
        for partition in list(self.store.partitions):
            try:
                raw = self.store.get_many(partition, [user_id])[0]
            except KeyError:
                continue  # revoked meanwhile
            if raw is not None:
                return decode_state_bytes(raw)[0]
        return None

    # --- the loop ---------------------------------------------------------------------------------------

    def _make_clients(self) -> tuple[Consumer, Producer, Producer | None]:
        """The consumer, the producer of what others read (recommendations, dead letters), and the
        changelog's own producer when its compression differs (None: the same producer writes both)."""
        s = self.settings
        consumer = Consumer(
            fetch_config(s)
            | {
                "group.id": s.events_group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": s.session_timeout_ms,
                "heartbeat.interval.ms": s.heartbeat_interval_ms,
                "partition.assignment.strategy": s.assignment_strategy,
                "client.id": self.worker_id,
                "error_cb": self._on_client_error,
                # librdkafka's statistics, from consume: a broker connection up again ends a disconnection
                # that neither records nor a new assignment end (an idle worker, a broker that kept its log)
                "stats_cb": self._on_client_stats,
                "statistics.interval.ms": STATS_INTERVAL_MS,
                # A group joined before the events topic exists (a broker restarted empty, topics being
                # created) is assigned nothing until the next metadata refresh: 10 s, not librdkafka's 5 min.
                "topic.metadata.refresh.interval.ms": 10_000,
            }
        )
        return consumer, *self._make_producers()

    def _on_client_error(self, err: KafkaError) -> None:
        """A client-wide error of the consumer (called from consume, in the stage's thread): the broker out of
        reach is what /health reports; the clients reconnect by themselves. Only the consumer's count: it
        fetches all the time, where an idle producer's connection may be closed by the broker."""
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._lost_brokers = True
            if self.disconnected_since is None:
                self.disconnected_since = now_ms()
                log.warning("%s lost the broker: %s", self.worker_id, err.str())

    def _on_client_stats(self, raw: str) -> None:
        """The consumer's statistics (every STATS_INTERVAL_MS, called from consume in the stage's thread):
        once a broker connection is up again, /health says connected. Producers are replaced at the next
        assignment all the same (``_lost_brokers``)."""
        if self.disconnected_since is not None and broker_up(raw):
            log.info("%s reaches the broker again", self.worker_id)
            self.disconnected_since = None

    def _make_producers(self) -> tuple[Producer, Producer | None]:
        """The producer of what others read, and the changelog's own when its compression differs."""
        s = self.settings
        changelog = None
        if s.internal_compression != s.output_compression:
            changelog = self._make_producer(s.internal_compression)
        return self._make_producer(s.output_compression), changelog

    def _replace_producers(self) -> tuple[Producer, Producer | None]:
        """New producers for ones that can deliver no more (a new producer id and epoch); whatever the old
        ones still held belongs to batches that are consumed again."""
        for old in (self._producer, self._changelog_producer):
            if old is not None:
                old.purge()
                old.flush(0)
        self._producer, self._changelog_producer = self._make_producers()
        self._producers_gone = False
        self.metrics.producer_restarts.inc()
        log.warning("%s: the producers could deliver no more; replaced them", self.worker_id)
        return self._producer, self._changelog_producer

    def _make_producer(self, compression: str) -> Producer:
        s = self.settings
        return Producer(
            {
                **client_config(s),
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "compression.type": compression,
                "partitioner": "murmur2_random",
                "message.max.bytes": s.max_record_bytes,
                "queue.buffering.max.messages": 1_000_000,  # bounded by bytes instead
                "queue.buffering.max.kbytes": s.producer_queue_kbytes,
                "client.id": self.worker_id,
            }
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Restore before fetching starts, then take the backfill partitions of the same numbers along.
        self.cache.clear()
        if self._lost_brokers and self._producer is not None:
            # Back after losing every broker: one that restarted empty (the embedded broker) forgot the
            # producers' ids, and an idempotent producer would retry against it until its records time out.
            # New producers cost nothing on a broker that kept them.
            self._replace_producers()
        self.disconnected_since, self._lost_brokers = None, False  # the group answered
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
        try:
            self._settle_inflight(wait=True)
        except DeliveryFailed as exc:  # not committed: the next owner consumes it again
            log.error("batches in flight not delivered before a revoke: %s", exc)
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
        modes = native.active()
        log.info(
            "%s hot path: %s",
            self.worker_id,
            "compiled (mypyc)" if set(modes.values()) == {"compiled"} else f"Python sources {sorted(modes)}",
        )
        consumer, producer, changelog = self._make_clients()
        self._consumer, self._producer, self._changelog_producer = consumer, producer, changelog
        topics = consumer.list_topics(timeout=10).topics
        counts = {
            name: (len(meta.partitions) if meta.error is None else None)
            for name in (self.events_topic, self.backfill_topic)
            if (meta := topics.get(name)) is not None
        }
        check_co_partitioned(counts, self.events_topic, self.backfill_topic)
        self._partition_count = counts[self.events_topic] or 0
        self._publish_output_schemas(producer)
        consumer.subscribe([self.events_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        wait_s, size = self.settings.batch_wait_ms / 1000, self.settings.batch_size
        try:
            while not stop.is_set():
                self._between_batches()
                # A batch is what arrived while the previous one was processed: under a backlog it fills
                # up to batch_size (per-batch costs amortised, more coalescing per user); at low load a
                # record is taken as soon as it arrives instead of after the whole wait.
                try:
                    msgs = consumer.consume(num_messages=size, timeout=0)
                    if not msgs:
                        # Idle: publish the recommendations being ranked, and settle what is in of the batches
                        # in flight while waiting for the next record.
                        self._publish_pending()
                        timeout = min(wait_s, IDLE_POLL_S) if self._flights else wait_s
                        msgs = consume_arrived(consumer, size, timeout)
                        if not msgs:
                            self._settle_inflight(wait=False)
                            continue
                    self.process(msgs)
                except DeliveryFailed as exc:
                    # Nothing of the failed batches was committed or written locally; they are consumed again.
                    log.error("batch not delivered, retrying: %s", exc)
                    if self._producers_gone:
                        producer, changelog = self._replace_producers()
                    stop.wait(1.0)
        finally:
            try:
                self._settle_inflight(wait=True, timeout_s=10)
            except DeliveryFailed as exc:
                log.error("last batch not delivered at stop, it is consumed again: %s", exc)
            for still in (self._producer, self._changelog_producer):  # replaced ones are purged
                try:
                    if still is not None:
                        still.flush(10)
                except KafkaException as exc:  # a failed producer: what it held is consumed again
                    log.error("%s: producer failed at stop: %s", self.worker_id, exc.args[0].str())
            self._commit_synchronously(consumer)
            consumer.close()  # leaves the group now, so partitions move without waiting for a timeout
            self.store.close()
            self._serving.shutdown(wait=False)

    def _publish_output_schemas(self, producer: Producer) -> None:
        """The writer schemas of what workers publish go to the schemas topic, as every producer's do, so a
        reader in any language can look up the fingerprint at the head of each record (docs/contracts.md).
        A registry deployment registers them through its codec instead."""
        if isinstance(self.codec, RegistryCodec):
            return
        failures: list[KafkaError] = []
        for name in OUTPUT_SCHEMAS:
            publish_schema(
                producer,
                self.settings,
                self.codec.schema(name),
                on_delivery=lambda err, _msg: failures.append(err) if err is not None else None,
            )
        if producer.flush(10) or failures:
            log.warning("output schemas not published to %s: %s", self.settings.schemas_topic, failures[:1])

    def _between_batches(self) -> None:
        with self._lock:
            pending, self._pending_model = self._pending_model, None
            canary, self._pending_canary = self._pending_canary, None
        if pending is not None:
            pending.upsert_items(self.catalog.items())
            self.recommender = pending
            self.accuracy.reset()
            self.canary = None
            log.info("now serving model %s", pending.model_version)
        if canary is not None:
            self._start_canary(*canary)
        changes = self.catalog.drain_changes()
        if changes:
            self.recommender.upsert_items(changes)
            if self.canary is not None:
                self.canary.upsert_items(changes)
            self.metrics.catalog_items.set(len(self.catalog))

    def _start_canary(self, candidate: Recommender | None, share: float, started_at: int) -> None:
        if candidate is None or share <= 0:
            if self.canary is not None:
                log.info("canary %s ended", self.canary.candidate.model_version)
            self.canary = None
            return
        if self.canary is None or self.canary.candidate is not candidate:
            candidate.upsert_items(self.catalog.items())
        self.canary = Canary(self.recommender, candidate, share, started_at)
        log.info("serving canary %s to %.1f%% of users", candidate.model_version, 100 * share)

    # --- one micro-batch --------------------------------------------------------------------------------

    def process(self, msgs: list[Message]) -> BatchOutcome:
        assert self._consumer is not None and self._producer is not None
        started = time.perf_counter()
        if msgs[-1].error() is None:
            self.disconnected_since = None  # records arrive: the broker is back
        out = BatchOutcome()
        flight = InFlight()
        clock = time.perf_counter
        phases = self.metrics.batch_phase_seconds

        # 1. decode and validate, in input order (rejects are dead-lettered); valid events grouped per
        # (partition, user)
        by_partition = self._decode_batch(msgs, flight, out)
        t_decoded = clock()
        phases.labels("decode").inc(t_decoded - started)

        # 2. apply to state, once the batch being ranked has read its states: they change in place
        if self._ranking is not None:
            self._ranking.taken.wait()
        changed, changed_bytes, cache_updates = self._apply_batch(by_partition, flight, out)
        changes = flight.changes
        producer = self._producer
        t_applied = clock()
        phases.labels("state").inc(t_applied - t_decoded)

        # 3. one encoder call and one index search for every user to recommend to, in the serving thread:
        # the encoder and the index search release the GIL, so this batch's changelog and the settling of
        # earlier batches run meanwhile. With a ranking process (``defer_ranking``) the ranking also runs on
        # while the next batch is decoded and applied: that batch changes no state before this ranking has
        # read them (above), and publishes these recommendations here, before its own (per user, in order).
        # A small batch is ranked right here: with two threads running Python, each hand-over of the GIL can
        # wait out the interpreter's switch interval (5 ms), more than the overlap saves at low load.
        # The previous batch's ranking is published once this one's is queued behind it, so the ranking
        # process starts on this batch as soon as it has answered that one, not after its records are written.
        to_rank, k = [s for s, _, _ in changed], self.settings.top_k  # row u of changed
        threaded = len(to_rank) >= THREAD_MIN_USERS
        previous = self._ranking
        if previous is not None and not threaded:
            self._publish_ranking(previous, out)
            previous = None
        ranking: Ranking | None = None
        ranked_here: tuple[RankedBatch | SplitBatch | None, float] = (None, 0.0)
        flight.open = bool(changed)
        if threaded:
            ranking = self._rank_in_thread(changed, to_rank, changed_bytes, flight)
        elif to_rank:
            ranked_here = self._timed_rank(self.canary or self.recommender, to_rank, changed_bytes, k)
        try:
            if previous is not None:
                self._publish_ranking(previous, out)
            # 4. the changelog, keyed by user, on the partition of the same number
            changelog, writer = self.settings.state_changelog_topic, self._changelog_producer or producer
            for p, user_changes in changes.items():
                for user_id, value in user_changes.items():
                    self._produce(
                        writer, changelog, user_id.encode(), value, flight, p, flight.on_changelog_delivery
                    )
            for p, markers in flight.erasures.items():
                for digest, erased_at in markers.items():
                    self._produce(
                        writer,
                        changelog,
                        ERASURE_KEY + digest,
                        erasure_value(erased_at),
                        flight,
                        p,
                        flight.on_changelog_delivery,
                    )
            # The next batch reads these states from the cache (a failure anywhere clears it)
            for p, user_changes in changes.items():
                for user_id, value in user_changes.items():
                    if value is None:
                        self.cache.drop(p, user_id)
            for p, state, parts, erased_at, size in cache_updates:
                self.cache.put(p, state.user_id, (state, parts, erased_at), size)
            phases.labels("produce").inc(clock() - t_applied)

            # 5. settle the earlier batches whose reports are in, and wait for the oldest while more than the
            # pipeline's depth are in flight: here while the serving thread ranks; a small batch, ranked
            # already, publishes first and settles after (step 6), so its recommendations do not wait for
            # earlier batches' acknowledgements.
            self._flights.append(flight)
            if threaded:
                self._settle_flights(keep=max(1, self.settings.delivery_pipeline_depth))
        except BaseException:
            if ranking is not None:
                ranking.result.exception()  # waited for; nothing of it is published: consumed again
            raise
        if ranking is not None and self.defer_ranking:
            self._ranking = ranking  # published by the next batch, or as soon as the stage is idle
        elif ranking is not None:
            self._publish_ranking(ranking, out)
        elif to_rank:
            self._publish(changed, *ranked_here, self.canary or self.recommender, flight, out)

        # 6. the same after publishing, with this batch counted: at most the pipeline's depth stay in flight
        # (none when it is 0: each batch waits for its own delivery)
        self._settle_flights(keep=self.settings.delivery_pipeline_depth)

        self._record(out, time.perf_counter() - started)
        return out

    def _decode_batch(
        self, msgs: list[Message], flight: InFlight, out: BatchOutcome
    ) -> dict[int, dict[str, list[Applied]]]:
        """Decode and validate each record in input order: rejects go to the dead-letter topic, valid events
        and erasures are grouped per partition and user (partition p of the backfill topic holds the same
        users as partition p of the events topic)."""
        producer = self._producer
        assert producer is not None
        first_offsets, last_offsets = flight.first_offsets, flight.last_offsets
        by_partition: dict[int, dict[str, list[Applied]]] = {}
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
                self._dead_letter(producer, msg, outcome, flight)
                out.dead_letters += 1
                continue
            by_partition.setdefault(p, {}).setdefault(outcome[0], []).append((outcome[1], backfill, msg))
        return by_partition

    def _apply_batch(
        self, by_partition: dict[int, dict[str, list[Applied]]], flight: InFlight, out: BatchOutcome
    ) -> tuple[list[tuple[UserState, Event, bool]], list[bytes], list[CacheUpdate]]:
        """Apply each user's events to their state: active users' decoded states come from the cache, the
        others from the changes of the batches in flight (newest first) or else RocksDB, with when the user
        was last erased. Returns the users to recommend to (state, cause, caused by backfill), their
        encodings row by row (a ranking process reads those), and the states to cache once published.

        A user's recommendation is caused by their last live event, else by their last backfill event
        (shadow topic), so consumers of the live topic never see history as new."""
        changed: list[tuple[UserState, Event, bool]] = []
        changed_bytes: list[bytes] = []
        cache_updates: list[CacheUpdate] = []
        applied: Counter[EventKind] = Counter()
        shadow = self.settings.backfill_recommendations == "shadow"
        for p, users in by_partition.items():
            read = self._read_states(p, list(users))
            for user_id, events in users.items():  # in the order of their first event in the batch
                state, parts, erased_at = read[user_id]
                update = self._apply_user(p, user_id, events, state, parts, erased_at, flight, out)
                if update is None:
                    continue
                state, parts, erased_at, encoded, live_cause, backfill_cause, kinds = update
                applied.update(kinds)
                cache_updates.append((p, state, parts, erased_at, len(encoded)))
                if live_cause is not None:
                    changed.append((state, live_cause, False))
                    changed_bytes.append(encoded)
                elif backfill_cause is not None and shadow:
                    changed.append((state, backfill_cause, True))
                    changed_bytes.append(encoded)
        for kind, n in applied.items():
            self.metrics.events.labels(kind.name.lower()).inc(n)
        return changed, changed_bytes, cache_updates

    def _read_states(self, p: int, user_ids: list[str]) -> dict[str, CachedState | tuple[None, None, int]]:
        """Each user's state, its bytes and when the user was last erased (0: never): from the cache, else
        from the batches in flight (newest first) and RocksDB."""
        found: dict[str, CachedState | tuple[None, None, int]] = {}
        from_flights: dict[str, bytes | None] = {}
        erased_in_flight: dict[str, int] = {}
        to_read: list[str] = []  # states not in the cache nor in flight
        erasures_to_read: list[str] = []  # erasure markers not in flight
        for user_id in user_ids:
            hit = self.cache.get(p, user_id)
            if hit is not None:
                found[user_id] = hit
                continue
            pending, raw = self._pending_state(p, user_id)
            if pending:
                from_flights[user_id] = raw
            else:
                to_read.append(user_id)
            erased_at = self._pending_erasure(p, user_id)
            if erased_at:
                erased_in_flight[user_id] = erased_at
            else:
                erasures_to_read.append(user_id)
        stored, erasures = self.store.read(p, to_read, erasures_to_read)
        raw_states = from_flights | dict(zip(to_read, stored, strict=True))
        erased = erased_in_flight | dict(zip(erasures_to_read, erasures, strict=True))
        for user_id, raw in raw_states.items():
            if raw is None:
                found[user_id] = (None, None, erased[user_id])
            else:
                # read back with its bytes: re-encoded after this batch's events, not from scratch
                state, parts = decode_state_bytes(raw)
                found[user_id] = (state, parts, erased[user_id])
        return found

    def _apply_user(
        self,
        p: int,
        user_id: str,
        events: list[Applied],
        state: UserState | None,
        parts: StateBytes | None,
        erased_at: int,
        flight: InFlight,
        out: BatchOutcome,
    ) -> UserUpdate | None:
        """Apply one user's events of this batch in order; their new state with its bytes and erasure time,
        its encoding, the last live and backfill events that changed it and the kinds of the events applied,
        or None when it did not change (or the user was erased).

        An erasure removes the state and remembers when it happened: events up to that time (a retrying
        backend's, a redelivered batch's, a replay's) are refused as ``erased_user``, so an erased user is
        never brought back by old events. A later event starts a new state."""
        producer = self._producer
        assert producer is not None
        live_cause: Event | None = None
        backfill_cause: Event | None = None
        erased = False
        new_events = 0
        kinds: list[EventKind] = []
        for event, backfill, msg in events:
            if isinstance(event, Erasure):
                last = state.last_event_time if state is not None else 0
                erased_at = max(erased_at, event.timestamp, last)
                state, parts, live_cause, backfill_cause, erased, new_events = (
                    None, None, None, None, True, 0
                )  # fmt: skip
                continue
            if event.timestamp <= erased_at:
                self._dead_letter_erased(producer, msg, erased_at, flight)
                out.dead_letters += 1
                continue
            # history is replayed as fast as it can be: only live events are rate limited
            arrived = HISTORY if backfill else arrival_ms(msg.timestamp(), event.timestamp)
            appends = appends_to_history(state, event)
            state, verdict, flag = apply_screened(state, event, self.limits, self.abuse, arrived)
            if verdict == DUPLICATE:
                out.duplicates += 1
                continue
            if verdict == RATE_LIMITED:
                self._dead_letter(producer, msg, self._over_rate(user_id), flight)
                out.dead_letters += 1
                continue
            assert state is not None  # applied
            if flag is not None:
                self.metrics.flagged_users.labels(flag).inc()
                log.warning("%s: a user flagged as a bot (%s)", self.worker_id, flag)
            out.events += 1
            new_events += 1
            kinds.append(event.kind)
            if not appends:
                parts = None  # inserted by time, not appended: re-encode the whole history
            if backfill:
                backfill_cause = event
                continue
            if event.kind is not EventKind.SEARCH and event.item_id is not None:
                self.accuracy.interacted(user_id, event.item_id)
            live_cause = event
        if erased:
            flight.erasures.setdefault(p, {})[erasure_digest(user_id)] = erased_at
            flight.erased.setdefault(p, []).append(user_id)
            self.accuracy.forget(user_id)
            self.metrics.erased_users.inc()
            out.deleted_users += 1
            if state is None:
                flight.changes.setdefault(p, {})[user_id] = None
                return None
        if state is None or not new_events:
            return None
        encoded, parts = encode_state_bytes(state, parts, new_events)
        flight.changes.setdefault(p, {})[user_id] = encoded
        return state, parts, erased_at, encoded, live_cause, backfill_cause, kinds

    def _over_rate(self, user_id: str) -> Rejection:
        rules = self.abuse
        return Rejection(
            "rate_limited",
            f"user {shown(user_id)} is over {rules.rate_per_s:g} events per second after a burst of "
            f"{rules.burst} (STREAMREC_USER_RATE_LIMIT, STREAMREC_USER_RATE_BURST)",
        )

    def _timed_rank(
        self,
        recommender: Recommender | Canary,
        users: list[UserState],
        encoded: list[bytes],
        k: int,
        taken: threading.Event | None = None,
    ) -> tuple[RankedBatch | SplitBatch, float]:
        """Rank the users (``encoded``: their states' bytes, for a recommender that reads those) and how long
        it took; ``taken`` is set once the states are read. A canary ranks each of its groups in one call."""
        started = time.perf_counter()
        try:
            finish = self._prepare(recommender, users, encoded, k)
        finally:
            if taken is not None:
                taken.set()
        return finish(), time.perf_counter() - started

    @staticmethod
    def _prepare(
        recommender: Recommender | Canary, users: list[UserState], encoded: list[bytes], k: int
    ) -> Callable[[], RankedBatch | SplitBatch]:
        if isinstance(recommender, Canary):
            return recommender.prepare_split(users, encoded, k, prepare_ranking)
        return prepare_ranking(recommender, users, encoded, k)

    def _rank_in_thread(
        self,
        changed: list[tuple[UserState, Event, bool]],
        users: list[UserState],
        encoded: list[bytes],
        flight: InFlight,
    ) -> Ranking:
        """Rank ``changed``'s users (their states and encodings, row by row) in the serving thread. A ranking
        process is sent the request from here, at once: it waits there behind the ranking going on, and the
        child starts on it as soon as it has answered that one. Sent by the serving thread, once it had that
        answer and the GIL again, it left the child idle 5-15 ms of every ~200 (docs/performance.md, round
        21)."""
        taken = threading.Event()
        ranker, k = self.canary or self.recommender, self.settings.top_k
        if not sends_ahead(ranker):
            result = self._serving.submit(self._timed_rank, ranker, users, encoded, k, taken)
            return Ranking(changed, flight, ranker, result, taken)
        started = time.perf_counter()
        try:
            finish = self._prepare(ranker, users, encoded, k)
        except Exception as exc:  # as the serving thread's failure would be: raised where it is published
            result = Future()
            result.set_exception(exc)
        else:
            result = self._serving.submit(lambda: (finish(), time.perf_counter() - started))
        finally:
            taken.set()
        return Ranking(changed, flight, ranker, result, taken)

    def _publish_pending(self, out: BatchOutcome | None = None) -> None:
        """Publish the recommendations the serving thread is ranking (the newest batch's), once it is done."""
        if self._ranking is not None:
            self._publish_ranking(self._ranking, out if out is not None else BatchOutcome())

    def _publish_ranking(self, ranking: Ranking, out: BatchOutcome) -> None:
        """Publish a ranking from the serving thread, once it is done."""
        self._ranking = None
        ranked, rank_s = ranking.result.result()
        self._publish(ranking.changed, ranked, rank_s, ranking.recommender, ranking.flight, out)

    def _publish(
        self,
        changed: list[tuple[UserState, Event, bool]],
        ranked: RankedBatch | SplitBatch | None,
        rank_s: float,
        recommender: Recommender | Canary,
        flight: InFlight,
        out: BatchOutcome,
    ) -> None:
        """Produce a batch's recommendations, caused by their events, with the flight of that batch, which
        may then be settled. Each carries the versions of the model that ranked it (a canary's rows too)."""
        started = time.perf_counter()
        phases = self.metrics.batch_phase_seconds
        phases.labels("recommend").inc(rank_s)  # its own time: it overlapped other work
        if ranked is not None:
            producer = self._producer
            assert producer is not None
            publish = now_ms()
            heads = [
                (state.user_id, cause.event_id, cause.timestamp, "backfill" if backfill else "live")
                for state, cause, backfill in changed
            ]
            split = ranked if isinstance(ranked, SplitBatch) else None  # a canary's: versions per row
            whole = None if isinstance(ranked, SplitBatch) else ranked
            model = recommender.serving if isinstance(recommender, Canary) else recommender
            version = model.model_version
            if split is not None:
                bodies = split.bodies(self.rec_writer, heads, publish)
            else:
                bodies = self.rec_writer.bodies(ranked, heads, version, model.index_version, publish)
            header = self.codec.header("Recommendation")
            live, shadow_topic = self.settings.recommendations_topic, self.settings.shadow_topic
            latency = self.metrics.latency
            for u, ((state, cause, backfill), body) in enumerate(zip(changed, bodies, strict=True)):
                key = state.user_id.encode()
                self._produce(producer, shadow_topic if backfill else live, key, header + body, flight)
                if not backfill:
                    if whole is not None:
                        fills = whole.fills[u]
                        extra = [i.item_id for i in fills] if fills else NO_IDS
                        self.accuracy.recommended_row(
                            state.user_id, whole.item_ids, whole.picked[u], extra, version
                        )
                    elif split is not None:
                        self.accuracy.recommended(state.user_id, split.ids(u), split.model_version(u))
                    out.latencies_ms.append(publish - cause.timestamp)
                    latency.observe((publish - cause.timestamp) / 1000)
            out.recommendations += len(changed)
            self.metrics.recommendations.inc(len(changed))
        flight.open = False
        phases.labels("produce").inc(time.perf_counter() - started)

    def _pending_state(self, partition: int, user_id: str) -> tuple[bool, bytes | None]:
        """The user's state as changed by the newest batch in flight that changed it (see InFlight)."""
        for flight in reversed(self._flights):
            pending, raw = flight.pending_state(partition, user_id)
            if pending:
                return pending, raw
        return False, None

    def _pending_erasure(self, partition: int, user_id: str) -> int:
        """When the newest batch in flight that erased the user did; 0 when none did."""
        for flight in reversed(self._flights):
            erased_at = flight.pending_erasure(partition, user_id)
            if erased_at:
                return erased_at
        return 0

    def _settle_flights(self, keep: int, timeout_s: float = 30.0) -> None:
        """Settle the batches in flight, oldest first: each one whose reports are in, and, waiting for them,
        the oldest ones until at most ``keep`` remain. If one cannot be delivered, rewind to its offsets: it
        and every later batch (built on its states) are consumed again, and nothing of them is settled.
        A batch whose recommendations are not published yet (open) is not settled, nor any after it."""
        flights = self._flights
        while flights and not flights[0].open:
            oldest = flights[0]
            try:
                settled = self._settle(oldest, wait=len(flights) > keep, timeout_s=timeout_s)
            except DeliveryFailed:
                offsets: dict[tuple[str, int], int] = {}
                for flight in reversed(flights):  # the oldest batch's offset wins for each partition
                    offsets.update(flight.first_offsets)
                self._producers_gone = self._producers_gone or any(f.producer_gone for f in flights)
                flights.clear()
                if self._ranking is not None:  # its batch is consumed again: nothing of it is published
                    self._ranking.result.exception()
                    self._ranking = None
                self._rewind(offsets)
                raise
            if not settled:
                return
            flights.popleft()

    def _settle_inflight(self, wait: bool, timeout_s: float = 30.0) -> None:
        """Publish the recommendations being ranked, then settle every batch in flight (``wait``), or those
        whose reports are in."""
        self._publish_pending()
        self._settle_flights(keep=0 if wait else len(self._flights), timeout_s=timeout_s)

    def _poll(self, timeout_s: float) -> None:
        """Serve the producers' delivery reports, waiting up to ``timeout_s`` for one (a few ms per producer
        when there are two, so neither one's reports wait for the other's)."""
        assert self._producer is not None
        if self._changelog_producer is None:
            self._serve(self._producer, timeout_s)
            return
        step = min(timeout_s, 0.005)
        self._serve(self._producer, step)
        self._serve(self._changelog_producer, step)

    def _serve(self, producer: Producer, timeout_s: float) -> None:
        """``producer.poll``, which raises a fatal error of an idempotent producer (a broker that lost its
        producer ids answers OUT_OF_ORDER_SEQUENCE_NUMBER): the producers are replaced, and the batches
        in flight fail on their reports, or on the wait for them, and are consumed again."""
        try:
            producer.poll(timeout_s)
        except KafkaException as exc:
            if not producer_gone(exc.args[0]):
                raise
            self._producers_gone = True
            log.error("%s: producer failed: %s", self.worker_id, exc.args[0].str())

    def _settle(self, flight: InFlight, wait: bool, timeout_s: float = 30.0) -> bool:
        """Once ``flight`` is delivered, write its states locally and commit its offsets; whether it is
        settled. Without ``wait`` it only settles a batch whose deliveries are in. Raises DeliveryFailed,
        after clearing the cache, if the batch cannot be delivered."""
        assert self._consumer is not None and self._producer is not None
        phases = self.metrics.batch_phase_seconds
        t0 = time.perf_counter()
        if not flight.delivered:
            self._poll(0)  # serve the delivery reports that are in
        deadline = time.monotonic() + timeout_s
        while not flight.answered:
            left = deadline - time.monotonic()
            if not wait or left <= 0:
                break
            self._poll(min(left, 0.1))
        t1 = time.perf_counter()
        phases.labels("flush").inc(t1 - t0)
        if not wait and not flight.answered:
            return False
        if flight.failures or not flight.delivered:
            # Reports overdue (not answered in ``timeout_s``): the broker is away, or it came back without
            # the producers' ids (a restarted embedded broker), on which an idempotent producer retries
            # forever. New producers cost nothing in the first case and are the cure in the second.
            flight.producer_gone = flight.producer_gone or not flight.answered
            self.cache.clear()  # it holds this batch's states, updated in place: RocksDB has the truth
            raise DeliveryFailed(f"{flight.sent - flight.acked} undelivered, failures: {flight.failures[:5]}")
        for p in flight.changes.keys() | flight.erasures.keys():
            self.store.write(
                p, flight.changes.get(p, {}), flight.changelog_offsets.get(p), flight.erasures.get(p)
            )
        for p, erased in flight.erased.items():
            self.store.purge(p, erased)  # rare: the files keep nothing of an erased user's states
        # Asynchronous: everything before it is delivered, so a lost commit only means the batch is consumed
        # again, and de-duplication makes that harmless; a revoke or a stop commits once more, waiting.
        commits = [TopicPartition(t, p, o + 1) for (t, p), o in flight.last_offsets.items()]
        if commits:
            self._consumer.commit(offsets=commits, asynchronous=True)
            self._committed.update(((tp.topic, tp.partition), tp) for tp in commits)
        phases.labels("commit").inc(time.perf_counter() - t1)
        return True

    def _decode(
        self, msg: Message, now: int, rules: ValidationRules
    ) -> tuple[str, Event | Erasure] | Rejection:
        """The user and what to apply to them, or why the record is refused: too large, not decodable, not
        valid, or not keyed and placed as its user's records are (one writer per user's state)."""
        value, key = msg.value(), msg.key()
        if value is None:
            return Rejection("undecodable", "empty record (tombstone) on the events topic")
        size = len(value) + (len(key) if key is not None else 0)
        limit = self._max_event_bytes
        if size > limit:
            return Rejection("too_large", f"{size} bytes of key and value, more than the {limit} allowed")
        try:
            name, record = self.codec.decode(value, accept=ACCEPTED_SCHEMAS)
        except DecodeError as exc:
            return Rejection(exc.reason, exc.detail)
        applied: Event | Erasure
        if name == "UserDeletion":
            rejection = validate_deletion(record, now, rules)
            user_id, applied = record["user_id"], Erasure(record["timestamp"])
        else:
            event = Event.from_avro(name, record)
            rejection = validate_event(event, now, rules, self.catalog.__contains__)
            user_id, applied = event.user_id, event
        if rejection is None:
            rejection = self._placement(msg, key, user_id)
        return rejection if rejection is not None else (user_id, applied)

    def _placement(self, msg: Message, key: bytes | None, user_id: str) -> Rejection | None:
        """Whether a record is keyed by its user id and sits on that key's partition (Kafka's default
        partitioner, murmur2); otherwise a user's state would split across partitions, and workers."""
        expected = user_id.encode()
        if key != expected:
            got = "no key" if key is None else f"key {shown(key)}"
            return Rejection(
                "wrong_key", f"{got}; events are keyed by their user_id, UTF-8 ({shown(user_id)})"
            )
        partitions = self._partition_count
        if partitions:
            home = partition_of(expected, partitions)
            if home != msg.partition():
                return Rejection(
                    "wrong_partition",
                    f"user {shown(user_id)} belongs on partition {home} of {partitions} (murmur2 of the key, "
                    f"as Kafka's default partitioner), not {msg.partition()}",
                )
        return None

    def _produce(
        self,
        producer: Producer,
        topic: str,
        key: bytes,
        value: bytes | None,
        flight: InFlight,
        partition: int = ANY_PARTITION,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        """Queue a record of the batch in flight. One that cannot be queued (too large, say) fails the
        batch as an undelivered record would: it is consumed again, never settled without it."""
        report = on_delivery or flight.on_delivery
        while True:
            try:
                producer.produce(topic, value=value, key=key, partition=partition, on_delivery=report)
                flight.sent += 1
                return
            except BufferError:
                self._serve(producer, 0.05)  # local queue full: let deliveries drain
            except KafkaException as exc:
                size = len(key) + len(value or b"")
                flight.failures.append(f"{topic}[{partition}]: not queued ({size} bytes): {exc}")
                flight.producer_gone = flight.producer_gone or producer_gone(exc.args[0])
                self.metrics.produce_errors.labels(topic).inc()
                log.error("a record for %s could not be queued (%d bytes): %s", topic, size, exc)
                return

    def _dead_letter(
        self,
        producer: Producer,
        msg: Message,
        rejection: Rejection,
        flight: InFlight,
    ) -> None:
        """The record's coordinates, reason and original bytes on the dead-letter topic. A copy that would
        make the dead letter larger than ``max_record_bytes`` keeps the first bytes of the key and value
        and says how large they were (``key_size``, ``value_size``)."""
        record = dead_letter(
            msg.topic() or "",
            msg.partition() or 0,
            msg.offset() or 0,
            msg.key(),
            msg.value(),
            rejection,
            self.worker_id,
            self.settings.max_record_bytes,
        )
        self._produce(
            producer,
            self.settings.dead_letter_topic,
            record["key"] or b"",
            self.codec.encode("DeadLetter", record),
            flight,
        )
        self.metrics.dead_letters.labels(rejection.reason).inc()

    def _dead_letter_erased(self, producer: Producer, msg: Message, erased_at: int, flight: InFlight) -> None:
        """An erased user's event, refused: its coordinates only, so the dead letter brings nothing back."""
        rejection = Rejection(
            "erased_user",
            f"an event of a user erased at {erased_at}, from no later than that; its key and value are "
            "left out",
        )
        record = dead_letter(
            msg.topic() or "", msg.partition() or 0, msg.offset() or 0, None, None, rejection, self.worker_id
        )
        self._produce(
            producer, self.settings.dead_letter_topic, b"", self.codec.encode("DeadLetter", record), flight
        )
        self.metrics.dead_letters.labels(rejection.reason).inc()

    def _rewind(self, first_offsets: dict[tuple[str, int], int]) -> None:
        """Consume again from these offsets. librdkafka refuses to seek a partition it is not fetching
        (``_STATE``: resetting an offset that a restarted broker no longer has, say): such a partition is
        assigned again at its offset instead, since reading on from where it stands would skip the batch.
        A partition no longer assigned is read again by its next owner, from the committed offset."""
        consumer = self._consumer
        assert consumer is not None
        unmoved = []
        for (topic, p), offset in first_offsets.items():
            try:
                consumer.seek(TopicPartition(topic, p, offset))
            except KafkaException as exc:
                why = exc.args[0].str()
                log.warning("%s: cannot seek %s[%d] (%s); assigning it again", self.worker_id, topic, p, why)
                unmoved.append(TopicPartition(topic, p, offset))
        if unmoved:
            self._assign_again(consumer, unmoved)

    def _assign_again(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Assign these partitions again, at their offsets; the others stay where they are."""
        at = {(tp.topic, tp.partition): tp.offset for tp in partitions}
        try:
            held = consumer.position(consumer.assignment())
            if self.cooperative:
                again = [
                    tp
                    for tp in partitions
                    if (tp.topic, tp.partition) in {(h.topic, h.partition) for h in held}
                ]
                consumer.incremental_unassign(again)
                consumer.incremental_assign(again)
            else:
                consumer.assign(
                    [
                        TopicPartition(h.topic, h.partition, at.get((h.topic, h.partition), h.offset))
                        for h in held
                    ]
                )
        except KafkaException as exc:  # not committed: read again from the committed offset on a rebalance
            log.error("%s: could not assign %s again: %s", self.worker_id, sorted(at), exc.args[0].str())

    def _record(self, out: BatchOutcome, seconds: float) -> None:
        m = self.metrics
        m.batches.inc()
        m.batch_seconds.observe(seconds)
        m.duplicates.inc(out.duplicates)
        rate = self.accuracy.rate
        if rate is not None:
            m.online_hit_rate.set(rate)
        for version, (hits, outcomes) in self.accuracy.by_version().items():  # one or two versions
            m.online_outcomes.labels(version, "hit").set(hits)
            m.online_outcomes.labels(version, "miss").set(outcomes - hits)
            m.online_hit_rate_by_version.labels(version).set(hits / outcomes)
        if self.on_events is not None and out.events:
            self.on_events(out.events)
