"""The learning loop end to end (issue 25), on a real broker with two worker processes and a trainer process:
shoppers move to a product line launched after the served model was trained; a worker's trigger fires; the
trainer fine-tunes on the events topics, judges candidate and served model on the window's newest slice and
promotes; both workers switch with no event lost or applied twice; the new line is recommended; a worse
candidate is rejected; a rollback brings the earlier version back, in the recommendations too."""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamrec.cli import app
from streamrec.models import registry
from streamrec.records import CatalogItem
from streamrec.sample import ShopperSimulator
from streamrec.streams.bench import metric_by_label
from streamrec.streams.canary import in_canary
from streamrec.streams.client import EventProducer
from streamrec.streams.process import WorkerProcess, settings_env
from streamrec.streams.topics import create_topics
from streamrec.streams.trainer.process import TrainerProcess
from streamrec.streams.trainer.run import Outcome, Trigger, run_once
from streamrec.streams.trainer.service import TrainerService
from tests.conftest import wait_for
from tests.integration.conftest import Cluster, running_cluster

pytestmark = pytest.mark.integration

LINE = [
    CatalogItem(f"trail-{i:02d}", f"Trail Gear No. {i}", "outdoor/camping", 20.0 + i, True, "Trail gear.")
    for i in range(30)
]
OLD_EVENTS = 1500
CAMPERS = 200
CAMPER_EVENTS = 3000


@pytest.fixture(scope="module")
def loop(
    model_registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, TrainerProcess]]:
    root = tmp_path_factory.mktemp("loop")
    own_registry = root / "registry"  # promotions and rollbacks here must not reach the other tests' workers
    shutil.copytree(model_registry, own_registry)
    with running_cluster(
        own_registry,
        root,
        # worker-0 holds about half of the users: its trigger fires during the shift, not before it
        trigger_min_events=1200,
        trigger_check_s=1.0,
        trainer_min_events=500,
        trainer_epochs=8,
        trainer_max_minutes=0.5,
        trainer_promotion_margin=0.05,
        canary_min_outcomes=150,
    ) as cluster:
        quiet = cluster.settings.model_copy(update={"trigger_min_events": 10**9})  # one trigger, one run
        second = WorkerProcess(quiet, root / "worker-1", "worker-1").start()
        cluster.workers.append(second)
        second.wait_ready()
        trainer = TrainerProcess(cluster.settings, root).start()
        try:
            yield cluster, trainer
        finally:
            trainer.stop()


def walk(start: int, length: int) -> list[str]:
    """A shopper of the new line browses it in order: the pattern the served model cannot know."""
    return [LINE[min(len(LINE) - 1, start + j)].item_id for j in range(length)]


def state_of(cluster: Cluster, user: str) -> dict | None:
    for worker in cluster.workers:
        found = worker.state(user)
        if found is not None:
            return found
    return None


def runs(trainer: TrainerProcess, n: int) -> list[dict] | None:
    assert trainer.alive(), trainer.log_tail()
    done = trainer.runs()
    return done if len(done) >= n else None


def served_by(worker: WorkerProcess) -> str | None:
    return (worker.health() or {}).get("model_version")


