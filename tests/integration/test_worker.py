"""The spine end to end: client events in, explained recommendations out, bad input dead-lettered."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import pytest

from streamrec.abuse import AbuseRules
from streamrec.records import Event, EventKind
from streamrec.serde import AvroCodec, bundled_schemas, make_schema
from streamrec.state import HISTORY, StateLimits, apply_screened
from streamrec.streams.bench import metric_total
from streamrec.streams.client import EventProducer
from streamrec.streams.process import WorkerProcess
from tests.conftest import wait_for
from tests.integration.conftest import Cluster, comparable_state

pytestmark = pytest.mark.integration


def user() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def items_in(cluster: Cluster, category: str, n: int) -> list[str]:
    return [i.item_id for i in cluster.catalog if i.category == category and i.in_stock][:n]


def test_events_lead_to_explained_recommendations(cluster: Cluster) -> None:
    u = user()
    viewed = items_in(cluster, "beauty/skin care", 3)
    last = ""
    for item in viewed:
        last = cluster.producer.click(u, item)
    cluster.producer.flush()
    rec = cluster.output.wait_for_cause(u, last)
    assert len(rec.items) == cluster.settings.top_k
    assert rec.model_version and rec.index_version and rec.mode == "live"
    assert rec.publish_time >= rec.event_time
    for item in rec.items:
        assert item.item_id in cluster.by_id
        assert item.reason in {"similar_to_recent", "matches_search", "goes_with_purchase", "popular"}
        assert item.explanation
    # The explanations name what the user actually did.
    anchors = {i.anchor for i in rec.items if i.reason == "similar_to_recent"}
    assert anchors and anchors <= set(viewed)


def test_purchased_item_is_not_recommended_again(cluster: Cluster) -> None:
    u = user()
    last = ""
    for item in items_in(cluster, "electronics/audio", 4):
        last = cluster.producer.click(u, item)
    cluster.producer.flush()
    bought = cluster.output.wait_for_cause(u, last).items[0].item_id
    after_purchase = cluster.producer.purchase(u, bought, price=19.99)
    later = cluster.producer.click(u, items_in(cluster, "electronics/audio", 5)[-1])
    cluster.producer.flush()
    cluster.output.wait_for_cause(u, later)
    # One recommendation per user per micro-batch: the purchase may share one with the click after it.
    since_purchase = [r for r in cluster.output.for_user(u) if r.cause_event_id in (after_purchase, later)]
    assert since_purchase
    for rec in since_purchase:
        assert bought not in [i.item_id for i in rec.items]


def test_a_search_changes_that_users_recommendations(cluster: Cluster) -> None:
    u = user()
    last = ""
    for item in items_in(cluster, "books/fiction", 4):
        last = cluster.producer.click(u, item)
    cluster.producer.flush()
    before = [i.item_id for i in cluster.output.wait_for_cause(u, last).items]
    searched = cluster.producer.search(u, "wireless noise-cancelling headphones")
    cluster.producer.flush()
    after = cluster.output.wait_for_cause(u, searched)
    assert [i.item_id for i in after.items] != before
    assert any(i.reason == "matches_search" for i in after.items)
    audio = [i for i in after.items if cluster.by_id[i.item_id].category == "electronics/audio"]
    assert audio, "a search for headphones should bring audio items into the list"


def test_duplicate_events_are_applied_once(cluster: Cluster) -> None:
    u = user()
    item = items_in(cluster, "toys/games", 1)[0]
    first = cluster.producer.click(u, item)
    cluster.producer.flush()
    cluster.output.wait_for_cause(u, first)
    for _ in range(3):
        cluster.producer.click(u, item, event_id=first)  # a retrying backend
    cluster.producer.flush()
    second = cluster.producer.click(u, item)
    cluster.producer.flush()
    cluster.output.wait_for_cause(u, second)
    state = cluster.workers[0].state(u)
    assert state is not None
    assert state["clicks"] == 2 and len(state["history"]) == 2
    # The retries changed nothing, so they caused no recommendation: one for each distinct event.
    assert [r.cause_event_id for r in cluster.output.for_user(u)] == [first, second]


def test_each_kind_of_bad_input_is_dead_lettered_and_valid_events_around_it_are_processed(
    cluster: Cluster,
) -> None:
    u = user()
    codec = AvroCodec()
    item = items_in(cluster, "home/kitchen", 1)[0]
    producer = cluster.producer
    producer.click(u, item)  # a valid event before the bad ones

    def click_record(**override: object) -> dict:
        return {
            "event_id": uuid.uuid4().hex,
            "user_id": u,
            "timestamp": 1_790_000_000_000,
            "item_id": item,
            **override,
        }

    ts = int(time.time() * 1000)
    # A writer schema that lacks a required field, and one with a wrong type: published like any other schema.
    missing = json.loads(bundled_schemas()["ClickEvent"].json)
    missing["fields"] = [f for f in missing["fields"] if f["name"] != "item_id"]
    wrong = json.loads(bundled_schemas()["ClickEvent"].json)
    wrong["fields"] = [{**f, "type": "long"} if f["name"] == "item_id" else f for f in wrong["fields"]]
    bad: dict[str, bytes] = {
        "undecodable": b"\x00\x01 definitely not avro",
        "unknown_schema": b"\xc3\x01" + bytes(8) + b"\x02",
        "unknown_item": codec.encode("ClickEvent", click_record(item_id="no-such-item", timestamp=ts)),
        "absurd_timestamp": codec.encode("ClickEvent", click_record(timestamp=ts + 30 * 86_400_000)),
    }
    for reason, schema in (("incompatible_schema", missing), ("incompatible_schema/type", wrong)):
        writer = make_schema(schema)
        with EventProducer(cluster.settings, codec=AvroCodec({**codec.schemas, "ClickEvent": writer})) as p:
            record = click_record(timestamp=ts)
            if reason.endswith("type"):
                record["item_id"] = 42
            else:
                record.pop("item_id")
            p.send("ClickEvent", record, key=u)
            p.flush()
            bad[reason] = codec.encode("ClickEvent", record, schema=writer)
    # The client refuses invalid records, so they are sent as raw bytes, as a careless backend would.
    for value in bad.values():
        producer.send_raw(cluster.settings.events_topic, u, value)
    valid_after = producer.click(u, item)
    producer.flush()

    cluster.output.wait_for_cause(u, valid_after)
    state = cluster.workers[0].state(u)
    assert state is not None and state["clicks"] == 2, "both valid events are applied"

    def letters() -> dict[str, dict]:
        return {d["reason"]: d for d in cluster.output.dead_letters if d["key"] == u.encode()}

    expected = {"undecodable", "unknown_schema", "unknown_item", "absurd_timestamp", "incompatible_schema"}
    wait_for(lambda: expected <= set(letters()), 30, what=f"dead letters {expected}")
    got = letters()
    for reason in ("undecodable", "unknown_schema", "unknown_item", "absurd_timestamp"):
        assert got[reason]["value"] == bad[reason], f"{reason}: the original bytes are kept"
        assert got[reason]["key_size"] is None and got[reason]["value_size"] is None, "nothing cut"
    assert "no-such-item" in got["unknown_item"]["detail"]
    assert all(d["source_topic"] == cluster.settings.events_topic and d["detail"] for d in got.values())
    incompatible = [
        d
        for d in cluster.output.dead_letters
        if d["key"] == u.encode() and d["reason"] == "incompatible_schema"
    ]
    assert len(incompatible) == 4, "missing field and wrong type, each sent twice"
    originals = {bad["incompatible_schema"], bad["incompatible_schema/type"]}
    assert sorted(d["value"] for d in incompatible) == sorted([*originals, *originals]), "original bytes"


def test_a_producer_with_an_added_optional_field_does_not_break_the_running_worker(cluster: Cluster) -> None:
    u = user()
    evolved = json.loads(bundled_schemas()["ClickEvent"].json)
    evolved["fields"].append({"name": "campaign", "type": ["null", "string"], "default": None})
    codec = AvroCodec({**bundled_schemas(), "ClickEvent": make_schema(evolved)})
    item = items_in(cluster, "sports/running", 1)[0]
    with EventProducer(cluster.settings, codec=codec) as producer:
        event_id = uuid.uuid4().hex
        record = {
            "event_id": event_id,
            "user_id": u,
            "timestamp": int(time.time() * 1000),
            "item_id": item,
            "campaign": "black-friday",
        }
        producer.send("ClickEvent", record, key=u)
    rec = cluster.output.wait_for_cause(u, event_id)
    state = cluster.workers[0].state(u)
    assert state is not None and state["history"][-1]["item_id"] == item
    assert state["history"][-1]["kind"] == EventKind.CLICK
    assert rec.items


def expected_states(sent: dict[str, list[Event]], limits: StateLimits) -> dict[str, dict]:
    """Each user's whole state as the pure core builds it from the events sent, in order (duplicates
    included), in the form of the worker's /users/{id}/state answer."""
    states = {}
    for u, events in sent.items():
        state = None
        for e in events:  # the worker's path: de-duplication, then the bot detector (no rate limit here)
            state = apply_screened(state, e, limits, AbuseRules(), HISTORY)[0]
        assert state is not None
        states[u] = comparable_state(json.loads(json.dumps({"found": True, **dataclasses.asdict(state)})))
    return states


