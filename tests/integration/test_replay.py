"""`streamrec replay` against a real broker and real workers: live processing and replayed history must build
the same state, history never reaches the live recommendations topic, a killed replay resumes to the same
state, a Kafka time range selects exactly its records, and a dry run sends nothing.

One broker holds two clusters side by side (their own topics, groups and app ids; the catalogue is shared):
"live" processes events as web backends send them, "fresh" only ever receives history through replay.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from streamrec.records import Event, EventKind, Recommendation
from streamrec.sample import event_to_json, sample_catalog
from streamrec.serde import AvroCodec
from streamrec.settings import Settings
from streamrec.streams.broker import EmbeddedBroker
from streamrec.streams.client import EventProducer
from streamrec.streams.process import WorkerProcess, settings_env
from streamrec.streams.reading import ReadToEnd
from streamrec.streams.replay import (
    Checkpoint,
    Filters,
    KafkaSink,
    KafkaSource,
    ReplayOptions,
    run_replay,
)
from streamrec.streams.simulate import publish_catalog
from streamrec.streams.topics import create_topics
from tests.conftest import wait_for
from tests.integration.conftest import comparable_state

pytestmark = pytest.mark.integration

FRESH = {
    "app_id": "fresh-worker",
    "events_group": "fresh-events",
    "events_topic": "fresh.events",
    "backfill_topic": "fresh.events.backfill",
    "recommendations_topic": "fresh.recommendations",
    "shadow_topic": "fresh.recommendations.shadow",
    "state_changelog_topic": "fresh.user-state-changelog",
    "dead_letter_topic": "fresh.dead-letters",
    # The harder assignment protocol: backfill partitions follow the incremental assignments too.
    "assignment_strategy": "cooperative-sticky",
}


@dataclass
class Clusters:
    live: Settings
    fresh: Settings
    live_worker: WorkerProcess
    fresh_worker: WorkerProcess
    root: Path
    workers: list[WorkerProcess]

    def fresh_worker_named(self, name: str) -> WorkerProcess:
        w = WorkerProcess(self.fresh, self.root / name, name).start()
        self.workers.append(w)
        return w


@pytest.fixture(scope="module")
def clusters(model_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    root = tmp_path_factory.mktemp("replay")
    with EmbeddedBroker(log_path=root / "broker.log") as broker:
        live = Settings(bootstrap_servers=broker.bootstrap, model_registry=model_registry, data_dir=root)
        fresh = live.model_copy(update=FRESH)
        create_topics(live)
        create_topics(fresh)
        catalog = sample_catalog()
        with EventProducer(live) as producer:
            publish_catalog(producer, catalog)
        live_worker = WorkerProcess(live, root / "live-0", "live-0").start()
        c = Clusters(live, fresh, live_worker, live_worker, root, [live_worker])
        c.fresh_worker = c.fresh_worker_named("fresh-0")
        try:
            for w in (c.live_worker, c.fresh_worker):
                w.wait_ready()
                w.wait_catalog(len(catalog), timeout_s=60)
            yield c
        finally:
            for w in c.workers:
                w.stop()


def shoppers(n_users: int, events_per_user: int, seed: int) -> list[Event]:
    """Clicks, searches and purchases of new users, interleaved, a second apart, ending an hour ago."""
    rng = random.Random(seed)
    items = [i for i in sample_catalog() if i.in_stock]
    users = [f"replay-{seed}-{uuid.uuid4().hex[:8]}" for _ in range(n_users)]
    start = int(time.time() * 1000) - 3_600_000 - n_users * events_per_user * 1000
    out = []
    for n in range(n_users * events_per_user):
        user, item = users[n % n_users], rng.choice(items)
        ts = start + n * 1000
        roll = rng.random()
        if roll < 0.15:
            e = Event(uuid.uuid4().hex, user, EventKind.SEARCH, ts, query=item.title.split()[0].lower())
        elif roll < 0.25:
            e = Event(uuid.uuid4().hex, user, EventKind.PURCHASE, ts, item_id=item.item_id, price=9.5)
        else:
            e = Event(uuid.uuid4().hex, user, EventKind.CLICK, ts, item_id=item.item_id)
        out.append(e)
    return out


def send_live(settings: Settings, events: list[Event]) -> None:
    with EventProducer(settings) as producer:
        for e in events:
            producer.send_event(e)


def write_jsonl(path: Path, events: list[Event], bad_after: dict[int, str] | None = None) -> Path:
    with path.open("w") as f:
        for n, e in enumerate(events):
            f.write(json.dumps(event_to_json(e)) + "\n")
            if bad_after and n in bad_after:
                f.write(bad_after[n] + "\n")
    return path


def states(worker: WorkerProcess, users: set[str]) -> dict[str, dict | None]:
    return {u: comparable_state(worker.state(u)) for u in sorted(users)}


def wait_for_states(worker: WorkerProcess, expected: dict[str, dict | None], timeout_s: float = 90) -> None:
    def same() -> bool:
        return states(worker, set(expected)) == expected

    try:
        wait_for(same, timeout_s, interval_s=0.5, what=f"{worker.name} to hold the expected states")
    except AssertionError:
        got = states(worker, set(expected))
        diff = {u: (expected[u], got[u]) for u in expected if expected[u] != got[u]}
        raise AssertionError(f"{len(diff)} user(s) differ, e.g. {next(iter(diff.items()))}") from None


def live_states(clusters: Clusters, events: list[Event]) -> dict[str, dict | None]:
    """Send events live and wait until every user's state holds their last event."""
    send_live(clusters.live, events)
    last = {e.user_id: e.event_id for e in events}
    w = clusters.live_worker

    def caught_up() -> bool:
        return all((s := w.state(u)) is not None and s["last_event_id"] == eid for u, eid in last.items())

    wait_for(caught_up, 90, interval_s=0.5, what="live processing of the sent events")
    return states(w, set(last))


