"""The replay tool's pure core: sources (one contract for every file format), row mapping, filters, rate,
checkpoint and resume, invalid records, and the shadow comparison's metrics. No broker."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from streamrec.records import Event, EventKind, Recommendation, RecommendedItem
from streamrec.sample import event_to_json
from streamrec.serde import bundled_schemas
from streamrec.settings import Settings
from streamrec.state import StateLimits
from streamrec.streams.event_stage import CoPartitioningError, check_co_partitioned, follow
from streamrec.streams.replay import (
    FILE,
    Checkpoint,
    DryRunSink,
    Filters,
    Invalid,
    RateLimiter,
    ReplayError,
    ReplayOptions,
    RowError,
    SourceRecord,
    event_from_row,
    open_source,
    parse_time,
    run_replay,
)
from streamrec.streams.shadow import build_pairs, hit_and_ndcg, overlap_at_k

T0 = 1_700_000_000_000
SETTINGS = Settings()


def history() -> list[Event]:
    return [
        Event("e1", "alice", EventKind.CLICK, T0, item_id="sku-1", session_id="s1"),
        Event("e2", "alice", EventKind.SEARCH, T0 + 1000, query="red shoes"),
        Event("e3", "bob", EventKind.PURCHASE, T0 + 2000, item_id="sku-2", price=19.5, quantity=2),
        Event("e4", "alice", EventKind.CLICK, T0 + 3000, item_id="sku-3"),
    ]


def rows() -> list[dict]:
    out = []
    for e in history():
        row = event_to_json(e)
        out.append({"item_id": None, "query": None, "price": None, "quantity": None, **row})
    return out


def write(path: Path, fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(event_to_json(e)) + "\n" for e in history()))
    elif fmt == "csv":
        columns = ["event_id", "user_id", "kind", "timestamp", "item_id", "query", "session_id", "price"]
        columns.append("quantity")
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            for row in rows():
                writer.writerow({c: row.get(c) for c in columns})
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows()), path)
    elif fmt == "avro":
        schema = {
            "type": "record",
            "name": "ClickLog",
            "fields": [
                {"name": "event_id", "type": "string"},
                {"name": "user_id", "type": "string"},
                {"name": "event_type", "type": "string"},
                {"name": "ts", "type": "long"},
                {"name": "item_id", "type": ["null", "string"]},
                {"name": "query", "type": ["null", "string"]},
                {"name": "session_id", "type": ["null", "string"]},
                {"name": "price", "type": ["null", "double"]},
                {"name": "quantity", "type": ["null", "int"]},
            ],
        }
        records = [
            {
                "event_id": r["event_id"],
                "user_id": r["user_id"],
                "event_type": r["kind"],
                "ts": r["timestamp"],
                "item_id": r.get("item_id"),
                "query": r.get("query"),
                "session_id": r.get("session_id"),
                "price": r.get("price"),
                "quantity": r.get("quantity"),
            }
            for r in rows()
        ]
        with path.open("wb") as f:
            fastavro.writer(f, fastavro.parse_schema(schema), records)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "avro"])
def test_every_file_format_yields_the_same_events(tmp_path: Path, fmt: str) -> None:
    """The source contract: same export, any format, same events in the same order, same ids."""
    path = write(tmp_path / f"export.{fmt}", fmt)
    source = open_source(str(path), SETTINGS)
    got = [r.item for r in source.records({})]
    assert got == history()
    assert source.total() in (len(history()), None)
    resumed = [r.item for r in source.records({FILE: 3 if fmt != "csv" else 4})]
    assert resumed == history()[2:], "resume skips what the checkpoint says was done"


def test_avro_files_of_streamrec_event_schemas_take_the_kind_from_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "clicks.avro"
    click = history()[0]
    with path.open("wb") as f:
        fastavro.writer(f, bundled_schemas()["ClickEvent"].parsed, [click.to_avro()])
    assert [r.item for r in open_source(str(path), SETTINGS).records({})] == [click]


def test_datasets_become_click_events_with_monotonic_times_and_stable_ids(tmp_path: Path) -> None:
    (tmp_path / "Tiny.txt").write_text("1 10\n1 11\n1 12\n2 11\n2 13\n")
    first = [r.item for r in open_source(str(tmp_path / "Tiny.txt"), SETTINGS).records({})]
    again = [r.item for r in open_source(str(tmp_path), SETTINGS, fmt="dataset").records({})]
    assert all(isinstance(e, Event) for e in first)
    events = [e for e in first if isinstance(e, Event)]
    assert [(e.user_id, e.item_id) for e in events] == [
        ("1", "10"),
        ("1", "11"),
        ("1", "12"),
        ("2", "11"),
        ("2", "13"),
    ]
    times = [e.timestamp for e in events]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert [e.event_id for e in events] == [e.event_id for e in again if isinstance(e, Event)]
    assert len({e.event_id for e in events}) == 5


def test_row_mapping_accepts_common_column_names_and_reports_what_is_wrong() -> None:
    e = event_from_row({"UserId": 7, "productId": "p1", "event_type": "view", "time": "2024-01-02T03:04:05Z"})
    assert (e.user_id, e.item_id, e.kind, e.timestamp) == ("7", "p1", EventKind.CLICK, 1704164645000)
    assert (
        e.event_id.startswith("r-")
        and e.event_id
        == event_from_row({"user": "7", "sku": "p1", "action": "click", "ts": 1704164645}).event_id
    ), "no event id: a stable one from the content (s and ms are the same time)"
    search = event_from_row({"user_id": "u", "search_query": "tea", "ts": 1704164645000})
    assert search.kind is EventKind.SEARCH and search.query == "tea"
    for row, reason in [
        ({"item_id": "p", "ts": 1}, "missing_field"),
        ({"user_id": "u", "item_id": "p"}, "missing_field"),
        ({"user_id": "u", "item_id": "p", "ts": "yesterday"}, "bad_value"),
        ({"user_id": "u", "item_id": "p", "ts": 1, "kind": "wishlist"}, "bad_value"),
        ({"user_id": "u", "item_id": "p", "ts": 1, "kind": "purchase"}, "missing_field"),
    ]:
        with pytest.raises(RowError) as err:
            event_from_row(row)
        assert err.value.reason == reason, row


@given(st.integers(min_value=946_684_800_000, max_value=4_102_444_800_000))
def test_epoch_times_in_any_unit_mean_the_same_millisecond(ms: int) -> None:
    assert parse_time(ms) == ms
    assert parse_time(ms * 1000) == ms and parse_time(ms * 1_000_000) == ms
    assert parse_time(ms // 1000) == ms // 1000 * 1000


def test_filters_skip_by_user_kind_and_window() -> None:
    def reason(f: Filters, e: Event, record_time: int | None = None) -> str | None:
        return f.skip_reason(SourceRecord(FILE, 1, e, record_time))

    e1, e2, e3, _ = history()
    assert reason(Filters(users=frozenset({"bob"})), e1) == "user"
    assert reason(Filters(kinds=frozenset({EventKind.CLICK})), e2) == "kind"
    window = Filters(since=T0 + 1000, until=T0 + 2000)
    assert [reason(window, e) for e in (e1, e2, e3)] == ["time", None, "time"], "since inclusive, until not"
    assert reason(window, e1, record_time=T0 + 1500) is None, "Kafka ranges use the record's time"


def test_rate_limiter_paces_without_drift() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(10.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(21):
        limiter.wait()
    assert now[0] == pytest.approx(2.0)


class ListSink:
    def __init__(self, fail_after: int | None = None) -> None:
        self.target = SETTINGS.backfill_topic
        self.sent: list[object] = []
        self.delivered: list[object] = []
        self.fail_after = fail_after

    def send(self, item: object) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise KeyboardInterrupt("crash")  # the process dies: nothing after this is flushed
        self.sent.append(item)

    def flush(self) -> None:
        self.delivered = list(self.sent)

    def close(self) -> None:
        pass


def many(n: int, tmp_path: Path, bad_lines: tuple[int, ...] = ()) -> Path:
    path = tmp_path / "events.jsonl"
    with path.open("w") as f:
        for i in range(1, n + 1):
            if i in bad_lines:
                f.write('{"user_id": "u", "kind": "click"}\n' if i % 2 else "not json\n")
            else:
                e = Event(f"e{i}", f"u{i % 7}", EventKind.CLICK, T0 + i, item_id=f"i{i % 5}")
                f.write(json.dumps(event_to_json(e)) + "\n")
    return path


def test_a_crashed_run_resumes_from_its_checkpoint_and_sends_the_rest_once(tmp_path: Path) -> None:
    path = many(300, tmp_path)
    checkpoint = tmp_path / "cp.json"
    options = ReplayOptions(checkpoint=checkpoint, checkpoint_every_records=50)
    crashing = ListSink(fail_after=170)
    with pytest.raises(KeyboardInterrupt):
        run_replay(open_source(str(path), SETTINGS), crashing, SETTINGS, options)
    saved = Checkpoint.load(checkpoint)
    assert saved.next_positions[FILE] == 151 and not saved.done, "written after the flush at 150 records"
    assert len(crashing.delivered) == 150

    with pytest.raises(ReplayError, match="--resume"):
        run_replay(open_source(str(path), SETTINGS), ListSink(), SETTINGS, options)
    resumed = ListSink()
    options.resume = True
    summary = run_replay(open_source(str(path), SETTINGS), resumed, SETTINGS, options)
    assert [e.event_id for e in crashing.delivered + resumed.sent] == [f"e{i}" for i in range(1, 301)]  # type: ignore[attr-defined]
    assert summary["complete"] and summary["resumed"] and summary["sent"] == 300 and summary["read"] == 300
    again = run_replay(open_source(str(path), SETTINGS), ListSink(), SETTINGS, options)
    assert again["sent"] == 300, "a finished run sends nothing more"

    other = ReplayOptions(checkpoint=checkpoint, resume=True, filters=Filters(users=frozenset({"u1"})))
    with pytest.raises(ReplayError, match="another run"):
        run_replay(open_source(str(path), SETTINGS), ListSink(), SETTINGS, other)


def test_invalid_records_are_reported_by_line_and_written_to_the_reject_file(tmp_path: Path) -> None:
    path = many(20, tmp_path, bad_lines=(4, 9))
    reject = tmp_path / "rejects.jsonl"
    sink = ListSink()
    summary = run_replay(open_source(str(path), SETTINGS), sink, SETTINGS, ReplayOptions(reject_file=reject))
    assert summary["sent"] == 18 and summary["invalid"] == {"unparsable": 1, "missing_field": 1}
    assert [x["where"] for x in summary["invalid_examples"]] == ["line 4", "line 9"]
    rejected = [json.loads(line) for line in reject.read_text().splitlines()]
    assert [(r["offset"], r["reason"]) for r in rejected] == [(4, "unparsable"), (9, "missing_field")]
    assert rejected[0]["raw"] == "not json"

    strict = ListSink()
    options = ReplayOptions(strict=True, checkpoint=tmp_path / "strict.json")
    stopped = run_replay(open_source(str(path), SETTINGS), strict, SETTINGS, options)
    assert stopped["stopped"].startswith("line 4") and not stopped["complete"]
    assert len(strict.delivered) == 3 and Checkpoint.load(tmp_path / "strict.json").next_positions[FILE] == 4


def test_a_dry_run_counts_filters_duplicates_and_refusals_and_sends_nothing(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    events = [*history(), history()[0]]  # a duplicate event id
    future = Event("e9", "carol", EventKind.CLICK, 4_000_000_000_000, item_id="x")
    path.write_text("".join(json.dumps(event_to_json(e)) + "\n" for e in [*events, future]))
    filters = Filters(kinds=frozenset({EventKind.CLICK, EventKind.PURCHASE}))
    summary = run_replay(open_source(str(path), SETTINGS), DryRunSink("t"), SETTINGS, ReplayOptions(filters))
    assert summary["dry_run"] and summary["sent"] == 0 and summary["would_send"] == 3
    assert summary["duplicates"] == 1
    assert summary["skipped"] == {"kind": 1} and summary["invalid"] == {"refused": 1}


def test_backfill_partitions_follow_events_partitions_and_counts_must_match() -> None:
    got = follow([TopicPartition("ev", 3), TopicPartition("ev", 1)], "bf")
    assert [(tp.topic, tp.partition) for tp in got] == [("bf", 3), ("bf", 1)]
    check_co_partitioned({"ev": 4, "bf": 4}, "ev", "bf")
    with pytest.raises(CoPartitioningError, match="partitions"):
        check_co_partitioned({"ev": 4, "bf": 8}, "ev", "bf")
    with pytest.raises(CoPartitioningError, match="missing"):
        check_co_partitioned({"ev": 4}, "ev", "bf")


def test_shadow_metrics() -> None:
    assert overlap_at_k(["a", "b", "c"], ["c", "x", "a"], 3) == pytest.approx(2 / 3)
    assert hit_and_ndcg(["a", "b", "c"], "b", 3) == (1.0, pytest.approx(1 / 1.5849625))
    assert hit_and_ndcg(["a", "b", "c"], "z", 3) == (0.0, 0.0)


def test_shadow_pairs_each_served_recommendation_with_its_state_and_next_item() -> None:
    events = history()
    records = [SourceRecord(FILE, n, e) for n, e in enumerate(events, 1)]
    served = {
        "e2": Recommendation("alice", [RecommendedItem("sku-3", 1.0, "popular", "")], "v1", "i1", "e2", 0, 0)
    }
    records.append(SourceRecord(FILE, 9, Invalid("unparsable", "x")))
    comparison = build_pairs(records, Filters(since=T0 + 1000), served, 1, StateLimits())
    assert comparison.in_window == 3 and comparison.without_served == 2
    [pair] = comparison.pairs
    assert pair.next_item == "sku-3" and [h.item_id or h.query for h in pair.state.history] == [
        "sku-1",
        "red shoes",
    ]
    report = comparison.report([["sku-3"]], "candidate")
    assert (
        report["overlap@1"] == 1.0
        and report["candidate"]["hr@1"] == 1.0
        and report["served"]["ndcg@1"] == 1.0
    )