def test_kill_9_mid_batch_under_load_restores_each_users_whole_state_on_its_disk_or_a_lost_one(
    cluster: Cluster,
) -> None:
    """README: "Kill -9 a worker, even with its disk lost, and the next worker restores exactly the same
    state. Events sent meanwhile are processed." Twice, each time while the worker is part-way through a
    backlog (batches applied, some in flight, the rest unread): first restarted on its own disk, then on an
    empty one. Shoppers retry some events (the same event id), and more events arrive while it is down. Each
    user's whole state at the end (history, purchased items, seen event ids, counters, last event) must be
    what the pure core builds from the events sent, each applied exactly once."""
    settings = cluster.settings
    limits = StateLimits(settings.history_length, settings.max_purchased, settings.dedupe_window)
    rng = random.Random(31)
    items = [i.item_id for i in cluster.catalog if i.in_stock]
    users = [user() for _ in range(200)]
    sent: dict[str, list[Event]] = {u: [] for u in users}
    clock = int(time.time() * 1000) - 3_600_000

    def send(rounds: int) -> int:
        """Each user's next ``rounds`` events, a second apart; 5% sent twice. Returns the records sent."""
        nonlocal clock
        records = 0
        for _ in range(rounds):
            clock += 1000
            for n, u in enumerate(users):
                roll, item = rng.random(), rng.choice(items)
                event_id, ts = uuid.uuid4().hex, clock + n
                if roll < 0.15:
                    e = Event(event_id, u, EventKind.SEARCH, ts, query=cluster.by_id[item].title.lower())
                elif roll < 0.3:
                    e = Event(event_id, u, EventKind.PURCHASE, ts, item_id=item, price=9.5)
                else:
                    e = Event(event_id, u, EventKind.CLICK, ts, item_id=item)
                for _ in range(2 if rng.random() < 0.05 else 1):
                    cluster.producer.send_event(e)
                    sent[u].append(e)
                    records += 1
        cluster.producer.flush()
        return records

    def applied(worker: WorkerProcess) -> float:
        return metric_total(worker.metrics_text(), "streamrec_events_total")

    def whole_states(worker: WorkerProcess) -> dict[str, dict | None]:
        return {u: comparable_state(worker.state(u)) for u in users}

    for lose_disk in (False, True):
        worker = cluster.workers.pop()
        before = applied(worker)
        backlog = send(30)  # over 6,000 records, waiting for the worker
        progress = wait_for(
            lambda w=worker, b=before: (done := applied(w) - b) >= 1000 and done,
            60,
            interval_s=0.02,
            what="the worker to be part-way through the backlog",
        )
        worker.kill()
        assert progress < backlog, "the whole backlog was applied before the kill: not mid-batch"
        if lose_disk:
            shutil.rmtree(worker.data_dir)  # nothing local survives: the changelog must hold it all
        send(2)  # the web backends keep sending while the worker is down
        replacement = cluster.worker(worker.name)  # the same data directory, kept or emptied
        replacement.wait_ready()
        expected = expected_states(sent, limits)
        try:
            wait_for(lambda r=replacement, e=expected: whole_states(r) == e, 90, 0.5, "the states")
        except AssertionError:
            got = whole_states(replacement)
            wrong = [u for u in users if got[u] != expected[u]]
            u = wrong[0]
            raise AssertionError(
                f"after kill -9 ({'lost disk' if lose_disk else 'own disk'}), {len(wrong)} of {len(users)} "
                f"users differ, e.g. {u}:\n got {got[u]}\nwant {expected[u]}"
            ) from None


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_promoted_model_is_swapped_in_live_with_its_index(cluster: Cluster, tmp_path: Path) -> None:
    from streamrec.models.registry import current, read_metadata

    served = current(cluster.settings.model_registry)
    assert served is not None
    candidate = tmp_path / "candidate"
    shutil.copytree(served, candidate)
    metadata = read_metadata(candidate)
    metadata["version"] = "candidate-v2"
    metadata["parent_version"] = served.name
    (candidate / "metadata.json").write_text(json.dumps(metadata))
    update = {
        "model_version": "candidate-v2",
        "path": str(candidate),
        "parent_version": served.name,
        "metrics": {},
        "promoted_at": int(time.time() * 1000),
    }
    worker = cluster.workers[-1]
    ranking = (worker.get("/health") or {})["ranking_process"]  # the default: the model is in a child
    assert ranking is not None and ranking["alive"]
    cluster.producer.send("ModelUpdate", update, key="current", topic=cluster.settings.model_updates_topic)
    cluster.producer.flush()
    wait_for(lambda: (worker.get("/health") or {}).get("model_version") == "candidate-v2", 60, what="swap")
    # The new model's ranking process serves now; the old one exits once its last ranking is out.
    now_ranking = (worker.get("/health") or {})["ranking_process"]
    assert now_ranking["alive"] and now_ranking["pid"] != ranking["pid"]
    wait_for(lambda: not running(ranking["pid"]), 30, what="the old ranking process to exit")

    u = user()
    event_id = cluster.producer.click(u, items_in(cluster, "sports/running", 1)[0])
    cluster.producer.flush()
    rec = cluster.output.wait_for_cause(u, event_id)
    assert rec.model_version == "candidate-v2"
    assert rec.index_version.startswith(read_metadata(candidate)["index_version"])