def topic_values(settings: Settings, topic: str) -> list[bytes]:
    """Every record of a topic, read to partition EOF (the embedded broker's end offsets are wrong)."""
    consumer = Consumer(
        {"bootstrap.servers": settings.bootstrap_servers, "group.id": "t", "enable.partition.eof": True}
    )
    starts = dict.fromkeys(consumer.list_topics(topic, timeout=10).topics[topic].partitions, 0)
    try:
        return [m.value() or b"" for batch in ReadToEnd(consumer, topic, starts, 30.0) for m in batch]
    finally:
        consumer.close()


def recommendations(settings: Settings, topic: str) -> list[Recommendation]:
    codec = AvroCodec()
    return [Recommendation.from_avro(codec.decode(v)[1]) for v in topic_values(settings, topic)]


def replay_cli(settings: Settings, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")} | settings_env(settings)
    return subprocess.Popen(
        [sys.executable, "-m", "streamrec.cli", "replay", *args, "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout_s: float = 120) -> dict:
    out, err = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_replayed_file_rebuilds_live_state_and_publishes_no_live_recommendations(
    clusters: Clusters, tmp_path: Path
) -> None:
    events = shoppers(12, 10, seed=1)
    expected = live_states(clusters, events)
    bad = {5: "{not json", 40: json.dumps({"user_id": "x", "kind": "click", "timestamp": 1})}
    path = write_jsonl(tmp_path / "history.jsonl", events, bad_after=bad)
    reject = tmp_path / "rejects.jsonl"

    # Paced, so the worker applies each user's history over several micro-batches: the shadow comparison below
    # judges only recommendations whose cause was followed by a next item (one batch would leave none).
    summary = finish(replay_cli(clusters.fresh, str(path), "--reject-file", str(reject), "--rate", "100"))
    assert summary["sent"] == len(events) and summary["target"] == "fresh.events.backfill"
    assert summary["invalid"] == {"unparsable": 1, "missing_field": 1}
    assert [json.loads(x)["offset"] for x in reject.read_text().splitlines()] == [7, 43]

    wait_for_states(clusters.fresh_worker, expected)
    assert recommendations(clusters.fresh, clusters.fresh.recommendations_topic) == []
    shadow = recommendations(clusters.fresh, clusters.fresh.shadow_topic)
    assert shadow and {r.mode for r in shadow} == {"backfill"}
    assert {r.user_id for r in shadow} == set(expected)

    # The shadow comparison, with the served model as the candidate: from the same states, the same lists.
    from streamrec.models.registry import current

    served_model = current(clusters.fresh.model_registry)
    assert served_model is not None
    args = ["--shadow", str(served_model), "--served-topic", clusters.fresh.shadow_topic]
    report = finish(replay_cli(clusters.fresh, str(path), *args))
    assert report["compared"] == len(shadow) and report["with_next_item"] > 0
    assert report["overlap@10"] == 1.0, report
    candidate = {k: v for k, v in report["candidate"].items() if k != "model"}
    served = {k: v for k, v in report["served"].items() if k != "models"}
    assert candidate == served, report  # the same lists, so the same scores against the next items
    assert candidate["hr@10"] is not None and candidate["ndcg@10"] is not None
    assert report["candidate"]["model"] == served_model.name == next(iter(report["served"]["models"]))


def test_a_replay_killed_midway_and_resumed_builds_the_same_state(clusters: Clusters, tmp_path: Path) -> None:
    events = shoppers(10, 12, seed=2)
    expected = live_states(clusters, events)
    path = write_jsonl(tmp_path / "history.jsonl", events)
    checkpoint = tmp_path / "replay.checkpoint"
    args = [str(path), "--checkpoint", str(checkpoint), "--resume", "--rate", "40"]

    first = replay_cli(clusters.fresh, *args)
    wait_for(
        lambda: checkpoint.exists() and Checkpoint.load(checkpoint).next_positions.get(-1, 0) > 30,
        60,
        what="the replay to get a third of the way",
    )
    first.send_signal(signal.SIGKILL)
    first.wait()
    progress = Checkpoint.load(checkpoint)
    assert not progress.done and progress.next_positions[-1] <= len(events)

    summary = finish(replay_cli(clusters.fresh, *args))
    assert summary["resumed"] and summary["complete"] and summary["sent"] == len(events)
    wait_for_states(clusters.fresh_worker, expected)


def test_a_replayed_deletion_erases_the_user_on_the_worker_that_holds_their_history(
    clusters: Clusters,
) -> None:
    """A user erased live stays erased wherever history is replayed: a replay of the events topic passes
    their UserDeletion through to the backfill topic, and the worker holding their replayed history applies
    it. The other user of the same replay keeps their state."""
    live, fresh = clusters.live, clusters.fresh
    events = shoppers(2, 6, seed=5)
    erased, kept = sorted({e.user_id for e in events})
    expected = live_states(clusters, events)

    def replay() -> dict:
        sink = KafkaSink(fresh, fresh.backfill_topic)
        try:
            filters = Filters(users=frozenset({erased, kept}))
            return run_replay(KafkaSource(live, live.events_topic), sink, fresh, ReplayOptions(filters))
        finally:
            sink.close()

    first = replay()
    assert (first["sent"], first["deletions"]) == (len(events), 0)
    wait_for_states(clusters.fresh_worker, expected)  # both users' history, held by the fresh worker

    with EventProducer(live) as producer:
        deletion_id = producer.delete_user(erased, requested_by="privacy-desk")
    wait_for(lambda: clusters.live_worker.state(erased) is None, 30, what="the live erasure")
    second = replay()
    assert (second["sent"], second["deletions"]) == (len(events), 1)  # the events again: duplicates
    codec = AvroCodec()
    replayed = [
        record
        for name, record in map(codec.decode, topic_values(fresh, fresh.backfill_topic))
        if name == "UserDeletion"
    ]
    assert [(r["event_id"], r["user_id"], r["requested_by"]) for r in replayed] == [
        (deletion_id, erased, "privacy-desk")
    ]
    wait_for_states(clusters.fresh_worker, {erased: None, kept: expected[kept]})


def test_a_time_range_of_a_topic_selects_exactly_the_records_in_the_window(
    clusters: Clusters, tmp_path: Path
) -> None:
    live = clusters.live
    source_topic = "window.events"
    target = live.model_copy(update={"events_topic": source_topic, "backfill_topic": "window.out"})
    create_topics(target)
    batches: list[list[str]] = []
    bounds: list[int] = []
    with EventProducer(live) as producer:
        for n in range(3):
            if n:
                bound = int(time.time() * 1000) + 1
                wait_for(lambda b=bound: time.time() * 1000 > b + 1, 5, interval_s=0.001, what="a new ms")
                bounds.append(bound)
            batch = [
                producer.send_event(
                    Event(uuid.uuid4().hex, f"w-{i}", EventKind.CLICK, 1_700_000_000_000 + i, item_id="x"),
                    topic=source_topic,
                    historical=True,
                )
                for i in range(25)
            ]
            producer.flush()
            batches.append(batch)
    source = KafkaSource(live, source_topic, since=bounds[0], until=bounds[1], grace_ms=0)
    sink = KafkaSink(target, "window.out")
    summary = run_replay(source, sink, target, ReplayOptions())
    sink.close()
    codec = AvroCodec()
    got = [codec.decode(v)[1]["event_id"] for v in topic_values(live, "window.out")]
    assert sorted(got) == sorted(batches[1]) and summary["sent"] == 25
    # Whether or not the broker's time index found the start, every record read was checked by its time.
    assert summary["read"] - summary["skipped"].get("time", 0) == 25

    everything = [(r.partition, r.offset) for r in KafkaSource(live, source_topic).records({})]
    assert len(everything) == 75
    densest = max(range(live.partitions), key=lambda p: sum(1 for q, _ in everything if q == p))
    by_offset = KafkaSource(live, source_topic, from_offset=f"{densest}:2", to_offset=f"{densest}:5")
    read = [(r.partition, r.offset) for r in by_offset.records({})]
    assert [o for p, o in read if p == densest] == [2, 3, 4], "[from, to) on the partition named"
    assert len(read) == 3 + sum(1 for p, _ in everything if p != densest), "the others read whole"


def test_a_dry_run_sends_nothing(clusters: Clusters, tmp_path: Path) -> None:
    events = shoppers(3, 5, seed=3)
    path = write_jsonl(tmp_path / "dry.jsonl", events)
    before = len(topic_values(clusters.fresh, clusters.fresh.backfill_topic))
    summary = finish(replay_cli(clusters.fresh, str(path), "--dry-run"))
    assert summary["dry_run"] and summary["sent"] == 0 and summary["would_send"] == len(events)
    assert len(topic_values(clusters.fresh, clusters.fresh.backfill_topic)) == before
    strict = replay_cli(
        clusters.fresh, str(write_jsonl(tmp_path / "bad.jsonl", events, {2: "oops"})), "--dry-run", "--strict"
    )
    out, _ = strict.communicate(timeout=60)
    assert strict.returncode == 1 and json.loads(out)["stopped"].startswith("line 4")


@pytest.mark.reliability  # two workers and a rebalance, half a minute: `make test-reliability`
def test_backfill_partitions_follow_each_workers_events_partitions(clusters: Clusters) -> None:
    """Two workers in one group (cooperative-sticky): each reads the backfill partitions of its own events
    partitions, so the one writer of a user's state also applies that user's history."""
    second = clusters.fresh_worker_named("fresh-1")
    second.wait_ready()
    workers = [clusters.fresh_worker, second]
    topics = (clusters.fresh.events_topic, clusters.fresh.backfill_topic)

    def split() -> list[dict[str, list[int]]] | None:
        found = [w.health().get("assignment") or {} for w in workers]
        events = [a.get(topics[0], []) for a in found]
        if sorted(p for ps in events for p in ps) != list(range(clusters.fresh.partitions)) or not all(
            events
        ):
            return None
        return found

    assignments = wait_for(split, 60, interval_s=0.5, what="the partitions split between two workers")
    for assignment in assignments:
        assert assignment.get(topics[1], []) == assignment[topics[0]]

    events = shoppers(16, 4, seed=4)
    with EventProducer(clusters.fresh) as producer:
        for e in events:
            producer.send_event(e, topic=clusters.fresh.backfill_topic, historical=True)
    last = {e.user_id: e.event_id for e in events}

    def owner_has_all() -> bool:
        for user, event_id in last.items():
            found = [s for w in workers if (s := w.state(user)) is not None]
            if len(found) != 1 or found[0]["last_event_id"] != event_id:
                return False
        return True

    wait_for(owner_has_all, 60, interval_s=0.5, what="each user's history at exactly one worker")