@pytest.mark.timeout(600)  # two workers and a trainer start in its setup; a run and four model switches in it
def test_a_shift_in_behaviour_is_learned_promoted_served_and_rolled_back(
    loop: tuple[Cluster, TrainerProcess], tmp_path: Path
) -> None:
    cluster, trainer = loop
    settings, producer = cluster.settings, cluster.producer
    first = registry.current(settings.model_registry)
    assert first is not None
    sent: Counter[str] = Counter()
    # Before: shoppers of the sample catalogue, as the served model was trained on.
    now = int(time.time() * 1000)
    old = ShopperSimulator(cluster.catalog, users=300, seed=11, user_prefix="old")
    for event in old.history(OLD_EVENTS, now - 3_600_000, spacing_ms=1):
        producer.send_event(event)
        sent[event.user_id] += 1
    # The launch: a new product line, and shoppers who move to it.
    for item in LINE:
        producer.upsert_item(item)
    producer.flush()
    for worker in cluster.workers:
        worker.wait_catalog(len(cluster.catalog) + len(LINE), timeout_s=60)
    rng = random.Random(5)
    campers = [f"camper-{n:03d}" for n in range(CAMPERS)]
    # at a person's pace, a click every few seconds (faster, 30 in a row would flag them as bots), in the
    # last half hour: after the old shoppers, before the clicks below
    clock = {user: now - 1_800_000 for user in campers}
    while sum(sent[u] for u in campers) < CAMPER_EVENTS:
        user = rng.choice(campers)
        for item in walk(rng.randrange(len(LINE) - 3), rng.randint(3, 8)):
            clock[user] += rng.randint(1_000, 8_000)
            producer.click(user, item, timestamp=clock[user])
            sent[user] += 1
    producer.flush()

    # A worker's trigger fires, the trainer answers it: the candidate beats the served model on the slice.
    promoted = wait_for(lambda: runs(trainer, 1), 240, what="a run")[0]
    assert promoted["outcome"] == "promoted", (promoted, trainer.log_tail())
    assert promoted["candidate"]["ndcg@10"] > promoted["parent"]["ndcg@10"] * 1.05
    version = promoted["version"]
    meta = registry.read_metadata(settings.model_registry / version)
    assert meta["parent_version"] == first.name and meta["trigger"]["ids"] == promoted["triggers"]
    assert meta["serve_len"] == registry.read_metadata(first)["serve_len"]  # served with the parent's window
    assert meta["trigger"]["reasons"][0] in {"new_data", "accuracy_drift"}
    window = meta["data_window"]
    assert window["events"] == sum(sent.values()) and window["new_items"] == len(LINE)
    assert set(window["topics"]) == {settings.events_topic, settings.backfill_topic}
    assert registry.status_of(settings.model_registry / version)["status"] == "serving"
    assert metric_by_label(trainer.metrics_text(), "streamrec_trainer_runs_total") == {"promoted": 1.0}

    # Both workers switch, and a shopper of the new line is shown where it goes next.
    for worker in cluster.workers:
        wait_for(lambda w=worker: served_by(w) == version, 60, what=f"{worker.name} to serve {version}")
    hits = 0
    for n in range(20):
        user = f"after-{n}"
        steps = walk(n % (len(LINE) - 3), 2)
        last = ""
        for item in steps:
            last = producer.click(user, item)
            sent[user] += 1
        producer.flush()
        rec = cluster.output.wait_for_cause(user, last)
        assert rec.model_version == version and rec.index_version.startswith(meta["index_version"])
        nxt = LINE[LINE.index(next(i for i in LINE if i.item_id == steps[-1])) + 1].item_id
        hits += nxt in [i.item_id for i in rec.items]
    assert hits >= 12, f"the next item of the line was recommended to {hits} of 20"

    # No event lost or applied twice through the switch: every user's counters hold what was sent.
    wrong = {}
    for user, count in sent.items():
        state = state_of(cluster, user) or {}
        held = state.get("clicks", 0) + state.get("searches", 0) + state.get("purchases", 0)
        if held != count:
            wrong[user] = (held, count)
    assert not wrong

    # A deliberately worse candidate (fresh weights, a moment of training) is recorded as rejected.
    worse = settings.model_copy(
        update={"trainer_full_retrain": True, "trainer_epochs": 1, "trainer_max_minutes": 0.0005}
    )
    trigger = Trigger("worse-1", "new_data", version, "test", 0)
    outcome: Outcome = run_once(worse, [trigger], cluster.producer.codec)
    assert outcome.outcome == "rejected" and "does not beat" in outcome.reason
    rejected = settings.model_registry / str(outcome.version)
    status = registry.status_of(rejected)
    assert status["status"] == "rejected" and status["reason"] == outcome.reason
    figures = registry.read_metadata(rejected)["metrics"]["temporal"]
    assert figures["candidate"]["ndcg@10"] < figures["parent"]["ndcg@10"]
    assert registry.current(settings.model_registry) == settings.model_registry / version

    # `streamrec models rollback`: the workers serve the first version again, and say so.
    result = CliRunner().invoke(app, ["models", "rollback"], env=settings_env(settings))
    assert result.exit_code == 0, result.output
    assert registry.current(settings.model_registry) == first
    assert registry.status_of(settings.model_registry / version)["status"] == "retired"
    for worker in cluster.workers:
        wait_for(lambda w=worker: served_by(w) == first.name, 60, what=f"{worker.name} to roll back")
    user = "after-rollback"
    last = producer.click(user, LINE[3].item_id)
    producer.flush()
    assert cluster.output.wait_for_cause(user, last).model_version == first.name
    listed = CliRunner().invoke(app, ["models", "list", "--json"], env=settings_env(settings))
    statuses = {row["version"]: row["status"] for row in map(_json, listed.output.splitlines())}
    assert statuses == {first.name: "serving", version: "retired", str(outcome.version): "rejected"}

    canary_promoted_by_rule(cluster, first.name, version, sent)
    canary_stopped_by_command(cluster, version, str(outcome.version))