def test_a_model_update_no_worker_can_load_is_dead_lettered_and_the_served_model_stays(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A ModelUpdate naming a directory that holds no model (a typo, a volume not mounted) goes to the dead
    letters with the reason; it is not written to the models table, so no worker is told to serve it."""
    served = {w.name: (w.get("/health") or {}).get("model_version") for w in cluster.workers}
    update = {
        "model_version": "never-trained",
        "path": str(tmp_path / "no-such-model"),
        "parent_version": None,
        "metrics": {},
        "promoted_at": int(time.time() * 1000),
    }
    cluster.producer.send("ModelUpdate", update, key="current", topic=cluster.settings.model_updates_topic)
    cluster.producer.flush()
    letter = wait_for(
        lambda: next((d for d in cluster.output.dead_letters if d["reason"] == "unloadable_model"), None),
        60,
        what="the unloadable model update's dead letter",
    )
    assert letter["source_topic"] == cluster.settings.model_updates_topic
    assert "never-trained" in letter["detail"]
    assert {w.name: (w.get("/health") or {}).get("model_version") for w in cluster.workers} == served
    u = user()
    event_id = cluster.producer.click(u, items_in(cluster, "sports/running", 1)[0])
    cluster.producer.flush()
    assert cluster.output.wait_for_cause(u, event_id).model_version in set(served.values())


def test_a_backend_using_the_apache_avro_library_with_each_schema_file_alone_is_understood(
    cluster: Cluster,
) -> None:
    """A Python backend that is not streamrec's client: the Apache project's Avro library, each .avsc loaded
    alone, its own fingerprint (which for schemas with logical types is not the specification's) published
    on the schemas topic as docs/contracts.md says, librdkafka's default-compatible partitioner. The worker
    applies its events; the recommendations decode with the same library and Recommendation.avsc alone."""
    import io
    from datetime import UTC, datetime

    import avro.io
    import avro.schema
    from confluent_kafka import Consumer, Producer, TopicPartition

    root = Path(__file__).resolve().parents[2] / "schemas"

    def load(name: str) -> tuple[avro.schema.Schema, str, bytes]:
        text = (root / f"{name}.avsc").read_text()
        schema = avro.schema.parse(text)
        return schema, text, schema.fingerprint("CRC-64-AVRO")  # already in wire order

    def framed(name: str, record: dict) -> bytes:
        schema, _, fp = load(name)
        body = io.BytesIO()
        avro.io.DatumWriter(schema).write(record, avro.io.BinaryEncoder(body))
        return b"\xc3\x01" + fp + body.getvalue()

    settings = cluster.settings
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "partitioner": "murmur2_random"})
    for name in ("SearchEvent", "ClickEvent", "PurchaseEvent"):
        _, text, fp = load(name)
        producer.produce(settings.schemas_topic, key=fp, value=text.encode())
    producer.flush(10)
    u = user()
    now = datetime.now(UTC)
    item = items_in(cluster, "home/kitchen", 2)
    base = {"user_id": u, "timestamp": now, "session_id": None, "context": None}
    search = {**base, "event_id": f"{u}-s", "query": "cast iron pan"}
    click = {**base, "event_id": f"{u}-c", "item_id": item[0]}
    purchase = {
        **base,
        "event_id": f"{u}-p",
        "item_id": item[1],
        "price": 30.0,
        "quantity": 1,
        "currency": "EUR",
    }
    for name, record in (("SearchEvent", search), ("ClickEvent", click), ("PurchaseEvent", purchase)):
        producer.produce(settings.events_topic, key=u.encode(), value=framed(name, record))
    producer.flush(10)

    try:
        cluster.output.wait_for_cause(u, f"{u}-p")
    except AssertionError:
        raise AssertionError([d for d in cluster.output.dead_letters if d["key"] == u.encode()]) from None
    state = cluster.workers[-1].state(u)
    assert state is not None and (state["searches"], state["clicks"], state["purchases"]) == (1, 1, 1)
    assert not [d for d in cluster.output.dead_letters if d["key"] == u.encode()]

    reader = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"apache-{u}"})
    reader.assign([TopicPartition(settings.recommendations_topic, p, 0) for p in range(settings.partitions)])
    recommendation = load("Recommendation")[0]
    found = None
    deadline = time.monotonic() + 30
    while found is None and time.monotonic() < deadline:
        for msg in reader.consume(500, 0.5):
            if msg.error() or msg.key() != u.encode():
                continue
            value = msg.value()
            assert value[:2] == b"\xc3\x01"
            decoded = avro.io.DatumReader(recommendation).read(avro.io.BinaryDecoder(io.BytesIO(value[10:])))
            if decoded["cause_event_id"] == f"{u}-p":
                found = decoded
    reader.close()
    assert found is not None and found["user_id"] == u and found["items"]
    assert isinstance(found["event_time"], datetime)  # the logical type, as the library reads it
    assert item[1] not in [i["item_id"] for i in found["items"]], "what was bought is not recommended"
