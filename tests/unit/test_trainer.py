"""The trainer's pure core: which events make the training window (the worker's rules, erasures, the newest
N, a time range), the temporal slice that judges a candidate, the warm start's rows for new items, the
promotion rule, and which triggers' offsets may be committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamrec.models import artifacts, finetune
from streamrec.models.data import PAD
from streamrec.models.serving import Recommender
from streamrec.models.train import TrainConfig, train
from streamrec.partitioner import partition_of
from streamrec.records import CatalogItem, Event, EventKind
from streamrec.serde import AvroCodec
from streamrec.settings import Settings
from streamrec.streams.trainer.run import Trigger
from streamrec.streams.trainer.service import TriggerQueue
from streamrec.streams.trainer.window import (
    Erasure,
    Located,
    RecordRules,
    TopicsRead,
    WindowSpec,
    erasure_times,
    select_window,
)

DAY = 86_400_000
NOW = 1_800_000_000_000


def click(user: str, item: str, ts: int, event_id: str | None = None) -> Event:
    return Event(event_id or f"{user}-{item}-{ts}", user, EventKind.CLICK, ts, item_id=item)


def located(items: list[Event | Erasure], topic: str = "events", partition: int = 0) -> list[Located]:
    return [Located(item, topic, partition, offset) for offset, item in enumerate(items)]


# --- the window ------------------------------------------------------------------------------------------


def test_an_erased_user_is_left_out_up_to_the_erasure_and_a_later_event_starts_anew() -> None:
    records = located(
        [
            click("alice", "a", 100),
            click("bob", "a", 150),
            click("alice", "b", 300),  # alice's newest before the deletion: the erasure time
            Erasure("alice", 200),
            click("alice", "c", 250),  # retried old event: refused by the worker too
            click("alice", "d", 400),  # after the erasure: a new user with the same id
        ]
    )
    assert erasure_times(records) == {"alice": 300}
    window = select_window(TopicsRead(records=records, read=6), WindowSpec(max_events=100))
    assert [(e.user_id, e.item_id) for e in window.events] == [("bob", "a"), ("alice", "d")]
    assert window.description["erased_users"] == 1
    assert window.description["erased_events_left_out"] == 3


def test_the_window_is_the_newest_n_of_both_topics_in_time_order_each_event_once() -> None:
    live = located([click("u1", "a", 10), click("u1", "b", 30), click("u2", "c", 50)], "events", 1)
    backfill = located([click("u1", "z", 5), click("u1", "b", 30), click("u3", "y", 40)], "backfill", 1)
    read = TopicsRead(records=live + backfill, ends={"events": {0: 0, 1: 3}, "backfill": {1: 3}}, read=6)
    window = select_window(read, WindowSpec(max_events=3))
    assert [e.item_id for e in window.events] == ["b", "y", "c"]
    d = window.description
    assert d["duplicates"] == 1 and d["older_than_window"] == 2 and d["events"] == 3
    assert d["time_range"] == [30, 50]
    assert d["topics"]["events"] == {"0": {"end": 0}, "1": {"end": 3, "from": 1, "to": 2}}
    assert d["topics"]["backfill"] == {"1": {"end": 3, "from": 2, "to": 2}}


def test_a_time_range_selects_by_event_time() -> None:
    records = located([click("u", str(i), ts) for i, ts in enumerate((100, 200, 300, 400))])
    window = select_window(TopicsRead(records=records), WindowSpec(max_events=10, since_ms=200, until_ms=400))
    assert [e.timestamp for e in window.events] == [200, 300]
    assert window.description["outside_time_range"] == 2
    hours = Settings(trainer_window_hours=2.0, trainer_window_events=500)
    assert WindowSpec.from_settings(hours, NOW) == WindowSpec(500, NOW - 2 * 3_600_000, None)


@pytest.fixture
def rules() -> RecordRules:
    catalog = {"sku-1": CatalogItem("sku-1", "Rose Serum")}
    return RecordRules(Settings(max_event_age_days=30), AvroCodec(), catalog, NOW)


def encoded(event: Event) -> tuple[bytes, bytes]:
    return event.user_id.encode(), AvroCodec().encode(event.schema_name, event.to_avro())


def test_records_are_held_to_the_workers_rules(rules: RecordRules) -> None:
    good = click("u42", "sku-1", NOW - DAY)
    home = partition_of(b"u42", 4)
    key, value = encoded(good)
    assert rules.check("streamrec.events", home, 4, key, value) == good
    refused = {
        "wrong_key": rules.check("streamrec.events", home, 4, b"someone", value),
        "wrong_partition": rules.check("streamrec.events", (home + 1) % 4, 4, key, value),
        "unknown_item": rules.check("streamrec.events", home, 4, *encoded(click("u42", "sku-9", NOW))),
        "undecodable": rules.check("streamrec.events", home, 4, key, b"\x00garbage"),
        "too_large": rules.check("streamrec.events", home, 4, key, value + b"x" * 70_000),
    }
    assert {reason: getattr(r, "reason", None) for reason, r in refused.items()} == {
        reason: reason for reason in refused
    }
    old = encoded(click("u42", "sku-1", NOW - 60 * DAY))
    assert getattr(rules.check("streamrec.events", home, 4, *old), "reason", None) == "absurd_timestamp"
    assert isinstance(rules.check("streamrec.events.backfill", home, 4, *old), Event)  # history: no age limit
    deletion = AvroCodec().encode(
        "UserDeletion", {"event_id": "d1", "user_id": "u42", "timestamp": NOW, "requested_by": None}
    )
    assert rules.check("streamrec.events", home, 4, key, deletion) == Erasure("u42", NOW)


# --- the temporal slice ----------------------------------------------------------------------------------


def test_the_newest_share_is_never_trained_on_and_its_item_events_are_the_cases() -> None:
    events = [
        click("u1", "a", 1),
        click("u2", "a", 2),
        click("u1", "b", 3),
        click("u2", "new-1", 4),
        Event("s", "u3", EventKind.SEARCH, 5, query="tent"),
        click("u1", "new-1", 6),  # slice: u1 has history
        click("u4", "a", 7),  # slice: u4 has no earlier event, no case
        click("u2", "b", 8),  # slice
    ]
    catalog = {"new-2": CatalogItem("new-2", "Trail Tent", "outdoor")}
    data = finetune.temporal_split(events, ["a", "b"], catalog, eval_share=0.375, max_cases=10)
    assert data.item_ids == ["a", "b", "new-1", "new-2"] and data.new_items == ["new-1", "new-2"]
    assert data.cut_time == 6
    assert {u: [s.item for s in seq] for u, seq in data.train.items()} == {
        "u1": [1, 2],
        "u2": [1, 3],
        "u3": [PAD],
    }
    cases = sorted((prefix[-1].item, target) for prefix, target in data.cases.values())
    assert cases == [(2, 3), (3, 2)]  # u1: b -> new-1; u2: new-1 -> b
    assert data.counts == {
        "events": 8,
        "train_events": 5,
        "slice_events": 3,
        "users": 4,
        "train_users": 3,
        "cases": 2,
        "new_items": 2,
    }
    sample = finetune.temporal_split(events, ["a", "b"], {}, eval_share=0.375, max_cases=1)
    assert len(sample.cases) == 1


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamrec.models import synthetic

    data = synthetic.write(tmp_path_factory.mktemp("data"), users=200)
    config = TrainConfig.preset("tiny", epochs=2, max_minutes=2.0)
    return train(data, tmp_path_factory.mktemp("model") / "m", config, progress=False)


def test_new_items_start_as_the_content_vectors_serving_gives_them(parent: Path) -> None:
    art = artifacts.load(parent)
    item = CatalogItem("trail-1", "Trail Running Shoe", "shoes", description="a running shoe")
    bigger = finetune.expand(art.model, art.embedder, [item.text, None])
    n = art.config.num_items
    assert bigger.config.num_items == n + 2
    with torch.inference_mode():
        old, new = art.model.item_vectors(), bigger.item_vectors()
        assert torch.equal(new[: n + 1], old)  # every known item exactly as before
        assert torch.equal(new[n + 2], torch.zeros_like(new[n + 2]))  # no text: as served, nothing
    serving = Recommender.load(parent, device="cpu")
    serving.upsert_items([item])
    assert np.allclose(new[n + 1].numpy(), serving.item_vector("trail-1"), atol=1e-5)


def test_a_run_trains_a_candidate_and_scores_it_and_its_parent_on_the_same_slice(parent: Path) -> None:
    ids = artifacts.load(parent).items.ids
    events = []
    for u in range(60):  # users walk the catalogue's first items in order
        for step in range(8):
            events.append(click(f"u{u}", ids[(u + step) % 10], u * 100 + step))
    events.sort(key=lambda e: e.timestamp)
    data = finetune.temporal_split(events, ids, {}, eval_share=0.2, max_cases=500)
    result = finetune.fine_tune(data, parent, TrainConfig.preset("tiny", epochs=2, max_minutes=1.0))
    assert result.mode == "fine_tune" and result.parent is not None
    assert result.candidate["users"] == result.parent["users"] == len(data.cases)
    assert set(finetune.METRICS) <= set(result.candidate)
    assert result.report["cpu_seconds"] > 0


def test_a_candidate_records_the_texts_its_item_rows_hold(parent: Path, tmp_path: Path) -> None:
    """The parent's rows are kept, so its digests are; a new item's row is its catalogue text: a worker
    serving the candidate embeds again only what was rewritten since (tests/unit/test_models_serving.py)."""
    table = artifacts.load(parent).items
    tent = CatalogItem("tent-1", "Dome Tent", "outdoor", description="a tent for camping")
    events = [click(f"u{u}", table.ids[(u + s) % 10], u * 100 + s) for u in range(20) for s in range(4)]
    events.sort(key=lambda e: e.timestamp)
    data = finetune.temporal_split(events, table.ids, {"tent-1": tent}, eval_share=0.2, max_cases=50)
    result = finetune.fine_tune(data, parent, TrainConfig.preset("tiny", epochs=1, max_minutes=1.0))
    finetune.save_candidate(tmp_path / "c", result, data, {"index_version": "c.0"})
    assert table.text_digests is not None and None not in table.text_digests
    saved = artifacts.load(tmp_path / "c").items
    assert saved.text_digests == [*table.text_digests, artifacts.text_digest(tent.text)]


def test_a_description_rewritten_since_the_parent_is_embedded_again(parent: Path, tmp_path: Path) -> None:
    """A worker serving the parent embeds a rewritten description again at load; the trainer does the same
    before it judges the parent and trains the candidate, and the candidate records the new text, so a
    worker serving it has nothing left to embed again and no other item's row moves."""
    art = artifacts.load(parent)
    table = art.items
    assert art.embedder is not None and table.text_digests is not None
    first = table.ids[0]
    boot = CatalogItem(first, "Waterproof Hiking Boot", "shoes", description="a boot for wet trails")
    events = [click(f"u{u}", table.ids[(u + s) % 10], u * 100 + s) for u in range(20) for s in range(4)]
    events.sort(key=lambda e: e.timestamp)
    data = finetune.temporal_split(events, table.ids, {first: boot}, eval_share=0.2, max_cases=50)
    result = finetune.fine_tune(data, parent, TrainConfig.preset("tiny", epochs=1, max_minutes=1.0))
    assert result.text_digests == [artifacts.text_digest(boot.text), *table.text_digests[1:]]
    rows = result.model.item_text
    assert np.allclose(rows[1].numpy(), art.embedder.embed_items([boot.text])[0], atol=1e-6)
    assert torch.equal(rows[2:], art.model.item_text[2:])  # every other item's row is the parent's
    finetune.save_candidate(tmp_path / "c", result, data, {"index_version": "c.0"})
    serving = Recommender.load(tmp_path / "c", device="cpu")
    before = serving.item_vector(first)
    serving.upsert_items([boot])
    assert np.array_equal(serving.item_vector(first), before)


