"""Delivery is pipelined: batch N+1 is applied on top of batch N before N is delivered, batches are settled
in order, the stage waits for the oldest only beyond the pipeline's depth, and a failed delivery of N rewinds
N and every batch after it without writing or committing anything of them.

Real RocksDB (restored from a real broker's changelog); the Kafka clients of the stage are stand-ins so the
test decides when, and whether, each record is delivered."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, TopicPartition

from streamrec.catalog import Catalog
from streamrec.records import CatalogItem, Event, EventKind, RankedBatch, RecommendedItem, UserState
from streamrec.serde import AvroCodec
from streamrec.settings import Settings
from streamrec.state import decode_state
from streamrec.streams import event_stage
from streamrec.streams.event_stage import BatchOutcome, DeliveryFailed, EventStage

pytestmark = pytest.mark.integration

ITEMS = [f"sku-{n}" for n in range(5)]


@dataclass
class Record:
    """What the stage reads of a consumed message."""

    _topic: str
    _partition: int
    _offset: int
    _value: bytes
    _key: bytes
    _timestamp: tuple[int, int] = (TIMESTAMP_NOT_AVAILABLE, 0)  # the stage takes the event's own time

    def error(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return self._timestamp

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return self._key


@dataclass
class HeldProducer:
    """Holds every produced record's delivery report until the test releases it (the broker answered), then
    reports it on the next poll, as failed if told so. Thread-safe: a test may release from a timer."""

    held: list[tuple[Callable, Record]] = field(default_factory=list)
    produced: list[Record] = field(default_factory=list)  # everything, in order
    released: list[tuple[Callable, Record]] = field(default_factory=list)
    failing: bool = False
    instant: bool = False  # the broker answers every record at once
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def produce(
        self, topic: str, value: bytes | None, key: bytes, partition: int, on_delivery: Callable
    ) -> None:
        p = max(partition, 0)
        with self.lock:
            offset = self.offsets.get((topic, p), 0)
            self.offsets[(topic, p)] = offset + 1
            record = Record(topic, p, offset, value or b"", key)
            self.produced.append(record)
            (self.released if self.instant else self.held).append((on_delivery, record))

    def release(self, count: int | None = None) -> None:
        """The broker answers the oldest ``count`` held records (all by default)."""
        with self.lock:
            count = len(self.held) if count is None else count
            self.released += self.held[:count]
            self.held = self.held[count:]

    def poll(self, timeout: float = 0) -> int:
        with self.lock:
            reports, self.released = self.released, []
        error = KafkaError(KafkaError._MSG_TIMED_OUT) if self.failing else None
        for callback, record in reports:
            callback(error, record)
        return len(reports)


@dataclass
class RecordingConsumer:
    commits: list[TopicPartition] = field(default_factory=list)
    seeks: list[TopicPartition] = field(default_factory=list)
    on_commit: Callable[[list[TopicPartition]], None] | None = None

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        if self.on_commit is not None:
            self.on_commit(offsets)
        self.commits.extend(offsets)

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append(tp)


class Echo:
    """A recommender that recommends the user's newest item (enough to publish something per user)."""

    model_version = "m1"
    index_version = "m1.0"

    def upsert_items(self, items: list[CatalogItem]) -> None:
        pass

    def rank(self, users: list[UserState], k: int) -> RankedBatch:
        return self.prepare(users, k)()

    def prepare(self, users: list[UserState], k: int) -> Callable[[], RankedBatch]:
        newest = [u.history[-1].item_id or ITEMS[0] for u in users]
        return lambda: RankedBatch.of(
            [[RecommendedItem(item, 1.0, "similar_to_recent", "newest")] for item in newest]
        )


class EchoFromBytes(Echo):
    """Echo as a ranking process ranks for the stage: from the states' bytes (the changelog values the stage
    sends), so a batch's recommendations show the states as that batch left them."""

    def prepare_encoded(self, states: list[bytes], k: int) -> Callable[[], RankedBatch]:
        return self.prepare([decode_state(s) for s in states], k)


