"""A canary: stable buckets by user id, each group ranked by its own model in one call, every record
carrying the versions of the model that made it, and the rule that promotes or rolls back on live figures."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from streamrec.records import RankedBatch, Recommendation, RecommendedItem, UserState
from streamrec.serde import AvroCodec, RecommendationWriter
from streamrec.streams.canary import Canary, CanaryTally, Figures, bucket, in_canary, judge
from streamrec.streams.event_stage import prepare_ranking


class Model:
    """A recommender that recommends its own name's item to everyone, and counts its calls."""

    def __init__(self, version: str) -> None:
        self.model_version = version
        self.index_version = f"{version}.0"
        self.calls: list[list[str]] = []
        self.upserts = 0

    def upsert_items(self, items: list) -> None:
        self.upserts += 1

    def rank(self, users: list[UserState], k: int) -> RankedBatch:
        return self.prepare(users, k)()

    def prepare(self, users: list[UserState], k: int) -> Callable[[], RankedBatch]:
        self.calls.append([u.user_id for u in users])
        item = RecommendedItem(f"item-of-{self.model_version}", 1.0, "popular", "Popular right now")
        return lambda: RankedBatch.of([[item] for _ in users])


def crc32(data: bytes) -> int:
    """CRC-32 (IEEE 802.3, as zlib, Java's CRC32 and Node's zlib.crc32 compute it), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def test_buckets_are_stable_and_a_share_takes_that_share_of_users() -> None:
    users = [f"user-{n}" for n in range(20_000)]
    assert [bucket(u) for u in users[:50]] == [bucket(u) for u in users[:50]]
    assert [bucket(u) for u in users[:50]] == [crc32(u.encode()) % 10_000 for u in users[:50]]
    share = sum(in_canary(u, 0.1) for u in users) / len(users)
    assert 0.09 < share < 0.11
    assert not any(in_canary(u, 0.0) for u in users[:1000])
    assert {u for u in users if in_canary(u, 0.05)} <= {u for u in users if in_canary(u, 0.1)}  # grows


def test_each_group_is_ranked_in_one_call_and_each_record_carries_its_models_versions() -> None:
    serving, candidate = Model("v1"), Model("v2")
    canary = Canary(serving, candidate, 0.5, started_at=1)  # type: ignore[arg-type]
    users = [UserState(f"u{n}") for n in range(40)]
    ranked = canary.prepare_split(users, [b""] * 40, 10, prepare_ranking)()  # type: ignore[arg-type]
    expected = [in_canary(u.user_id, 0.5) for u in users]
    assert 0 < sum(expected) < 40
    assert len(serving.calls) == len(candidate.calls) == 1
    assert candidate.calls[0] == [u.user_id for u, c in zip(users, expected, strict=True) if c]
    heads = [(u.user_id, f"e{n}", n, "live") for n, u in enumerate(users)]
    bodies = ranked.bodies(RecommendationWriter(), heads, publish_time=99)
    codec = AvroCodec()
    for n, (user, body, canaried) in enumerate(zip(users, bodies, expected, strict=True)):
        rec = Recommendation.from_avro(codec.decode(codec.header("Recommendation") + body)[1])
        version = "v2" if canaried else "v1"
        assert (rec.user_id, rec.cause_event_id) == (user.user_id, f"e{n}")
        assert (rec.model_version, rec.index_version) == (version, f"{version}.0")
        assert rec.items[0].item_id == f"item-of-{version}" == f"item-of-{ranked.model_version(n)}"
        assert ranked.ids(n) == [f"item-of-{version}"]


def test_a_batch_of_one_group_asks_only_its_model() -> None:
    serving, candidate = Model("v1"), Model("v2")
    canary = Canary(serving, candidate, 0.0001, started_at=1)  # type: ignore[arg-type]
    users = [UserState(u) for u in ("a", "b", "c") if not in_canary(u, 0.0001)]
    ranked = canary.prepare_split(users, [b""] * len(users), 10, prepare_ranking)()  # type: ignore[arg-type]
    assert candidate.calls == [] and len(ranked) == len(users)


def report(worker: str, created: int, serving: tuple[int, int], canary: tuple[int, int]) -> dict:
    return {
        "worker_id": worker,
        "serving_version": "v1",
        "canary_version": "v2",
        "canary_share": 0.1,
        "serving_hits": serving[0],
        "serving_outcomes": serving[1],
        "canary_hits": canary[0],
        "canary_outcomes": canary[1],
        "started_at": 1,
        "created_at": created,
    }


def test_the_tally_adds_each_workers_newest_report_of_this_canary() -> None:
    tally = CanaryTally("v2", "v1")
    tally.add(report("w1", 10, (10, 100), (2, 10)))
    tally.add(report("w1", 30, (30, 300), (6, 30)))  # cumulative: the newest replaces
    tally.add(report("w1", 20, (20, 200), (4, 20)))  # late and older: ignored
    tally.add(report("w2", 15, (5, 50), (1, 5)))
    tally.add(report("w3", 40, (999, 999), (0, 999)) | {"canary_version": "v9"})  # another canary
    serving, canary = tally.figures()
    assert (serving.hits, serving.outcomes, canary.hits, canary.outcomes) == (35, 350, 7, 35)


@pytest.mark.parametrize(
    ("canary", "tolerance", "decision"),
    [
        (Figures(120, 1000), 0.0, "promote"),  # better
        (Figures(100, 1000), 0.0, "promote"),  # as good
        (Figures(95, 1000), 0.0, "rollback"),
        (Figures(95, 1000), 0.1, "promote"),  # within the tolerance
        (Figures(50, 999), 0.0, None),  # not judged before the minimum
    ],
)
def test_the_rule_promotes_a_canary_that_holds_up_and_rolls_back_one_that_does_not(
    canary: Figures, tolerance: float, decision: str | None
) -> None:
    assert judge(Figures(100, 1000), canary, 1000, tolerance)[0] == decision
