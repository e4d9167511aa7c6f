"""Dataset readers (SASRec lines, per-user lines, side files, native events) and the leave-one-out split."""

from __future__ import annotations

import json
from pathlib import Path

from streamrec.models import data
from streamrec.models.data import Step, leave_one_out
from streamrec.records import EventKind


def test_reads_user_item_lines_and_keeps_order(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("1 10\n1 11\n1 12\n2 11\n2 13\n")
    d = data.load(tmp_path / "x.txt")
    assert d.item_ids == ["10", "11", "12", "13"]
    assert [s.item for s in d.sequences["1"]] == [1, 2, 3]
    assert d.fingerprint.startswith("sha256:")


def test_reads_one_user_per_line_directory_with_side_files(tmp_path: Path) -> None:
    (tmp_path / "Shop.txt").write_text("1 5 6 7\n2 6 7 8 5\n")
    (tmp_path / "Shop_item2attributes.json").write_text(
        json.dumps({"5": [1, 2], "6": [2], "7": [3], "8": [1]})
    )
    d = data.load(tmp_path)
    assert len(d.sequences["2"]) == 4
    assert d.attributes["5"] == [1, 2] and d.num_attributes == 3


def test_reads_movielens_item_table(tmp_path: Path) -> None:
    (tmp_path / "ml.txt").write_text("1 1\n1 2\n1 1\n")
    (tmp_path / "ml_items.tsv").write_text(
        "item_id\tmovielens_movie_id\ttitle\trelease_year\tgenres\n1\t9\tHeat\t1995\tAction|Crime\n"
    )
    d = data.load(tmp_path)
    assert d.titles["1"] == "Heat (1995)"
    assert "Action, Crime" in d.texts["1"]


def test_reads_native_events_with_kinds_and_queries(tmp_path: Path) -> None:
    events = [
        {"event_id": "1", "user_id": "u", "kind": "search", "timestamp": 1, "query": "red shoes"},
        {"event_id": "2", "user_id": "u", "kind": "click", "timestamp": 2, "item_id": "a"},
        {"event_id": "3", "user_id": "u", "kind": "purchase", "timestamp": 3, "item_id": "b"},
    ]
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    items = [{"item_id": i, "title": i.upper(), "category": "c", "in_stock": True} for i in ("a", "b", "z")]
    (tmp_path / "catalog.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    d = data.load(tmp_path)
    assert d.item_ids == ["a", "b", "z"]  # catalogue items without events are still in the vocabulary
    seq = d.sequences["u"]
    assert [s.kind for s in seq] == [EventKind.SEARCH, EventKind.CLICK, EventKind.PURCHASE]
    assert seq[0].query == "red shoes" and seq[0].item == 0
    assert d.window == (1, 3) and d.titles["z"] == "Z"


def test_leave_one_out_targets_are_the_last_two_item_events() -> None:
    seq = [Step(1, 1), Step(2, 0, "q"), Step(1, 2), Step(1, 3), Step(2, 0, "r"), Step(3, 4)]
    split = leave_one_out({"u": seq, "short": [Step(1, 1), Step(1, 2)]})
    assert split.test["u"] == (seq[:5], 4)
    assert split.valid["u"] == (seq[:3], 3)
    assert split.train["u"] == seq[:3]
    assert "short" in split.train and "short" not in split.test