@pytest.fixture(params=["serving thread", "stage thread", "ranking process"])
def ranked_in(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Large batches are ranked in the serving thread while the changelog goes out and earlier batches are
    settled; small ones in the stage's own thread; with a ranking process (``ranking_process``), a large
    batch's ranking also runs on while the next batch is applied. Every test runs all three ways."""
    monkeypatch.setattr(event_stage, "THREAD_MIN_USERS", 10**9 if request.param == "stage thread" else 1)
    return str(request.param)


def in_mode(settings: Settings, ranked_in: str, **update: object) -> Settings:
    """The test's settings for the way it ranks (see ``ranked_in``)."""
    return settings.model_copy(update={**update, "ranking_process": ranked_in == "ranking process"})


def make_stage(
    settings: Settings, producer: HeldProducer, consumer: RecordingConsumer
) -> tuple[EventStage, AvroCodec]:
    """A stage on real RocksDB (partition 0 assigned) with the test's stand-in clients."""
    catalog = Catalog()
    for item in ITEMS:
        catalog.upsert(CatalogItem(item_id=item, title=item))
    codec = AvroCodec()
    echo = EchoFromBytes() if settings.ranking_process else Echo()  # a ranking process reads the bytes
    stage = EventStage(settings, catalog, echo, codec)
    stage._producer, stage._consumer = producer, consumer  # type: ignore[assignment]
    stage.store.assign([0])
    return stage, codec


def process(stage: EventStage, records: list[Record]) -> BatchOutcome:
    """One batch, then what the stage's loop does when no record is waiting: a ranking still running in the
    serving thread is published (under a backlog it goes out with the next batch, before that one's own)."""
    out = stage.process(records)
    stage._publish_pending(out)
    return out


def recommended(settings: Settings, codec: AvroCodec, producer: HeldProducer) -> list[str]:
    """The item of every recommendation produced, in order."""
    return [
        codec.decode(r.value())[1]["items"][0]["item_id"]
        for r in producer.produced
        if r.topic() == settings.recommendations_topic
    ]


def click(settings: Settings, codec: AvroCodec, offset: int, item: str) -> Record:
    """alice's click on ``item``, as consumed from partition 0 of the events topic at ``offset``."""
    event = Event(f"e{offset}", "alice", EventKind.CLICK, int(time.time() * 1000), item_id=item)
    return Record(
        settings.events_topic, 0, offset, codec.encode(event.schema_name, event.to_avro()), b"alice"
    )


def stored_items(stage: EventStage) -> list[str | None]:
    """The items of alice's history as written locally (RocksDB): what has been settled."""
    raw = stage.store.get_many(0, ["alice"])[0]
    return [] if raw is None else [s.item_id for s in decode_state(raw).history]


def test_the_next_batch_builds_on_the_one_in_flight_and_a_failed_delivery_rewinds_both(
    settings: Settings, ranked_in: str
) -> None:
    settings = in_mode(settings, ranked_in, state_cache_users=0)  # states come from the pending batch
    producer, consumer = HeldProducer(), RecordingConsumer()
    stage, codec = make_stage(settings, producer, consumer)
    offset = 0

    def batch(*items: str) -> list[Record]:
        nonlocal offset
        records = [click(settings, codec, offset + n, item) for n, item in enumerate(items)]
        offset += len(items)
        return records

    process(stage, batch("sku-1", "sku-2"))
    assert stored_items(stage) == []  # published, not delivered: nothing written locally, nothing committed
    assert consumer.commits == []

    # The next batch applies on top of the one in flight, then settles it (its reports are in by then).
    producer.release()
    out = process(stage, batch("sku-3"))
    assert out.events == 1 and out.recommendations == 1
    assert stored_items(stage) == ["sku-1", "sku-2"]
    assert [(c.partition, c.offset) for c in consumer.commits] == [(0, 2)]
    producer.release()
    stage._settle_inflight(wait=True)
    assert stored_items(stage) == ["sku-1", "sku-2", "sku-3"]
    assert consumer.commits[-1].offset == 3

    # Batch C is published, batch D is applied on top of it, then C's delivery fails: neither is written or
    # committed, and the consumer goes back to C's first offset so both are consumed again.
    process(stage, batch("sku-4"))
    producer.failing = True
    producer.release()
    with pytest.raises(DeliveryFailed):
        process(stage, batch("sku-0"))
    # A small batch publishes its recommendation before waiting for the batch before it (at-least-once: it
    # is published again when consumed again); a large one waits while the serving thread ranks.
    published = [r for _, r in producer.held if r.topic() == settings.recommendations_topic]
    assert len(published) == (1 if ranked_in == "stage thread" else 0)
    assert stage._ranking is None  # a ranking in the serving thread is dropped with its batch
    assert stored_items(stage) == ["sku-1", "sku-2", "sku-3"]
    assert consumer.commits[-1].offset == 3
    assert [(s.partition, s.offset) for s in consumer.seeks] == [(0, 3)]
    assert len(stage.cache) == 0 and not stage._flights

    # Consumed again once the broker is back: each event applied once, whatever D's late reports say.
    producer.failing = False
    offset = 3
    process(stage, batch("sku-4", "sku-0"))
    producer.release()
    stage._settle_inflight(wait=True)
    assert stored_items(stage) == ["sku-1", "sku-2", "sku-3", "sku-4", "sku-0"]
    assert consumer.commits[-1].offset == 5
    stage.store.close()


def test_batches_settle_in_order_up_to_the_depth_and_a_failure_rewinds_it_and_the_later_ones(
    settings: Settings, ranked_in: str
) -> None:
    settings = in_mode(settings, ranked_in, state_cache_users=0, delivery_pipeline_depth=2)
    producer, consumer = HeldProducer(), RecordingConsumer()
    stage, codec = make_stage(settings, producer, consumer)
    offset = 0

    def batch(item: str) -> list[Record]:  # one event: one changelog record and one recommendation
        nonlocal offset
        offset += 1
        return [click(settings, codec, offset - 1, item)]

    def committed() -> int | None:
        return consumer.commits[-1].offset if consumer.commits else None

    # Two batches in flight at depth 2: neither waited for, nothing written or committed.
    process(stage, batch("sku-1"))
    process(stage, batch("sku-2"))
    assert len(stage._flights) == 2 and stored_items(stage) == [] and committed() is None

    # The first one's reports come in: the next batch settles it without waiting for the second.
    producer.release(2)
    process(stage, batch("sku-3"))
    assert stored_items(stage) == ["sku-1"] and committed() == 1 and len(stage._flights) == 2

    # A fourth would make three in flight: the stage waits for the oldest (answered a moment later).
    threading.Timer(0.2, producer.release, args=(2,)).start()
    process(stage, batch("sku-4"))
    assert stored_items(stage) == ["sku-1", "sku-2"] and committed() == 2 and len(stage._flights) == 2

    # The third batch's delivery fails: the ones before it stay settled, it and the fourth (built on its
    # states) are consumed again from its offset, and nothing of them is written or committed.
    producer.failing = True
    producer.release(2)
    with pytest.raises(DeliveryFailed):
        process(stage, batch("sku-0"))
    assert stored_items(stage) == ["sku-1", "sku-2"] and committed() == 2
    assert [(s.partition, s.offset) for s in consumer.seeks] == [(0, 2)]
    assert len(stage.cache) == 0 and not stage._flights

    # Consumed again: every event applied once, in order.
    producer.failing = False
    producer.held.clear()
    offset = 2
    for item in ["sku-3", "sku-4", "sku-0"]:
        process(stage, batch(item))
        producer.release()
    stage._settle_inflight(wait=True)
    assert stored_items(stage) == ["sku-1", "sku-2", "sku-3", "sku-4", "sku-0"] and committed() == 5
    stage.store.close()


def test_with_a_broker_that_answers_at_once_a_batch_is_committed_only_after_its_recommendations(
    settings: Settings, ranked_in: str
) -> None:
    # The changelog goes out before the ranking is done: its reports may all be in while the recommendations
    # are not published yet, and the batch must not be settled then.
    settings = in_mode(settings, ranked_in)
    producer = HeldProducer(instant=True)
    published: list[int] = []  # recommendations produced when each commit was made
    consumer = RecordingConsumer(
        on_commit=lambda offsets: published.append(
            producer.offsets.get((settings.recommendations_topic, 0), 0)
        )
    )
    stage, codec = make_stage(settings, producer, consumer)
    for n, item in enumerate(ITEMS):
        stage.process([click(settings, codec, n, item)])
    stage._settle_inflight(wait=True)
    commits = [c.offset for c in consumer.commits]
    assert commits == sorted(commits) and commits[-1] == len(ITEMS)
    # the batch committed up to offset o published its recommendation (the o-th) before the commit
    assert all(n >= offset for n, offset in zip(published, commits, strict=True))
    stage.store.close()


def test_the_local_checkpoint_is_the_newest_delivered_changelog_offset(
    settings: Settings, ranked_in: str
) -> None:
    # A restore starts after the checkpoint: it must be the changelog's offset, not any other record's.
    settings = in_mode(settings, ranked_in)
    producer, consumer = HeldProducer(), RecordingConsumer()
    # other topics' offsets, far from the changelog's
    producer.offsets[(settings.recommendations_topic, 0)] = 100
    producer.offsets[(settings.dead_letter_topic, 0)] = 200
    stage, codec = make_stage(settings, producer, consumer)
    bad = Record(settings.events_topic, 0, 1, b"not avro", b"alice")
    process(stage, [click(settings, codec, 0, "sku-1"), bad, click(settings, codec, 2, "sku-2")])
    process(stage, [click(settings, codec, 3, "sku-3")])
    producer.release()
    stage._settle_inflight(wait=True)
    changelog = [r.offset() for r in producer.produced if r.topic() == settings.state_changelog_topic]
    assert changelog == [0, 1]  # alice's state, once a batch
    assert stage.store.partitions[0].checkpoint == 1
    assert stored_items(stage) == ["sku-1", "sku-2", "sku-3"]
    stage.store.close()


def test_depth_zero_waits_for_each_batchs_own_delivery(settings: Settings, ranked_in: str) -> None:
    settings = in_mode(settings, ranked_in, delivery_pipeline_depth=0)
    producer, consumer = HeldProducer(), RecordingConsumer()
    stage, codec = make_stage(settings, producer, consumer)
    answering = threading.Event()

    def broker() -> None:  # answers whatever is held, every 50 ms
        while not answering.wait(0.05):
            producer.release()

    threading.Thread(target=broker, daemon=True).start()
    for n, item in enumerate(ITEMS[:2]):
        stage.process([click(settings, codec, n, item)])
        # settled before process() returned: written locally and committed, nothing left in flight
        assert not stage._flights and consumer.commits[-1].offset == n + 1
        assert stored_items(stage) == ITEMS[: n + 1]
    answering.set()
    stage.store.close()


class SlowToRead(Echo):
    """Echo, taking a while to read the states it is asked to rank."""

    def prepare(self, users: list[UserState], k: int) -> Callable[[], RankedBatch]:
        time.sleep(0.2)
        return super().prepare(users, k)


class SlowToReadBytes(EchoFromBytes):
    """EchoFromBytes, taking a while to read the states' bytes."""

    def prepare_encoded(self, states: list[bytes], k: int) -> Callable[[], RankedBatch]:
        time.sleep(0.2)
        return super().prepare_encoded(states, k)


@pytest.mark.parametrize("slow", [SlowToRead, SlowToReadBytes])
def test_a_batch_is_ranked_while_the_next_is_applied_and_its_recommendations_go_out_first(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, slow: Callable[[], Echo]
) -> None:
    # With a ranking process, a backlog batch's ranking runs on while the next batch is decoded and applied.
    # That batch changes alice's state (in place) only once the ranking has read it, and publishes the ranked
    # recommendation before its own; neither batch is committed before its recommendation is out.
    monkeypatch.setattr(event_stage, "THREAD_MIN_USERS", 1)
    settings = in_mode(settings, "ranking process")
    producer, consumer = HeldProducer(instant=True), RecordingConsumer()
    stage, codec = make_stage(settings, producer, consumer)
    stage.recommender = slow()
    stage.process([click(settings, codec, 0, "sku-1")])
    assert recommended(settings, codec, producer) == [] and consumer.commits == []  # changelog delivered
    stage.process([click(settings, codec, 1, "sku-2")])
    assert recommended(settings, codec, producer) == ["sku-1"]  # alice as the first batch left her
    assert [c.offset for c in consumer.commits] == [1]  # the first batch, once its recommendation is out
    stage._settle_inflight(wait=True)
    assert recommended(settings, codec, producer) == ["sku-1", "sku-2"]
    assert [c.offset for c in consumer.commits] == [1, 2] and stored_items(stage) == ["sku-1", "sku-2"]
    stage.store.close()