def canary_promoted_by_rule(cluster: Cluster, first: str, version: str, sent: Counter[str]) -> None:
    """The fine-tuned version as a canary for half the users beside the first one: each recommendation says
    which of the two made it, by the user's bucket, and the trainer's rule promotes it on live figures."""
    settings, producer = cluster.settings, cluster.producer
    env = settings_env(settings)
    started = CliRunner().invoke(app, ["models", "canary", version, "--share", "0.5"], env=env)
    assert started.exit_code == 0, started.output
    for worker in cluster.workers:
        wait_for(lambda w=worker: (w.health().get("canary") or {}).get("model_version") == version, 60)
    rng = random.Random(9)
    walks = {f"canary-{n}": walk(rng.randrange(len(LINE) - 5), 5) for n in range(120)}
    last: dict[str, str] = {}
    for step in range(5):  # a click is judged against the recommendation its user was shown before it
        for user, items in walks.items():
            last[user] = producer.click(user, items[step])
            sent[user] += 1
        producer.flush()
        for user, event_id in last.items():
            cluster.output.wait_for_cause(user, event_id)
    # the log entry is written after CURRENT moves: wait for the entry, the record of why it moved
    promotion = wait_for(
        lambda: next(
            (
                e
                for e in reversed(registry.history(settings.model_registry))
                if e["action"] == "promote" and e["reason"].startswith("canary:")
            ),
            None,
        ),
        120,
        what="rule",
    )
    assert promotion["version"] == version and promotion["reason"].startswith("canary: online hit rate")
    assert registry.current(settings.model_registry) == settings.model_registry / version
    assert registry.canary(settings.model_registry) is None
    canaried = {user for user in last if in_canary(user, 0.5)}
    assert 30 < len(canaried) < 90
    for user in last:
        for rec in cluster.output.for_user(user):
            if user in canaried:
                assert rec.model_version == version
            elif rec.publish_time < promotion["at"] - 2000:  # the swap follows the record, not the registry
                assert rec.model_version == first
    for worker in cluster.workers:
        wait_for(lambda w=worker: served_by(w) == version and not w.health().get("canary"), 60)
    rates = metric_by_label(cluster.workers[0].metrics_text(), "streamrec_online_hit_rate_by_version")
    assert {first, version} <= set(rates)


def canary_stopped_by_command(cluster: Cluster, serving: str, candidate: str) -> None:
    env = settings_env(cluster.settings)
    started = CliRunner().invoke(app, ["models", "canary", candidate, "--share", "0.3"], env=env)
    assert started.exit_code == 0, started.output
    worker = cluster.workers[0]
    wait_for(lambda: (worker.health().get("canary") or {}).get("share") == 0.3, 60, what="the canary")
    status = _json(CliRunner().invoke(app, ["models", "canary", "--status"], env=env).output)
    assert (status["version"], status["parent_version"], status["share"]) == (candidate, serving, 0.3)
    assert status["rule"]["decision"] is None  # no live figures yet: nothing to judge
    stopped = CliRunner().invoke(app, ["models", "canary", "--stop", "--reason", "looked wrong"], env=env)
    assert stopped.exit_code == 0, stopped.output
    wait_for(lambda: worker.health().get("canary") is None, 60, what="the canary to end")
    reg = cluster.settings.model_registry
    status = registry.status_of(reg / candidate)
    assert (status["status"], status["reason"]) == ("rejected", "looked wrong")
    assert served_by(worker) == serving and registry.canary(reg) is None


def _json(line: str) -> dict:
    import json

    return json.loads(line)


def test_triggers_during_a_run_get_one_follow_up_run_and_an_unfinished_run_is_picked_up_again(
    loop: tuple[Cluster, TrainerProcess],
) -> None:
    """The trainer's consumer loop against the real triggers topic, with a run that waits to be let go."""
    cluster, _ = loop
    topic = "loop-test-triggers"  # the trainer process answers the real topic's triggers
    settings = cluster.settings.model_copy(update={"triggers_topic": topic, "trainer_group": "loop-test"})
    create_topics(settings)
    release = threading.Event()
    answered: list[tuple[str, list[str]]] = []

    def send(trigger_id: str) -> None:
        record = {
            "trigger_id": trigger_id,
            "reason": "new_data",
            "model_version": "v",
            "events_since_training": 1,
            "online_hit_rate": None,
            "baseline_hit_rate": None,
            "worker_id": "test",
            "created_at": 1,
        }
        with EventProducer(settings) as producer:
            producer.send("FineTuneTrigger", record, key="test", topic=settings.triggers_topic)

    def start(name: str) -> tuple[TrainerService, threading.Event, threading.Thread]:
        def run(_settings: object, triggers: list[Trigger], _codec: object) -> Outcome:
            release.wait(60)
            answered.append((name, [t.trigger_id for t in triggers]))
            return Outcome("skipped", "test")

        service = TrainerService(settings, run=run, emit=lambda _: None)
        stop = threading.Event()
        thread = threading.Thread(target=service.serve, args=(stop,), daemon=True)
        thread.start()
        return service, stop, thread

    service, stop, thread = start("first")
    consumed = service.metrics.triggers.labels("new_data")
    send("t-a")
    wait_for(lambda: service.queue.running, 60, what="a run to start")
    send("t-b")
    send("t-c")
    wait_for(lambda: consumed._value.get() >= 3, 30, what="the triggers sent during the run")
    release.set()
    wait_for(lambda: len(answered) == 2, 30, what="one follow-up run")
    assert answered == [("first", ["t-a"]), ("first", ["t-b", "t-c"])]

    # A run cut short: its trigger is not committed, and the next trainer of the group answers it.
    release.clear()
    send("t-d")
    wait_for(lambda: service.queue.running, 30, what="the run of t-d")
    stop.set()
    thread.join(30)
    service, stop, thread = start("second")
    release.set()
    wait_for(lambda: ("second", ["t-d"]) in answered, 60, what="t-d answered after the restart")
    assert ("second", ["t-a"]) not in answered  # committed once its run had finished
    stop.set()
    thread.join(30)
