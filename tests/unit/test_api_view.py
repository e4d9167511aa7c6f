"""The API's view in a real RocksDB: newest recommendation per user, erasure whichever topic is read first,
the catalogue's newest version, offsets that survive a restart, and files that forget an erased user."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from streamrec.records import EventKind, HistoryEntry, UserState
from streamrec.serde import AvroCodec
from streamrec.state import encode_state
from streamrec.streams.api.view import Record, View, ViewTopics, ViewUpdater
from streamrec.streams.state_store import ERASURE_KEY, erasure_digest, erasure_value

TOPICS = ViewTopics("recs", "changelog", "catalog")
CODEC = AvroCodec()
T = 1_767_225_600_000  # 2026-01-01


class Topics:
    """Records as the three topics would deliver them, each partition with its own offsets."""

    def __init__(self) -> None:
        self.next: dict[tuple[str, int], int] = {}

    def record(self, topic: str, key: bytes | None, value: bytes | None, timestamp: int = T) -> Record:
        offset = self.next.get((topic, 0), 0)
        self.next[(topic, 0)] = offset + 1
        return Record(topic, 0, offset, key, value, timestamp)

    def rec(self, user: str, cause: str, event_time: int, items: tuple[str, ...] = ("a", "b")) -> Record:
        value = CODEC.encode(
            "Recommendation",
            {
                "user_id": user,
                "items": [
                    {
                        "item_id": i,
                        "score": 1.0,
                        "reason": "popular",
                        "explanation": "Popular",
                        "anchor": None,
                    }
                    for i in items
                ],
                "model_version": "m1",
                "index_version": "i1",
                "cause_event_id": cause,
                "event_time": event_time,
                "publish_time": event_time + 5,
                "mode": "live",
            },
        )
        return self.record(TOPICS.recommendations, user.encode(), value, event_time + 5)

    def state(self, user: str) -> Record:
        state = UserState(user, history=[HistoryEntry(EventKind.CLICK, T, item_id="a")], clicks=1)
        return self.record(TOPICS.changelog, user.encode(), encode_state(state))

    def tombstone(self, user: str, timestamp: int) -> Record:
        return self.record(TOPICS.changelog, user.encode(), None, timestamp)

    def marker(self, user: str, erased_at: int) -> Record:
        key = ERASURE_KEY + erasure_digest(user)
        return self.record(TOPICS.changelog, key, erasure_value(erased_at), erased_at)

    def item(self, item_id: str, price: float, updated_at: int) -> Record:
        fields = {"item_id": item_id, "title": "T", "category": "c", "price": price, "updated_at": updated_at}
        return self.record(TOPICS.catalog, item_id.encode(), CODEC.encode("CatalogItem", fields))


@pytest.fixture
def view(tmp_path: Path) -> View:
    return View(tmp_path / "view")


def take(updater: ViewUpdater, *records: Record) -> None:
    updater.view.write(updater.batch(list(records), T + 1000))


def cause(view: View, user: str) -> str | None:
    found = view.recommendation(user)
    return orjson.loads(found)["cause_event_id"] if found is not None else None


def test_the_newest_recommendation_of_each_user_is_kept_and_a_restart_goes_on_from_its_offsets(
    tmp_path: Path, view: View
) -> None:
    topics, updater = Topics(), ViewUpdater(view, CODEC, TOPICS)
    take(updater, topics.rec("u1", "e1", T), topics.rec("u2", "e2", T))
    take(updater, topics.rec("u1", "e3", T + 10), topics.state("u1"))
    assert cause(view, "u1") == "e3" and cause(view, "u2") == "e2"
    answer = orjson.loads(view.recommendation("u1") or b"")
    assert answer["items"][0]["item_id"] == "a" and answer["model_version"] == "m1"
    view.close()

    again = View(tmp_path / "view")
    assert again.offsets() == {("recs", 0): 3, ("changelog", 0): 1}
    assert cause(again, "u1") == "e3" and again.state("u1") is not None


def test_an_erasure_removes_the_user_and_refuses_what_its_events_caused_whenever_it_arrives(
    view: View,
) -> None:
    topics, updater = Topics(), ViewUpdater(view, CODEC, TOPICS)
    take(updater, topics.rec("u", "e1", T), topics.state("u"))
    take(updater, topics.tombstone("u", T + 100))
    assert view.recommendation("u") is None and view.state("u") is None

    take(updater, topics.rec("u", "e2", T + 50))  # published before the erasure, read after it
    assert view.recommendation("u") is None
    take(updater, topics.marker("u", T + 60))
    take(updater, topics.rec("u", "e3", T + 70))  # a later event: the same id as a new user
    assert cause(view, "u") == "e3"


def test_within_one_slice_the_changelog_is_applied_first(view: View) -> None:
    topics, updater = Topics(), ViewUpdater(view, CODEC, TOPICS)
    take(updater, topics.rec("u", "e1", T - 5), topics.tombstone("u", T))
    assert view.recommendation("u") is None


def test_a_recommendation_taken_between_a_tombstone_and_its_marker_goes_if_caused_before_the_erasure(
    view: View,
) -> None:
    # The erasure time is the user's newest event, here later than the tombstone's own timestamp (a
    # backend's clock ahead of the worker's).
    topics, updater = Topics(), ViewUpdater(view, CODEC, TOPICS)
    take(updater, topics.tombstone("u", T))
    take(updater, topics.rec("u", "e1", T + 50))
    assert cause(view, "u") == "e1"
    take(updater, topics.marker("u", T + 100))
    assert view.recommendation("u") is None


def test_a_tombstone_on_the_recommendations_topic_removes_the_recommendation(view: View) -> None:
    topics, updater = Topics(), ViewUpdater(view, CODEC, TOPICS)
    take(updater, topics.rec("u", "e1", T))
    take(updater, topics.record(TOPICS.recommendations, b"u", None))
    assert view.recommendation("u") is None


def test_the_catalogue_keeps_each_items_newest_version(view: View) -> None:
    topics, updater = Topics(), ViewUpdater(view, CODEC, TOPICS)
    take(updater, topics.item("a", 10.0, 200), topics.item("a", 5.0, 100))
    take(updater, topics.item("b", 1.0, 100))
    take(updater, topics.item("b", 2.0, 50))
    prices = [orjson.loads(v or b"")["price"] for v in view.items(["a", "b"])]
    assert prices == [10.0, 1.0]
    take(updater, topics.item("b", 3.0, 0))  # no time given: arrival order decides, as in the workers
    assert orjson.loads(view.items(["b"])[0] or b"")["price"] == 3.0


def test_undecodable_records_are_skipped_and_read_past(view: View) -> None:
    topics, updater = Topics(), ViewUpdater(view, CODEC, TOPICS)
    batch = updater.batch([topics.record(TOPICS.recommendations, b"u", b"junk"), topics.rec("v", "e1", T)], T)
    view.write(batch)
    assert batch.skipped == 1 and view.recommendation("u") is None and cause(view, "v") == "e1"
    assert view.offsets() == {("recs", 0): 2}


@pytest.mark.parametrize("erased", [1, 70], ids=["one user", "more than are compacted one by one"])
def test_the_files_keep_nothing_of_an_erased_user(tmp_path: Path, view: View, erased: int) -> None:
    topics, updater = Topics(), ViewUpdater(view, CODEC, TOPICS)
    users = [f"someone-erased-{n}@example.com" for n in range(erased)]
    take(
        updater,
        *[r for u in users for r in (topics.rec(u, "e1", T), topics.state(u))],
        topics.rec("other", "e", T),
    )
    take(updater, *[topics.tombstone(u, T + 100) for u in users])
    files = [p.read_bytes() for p in (tmp_path / "view").rglob("*") if p.is_file()]
    assert not [u for u in users if any(u.encode() in data for data in files)]
    assert cause(view, "other") == "e"
