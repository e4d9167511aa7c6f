"""The spine end to end: client events in, explained recommendations out, bad input dead-lettered."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from streamrec.records import EventKind
from streamrec.serde import AvroCodec, bundled_schemas, make_schema
from streamrec.streams.client import EventProducer
from tests.conftest import wait_for
from tests.integration.conftest import Cluster

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
    for _ in range(3):
        cluster.producer.click(u, item, event_id=first)  # a retrying backend
    second = cluster.producer.click(u, item)
    cluster.producer.flush()
    cluster.output.wait_for_cause(u, second)
    state = cluster.workers[0].state(u)
    assert state is not None
    assert state["clicks"] == 2 and len(state["history"]) == 2
    assert [r.cause_event_id for r in cluster.output.for_user(u)].count(first) <= 1


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
    assert got["undecodable"]["value"] == bad["undecodable"], "the original bytes are kept"
    assert got["unknown_item"]["value"] == bad["unknown_item"]
    assert "no-such-item" in got["unknown_item"]["detail"]
    assert all(d["source_topic"] == cluster.settings.events_topic and d["detail"] for d in got.values())
    incompatible = [
        d
        for d in cluster.output.dead_letters
        if d["key"] == u.encode() and d["reason"] == "incompatible_schema"
    ]
    assert len(incompatible) == 4, "missing field and wrong type, each sent twice"


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


def test_state_survives_kill_9_and_a_lost_disk_and_events_sent_meanwhile_are_processed(
    cluster: Cluster,
) -> None:
    users = [user() for _ in range(20)]
    items = items_in(cluster, "beauty/makeup", 6)
    last: dict[str, str] = {}
    for n, u in enumerate(users):
        for item in items[: 2 + n % 3]:
            last[u] = cluster.producer.click(u, item)
    cluster.producer.flush()
    for u in users:
        cluster.output.wait_for_cause(u, last[u])
    worker = cluster.workers[0]
    before = {u: worker.state(u) for u in users}
    assert all(before.values())

    worker.kill()
    shutil.rmtree(worker.data_dir)  # the hard case: nothing local survives, the changelog must hold it all
    for u in users:  # the web backends keep sending while the worker is down
        last[u] = cluster.producer.click(u, items[-1])
    cluster.producer.flush()

    replacement = cluster.worker("worker-0b")
    cluster.workers.remove(worker)
    replacement.wait_ready()
    for u in users:
        cluster.output.wait_for_cause(u, last[u], timeout_s=60)
        after = replacement.state(u)
        assert after is not None
        assert after["history"][:-1] == before[u]["history"], "restored exactly, then the new event on top"
        assert after["history"][-1]["item_id"] == items[-1]
        assert after["clicks"] == before[u]["clicks"] + 1


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
