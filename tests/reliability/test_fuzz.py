"""Fuzz at volume: tens of thousands of records, a third of them hostile (random bytes, truncated Avro,
records over the size limit, unknown fingerprints and record types, a writer schema that cannot be read,
wrong keys and partitions, control characters, absurd timestamps, NaN prices, integers beyond their type,
unknown items, bad erasures) mixed with valid events (some at the edges of the rules, some on a newer
compatible schema) and resent ones, produced to a real broker and read by a real worker process. The worker
never stops, every hostile record is in the dead-letter topic once with the reason it deserves, and every
valid event is applied exactly once."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest
from confluent_kafka import KafkaError, Message, Producer

from streamrec.partitioner import partition_of
from streamrec.records import EventKind
from streamrec.settings import Settings
from streamrec.streams.schema_store import publish_schema
from tests.conftest import wait_for
from tests.fuzz import Fuzzer, FuzzRecord, expected_counts, hostile_stream
from tests.integration.conftest import running_cluster

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]  # the shared model may train in setup

RECORDS = 30_000
SEED = 27


def produce(settings: Settings, records: list[FuzzRecord]) -> list[tuple[int, int]]:
    """Send the records as they are (no client-side checks); where each one landed (partition, offset)."""
    landed: list[tuple[int, int] | None] = [None] * len(records)
    failures: list[str] = []

    def report(n: int) -> object:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failures.append(str(err))
            else:
                landed[n] = (msg.partition(), msg.offset())

        return on_delivery

    producer = Producer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "partitioner": "murmur2_random",  # Kafka's default, as every client of the events topic
            "enable.idempotence": True,
            "linger.ms": 5,
        }
    )
    for n, r in enumerate(records):
        extra = {} if r.partition is None else {"partition": r.partition}
        while True:
            try:
                producer.produce(settings.events_topic, r.value, r.key, on_delivery=report(n), **extra)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(60) == 0 and not failures, failures[:3]
    assert all(at is not None for at in landed)
    return [at for at in landed if at is not None]


def metric_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_hostile_records_at_volume_are_dead_lettered_once_each_and_valid_events_applied_once(
    model_registry: Path, tmp_path: Path
) -> None:
    with running_cluster(model_registry, tmp_path) as cluster:
        settings, worker = cluster.settings, cluster.workers[0]
        fuzzer = Fuzzer([i.item_id for i in cluster.catalog], settings.partitions, seed=SEED)
        records = list(hostile_stream(fuzzer, RECORDS))
        kinds = Counter(r.fault for r in records)
        assert len(kinds) == 25, kinds  # every hostile kind, valid events and resent ones
        # Backends publish their writer schemas before their records: a newer compatible one, and one the
        # worker cannot read. Once it has read the newer one (the warm-up record is recommended on), made-up
        # fingerprints in the storm cannot hold up its lookup (the resolver rate-limits re-reads).
        warm = Producer({"bootstrap.servers": settings.bootstrap_servers})
        for schema in (fuzzer.evolved, fuzzer.incompatible):
            publish_schema(warm, settings, schema)
        assert warm.flush(30) == 0
        warm_up = fuzzer.event(EventKind.CLICK)
        value = fuzzer.codec.encode("ClickEvent", {**warm_up.to_avro(), "user_id": "warm-up"}, fuzzer.evolved)
        produce(settings, [FuzzRecord(b"warm-up", value, None, "valid", None)])
        cluster.output.wait_for_cause("warm-up", warm_up.event_id, timeout_s=60)
        landed = produce(settings, records)
        hostile = {at: r.reason for at, r in zip(landed, records, strict=True) if r.reason is not None}
        # After everything, one valid click on each partition: once it is recommended on, the partition's
        # records before it have all been through the worker.
        item = next(i.item_id for i in cluster.catalog if i.in_stock)
        sentinels = {}
        for p in range(settings.partitions):
            user = next(
                f"last-{p}-{n}"
                for n in range(1000)
                if partition_of(f"last-{p}-{n}".encode(), settings.partitions) == p
            )
            sentinels[user] = cluster.producer.click(user, item)
        cluster.producer.flush()
        for user, event_id in sentinels.items():
            cluster.output.wait_for_cause(user, event_id, timeout_s=150)

        def refused() -> list[dict]:
            return [
                d for d in list(cluster.output.dead_letters) if d["source_topic"] == settings.events_topic
            ]

        wait_for(lambda: len(refused()) >= len(hostile), 30, what=f"{len(hostile)} dead letters")
        health = worker.health()
        assert worker.alive() and health["stage_alive"] and health["ready"], worker.log_tail()

        # Bad produced == dead letters: each hostile record once, where it was, with its reason.
        letters = refused()
        got = {(d["partition"], d["offset"]): d["reason"] for d in letters}
        assert len(letters) == len(got) == len(hostile)
        wrong = {at: (got.get(at), reason) for at, reason in hostile.items() if got.get(at) != reason}
        assert not wrong, list(wrong.items())[:10]

        # Each valid event applied once: per-user counters, and the worker's own counts.
        expected = expected_counts(records)
        off: dict[str, tuple[dict, dict]] = {}
        for user, counts in expected.items():
            found = worker.get(f"/users/{quote(user, safe='')}/state") or {}
            state = found if found.get("found") else {}
            held = {k: state.get(k, 0) for k in ("clicks", "searches", "purchases")}
            if held != {k: counts[k] for k in held}:
                off[user] = (held, dict(counts))
        assert not off, list(off.items())[:5]
        metrics = worker.metrics_text()
        applied = kinds["valid"] + len(sentinels) + 1  # and the warm-up
        assert metric_sum(metrics, "streamrec_events_total") == applied
        assert metric_sum(metrics, "streamrec_duplicate_events_total") == kinds["duplicate"]
        assert metric_sum(metrics, "streamrec_dead_letters_total") == len(hostile)