def test_promotion_needs_the_margin_and_a_slice() -> None:
    parent = {"ndcg@10": 0.10, "users": 50}
    assert finetune.decide({"ndcg@10": 0.12, "users": 50}, parent, "ndcg@10", 0.05)[0]
    promote, reason = finetune.decide({"ndcg@10": 0.104, "users": 50}, parent, "ndcg@10", 0.05)
    assert not promote and "5.0% margin" in reason
    assert not finetune.decide({"ndcg@10": 0.10, "users": 50}, parent, "ndcg@10", 0.0)[0]  # a tie is not
    assert not finetune.decide({"ndcg@10": 0.5, "users": 0}, parent, "ndcg@10", 0.0)[0]
    assert finetune.decide({"ndcg@10": 0.01, "users": 5}, None, "ndcg@10", 0.0)[0]  # nothing served yet


# --- triggers ------------------------------------------------------------------------------------------


def trigger(n: int) -> Trigger:
    return Trigger(f"t{n}", "new_data", "v1", "w", n)


T = ("triggers", 0)


def test_triggers_during_a_run_are_answered_by_one_follow_up_run_and_committed_after_it() -> None:
    queue = TriggerQueue()
    queue.arrived(trigger(0), T, 10)
    assert [t.trigger_id for t in queue.start() or []] == ["t0"]
    queue.arrived(trigger(1), T, 11)
    queue.arrived(None, T, 12)  # not a trigger: nothing to run
    queue.arrived(trigger(2), T, 13)
    assert queue.start() is None  # one run at a time
    assert queue.committable() == {}  # t0's run has not finished: a restart must run it again
    queue.finished()
    assert queue.committable() == {T: 11}
    assert [t.trigger_id for t in queue.start() or []] == ["t1", "t2"]
    assert queue.committable() == {}
    queue.finished()
    assert queue.committable() == {T: 14} and queue.start() is None


def test_a_revoked_partitions_triggers_are_left_to_its_new_owner() -> None:
    queue = TriggerQueue()
    reports = ("canary-reports", 0)
    queue.arrived(trigger(0), T, 5)
    queue.arrived(None, reports, 7)  # a canary report: done once read
    queue.revoked({T})
    assert queue.start() is None
    assert queue.committable() == {reports: 8}
