"""What the event stage's own work costs per event: decode, validate, check the key's partition, apply to
state, encode the changelog record, write the recommendations (docs/performance.md, "Round 15").

The stage runs in this process with real RocksDB and stand-in Kafka clients that acknowledge every record at
once, and a recommender that answers at once, so nothing but the stage's code is measured: ``--batches``
micro-batches of 4,000 click events over ``--users`` shoppers (all of them in the state cache unless
``--users`` is larger than ``STREAMREC_STATE_CACHE_USERS``). It prints one JSON object with the CPU time per
event of each measured batch.

CPU time on a shared machine moves by +-10% from run to run; instruction counts do not. For an A/B of two
versions, run this under callgrind with two batch counts and take the difference (the set-up cancels out):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python benchmarks/stage_cpu.py --batches 6
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python benchmarks/stage_cpu.py --batches 14

    .venv/bin/python benchmarks/stage_cpu.py [--users 2000] [--batches 30] [--warm 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamrec.catalog import Catalog
from streamrec.partitioner import partition_of
from streamrec.records import CatalogItem, RankedBatch, RecommendedItem, UserState
from streamrec.serde import AvroCodec
from streamrec.settings import Settings
from streamrec.streams.event_stage import EventStage
from streamrec.streams.state_store import PartitionStore

PARTITIONS = 4
BATCH = 4000


class Record:
    """What the stage reads of a consumed message (confluent_kafka.Message's accessors)."""

    def __init__(self, topic: str, partition: int, offset: int, value: bytes, key: bytes | None) -> None:
        self._topic, self._partition, self._offset, self._value, self._key = (
            topic,
            partition,
            offset,
            value,
            key,
        )

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes | None:
        return self._key


class InstantProducer:
    """Acknowledges every record on the next poll."""

    def __init__(self) -> None:
        self.reports: list[tuple[Callable[..., None], Record]] = []
        self.offsets = [0] * PARTITIONS

    def produce(self, topic: str, value: bytes | None, key: bytes, partition: int, on_delivery: Any) -> None:
        p = max(partition, 0)
        self.offsets[p] += 1
        self.reports.append((on_delivery, Record(topic, p, self.offsets[p], value or b"", key)))

    def poll(self, timeout: float = 0) -> int:
        reports, self.reports = self.reports, []
        for callback, record in reports:
            callback(None, record)
        return len(reports)


class NoCommits:
    def commit(self, offsets: Any, asynchronous: bool) -> None:
        pass


class NewestItem:
    """A recommender that answers at once: the user's newest item."""

    model_version = index_version = "stage-cpu"

    def upsert_items(self, items: list[CatalogItem]) -> None:
        pass

    def rank(self, users: list[UserState], k: int) -> RankedBatch:
        lists = [[RecommendedItem(u.history[-1].item_id or "", 1.0, "popular", "Popular")] for u in users]
        return RankedBatch.of(lists)

    def prepare(self, users: list[UserState], k: int) -> Callable[[], RankedBatch]:
        ranked = self.rank(users, k)
        return lambda: ranked


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warm", type=int, default=5, help="batches run before measuring")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="stage-cpu-"))
    settings = Settings(data_dir=root, delivery_pipeline_depth=0, ranking_process=False)
    catalog = Catalog()
    items = [f"sku-{n:05d}" for n in range(500)]
    for item in items:
        catalog.upsert(CatalogItem(item, f"Item {item}"))
    codec = AvroCodec()
    stage = EventStage(settings, catalog, NewestItem(), codec)
    stage._producer, stage._consumer = InstantProducer(), NoCommits()  # type: ignore[assignment]
    for p in range(PARTITIONS):
        stage.store.partitions[p] = PartitionStore(root / f"p{p}")
    stage._partition_count = PARTITIONS

    rng = random.Random(1)
    users = [f"user-{n:07d}" for n in range(args.users)]
    offsets = [0] * PARTITIONS
    now = int(time.time() * 1000)

    def batch() -> list[Record]:
        records = []
        for _ in range(BATCH):
            user = rng.choice(users)
            key = user.encode()
            p = partition_of(key, PARTITIONS)
            value = codec.encode(
                "ClickEvent",
                {
                    "event_id": uuid.uuid4().hex,
                    "user_id": user,
                    "timestamp": now,
                    "item_id": rng.choice(items),
                },
            )
            records.append(Record(settings.events_topic, p, offsets[p], value, key))
            offsets[p] += 1
        return records

    batches = [batch() for _ in range(args.batches)]
    for records in batches[: args.warm]:
        stage.process(records)  # type: ignore[arg-type]
    per_event = []
    for records in batches[args.warm :]:
        started = time.process_time()
        stage.process(records)  # type: ignore[arg-type]
        per_event.append((time.process_time() - started) / len(records) * 1e6)
    print(
        json.dumps(
            {
                "users": args.users,
                "events_per_batch": BATCH,
                "batches_measured": len(per_event),
                "cpu_us_per_event_min": round(min(per_event), 1) if per_event else None,
                "cpu_us_per_event_median": round(statistics.median(per_event), 1) if per_event else None,
            }
        )
    )


if __name__ == "__main__":
    main()
