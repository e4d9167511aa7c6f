"""The producer client rejects bad records before anything is queued; the resolver's re-reads are bounded."""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest

from streamrec.records import CatalogItem
from streamrec.serde import EncodeError
from streamrec.settings import Settings
from streamrec.streams import schema_store
from streamrec.streams.broker import free_port
from streamrec.streams.client import EventProducer, InvalidRecordError
from streamrec.streams.schema_store import SchemaTopicResolver, make_codec, subject_for


@pytest.fixture
def producer() -> Iterator[EventProducer]:
    # Nothing listens on this port, and every send is recorded: an invalid record must not get that far.
    p = EventProducer(Settings(bootstrap_servers=f"127.0.0.1:{free_port()}"))
    sent: list[str] = []
    p._produce = lambda topic, *args, **kwargs: sent.append(topic)  # type: ignore[method-assign]
    p._ensure_published = lambda schema: sent.append(schema.name)  # type: ignore[method-assign]
    yield p
    assert sent == [], "an invalid record was sent"


NOW = int(time.time() * 1000)


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.click("", "item-1"),
        lambda p: p.click("   ", "item-1"),
        lambda p: p.click(None, "item-1"),
        lambda p: p.click("u1", ""),
        lambda p: p.click("u1", 42),
        lambda p: p.click("u1", "item-1", event_id=""),
        lambda p: p.click("u1", "item-1", timestamp=NOW // 1000),  # seconds, not milliseconds
        lambda p: p.click("u1", "item-1", timestamp=NOW + 3_600_000),  # an hour in the future
        lambda p: p.click("u1", "item-1", timestamp=float(NOW)),
        lambda p: p.click("u1", "item-1", timestamp=True),
        lambda p: p.click("u1", "item-1", timestamp=datetime(2026, 1, 1)),  # naive: ambiguous
        lambda p: p.click("u1", "item-1", context={"devise": "mobile"}),
        lambda p: p.click("u1", "item-1", context={"device": 3}),
        lambda p: p.click("u1", "item-1", session_id=7),
        lambda p: p.search("u1", ""),
        lambda p: p.purchase("u1", "item-1", -1.0),
        lambda p: p.purchase("u1", "item-1", math.nan),
        lambda p: p.purchase("u1", "item-1", math.inf),
        lambda p: p.purchase("u1", "item-1", "9.99"),
        lambda p: p.purchase("u1", "item-1", True),
        lambda p: p.purchase("u1", "item-1", 9.99, quantity=0),
        lambda p: p.purchase("u1", "item-1", 9.99, quantity=2.0),
        lambda p: p.purchase("u1", "item-1", 9.99, quantity=2**31),
        lambda p: p.purchase("u1", "item-1", 9.99, currency="euro"),
        lambda p: p.delete_user(""),
        lambda p: p.upsert_item(item_id="", title="Rose Serum"),
        lambda p: p.upsert_item(item_id="i1", title=None),
        lambda p: p.upsert_item(item_id="i1", title="Rose Serum", price=-3.0),
        lambda p: p.upsert_item(item_id="i1", title="Rose Serum", colour="red"),
        lambda p: p.upsert_item(CatalogItem("i1", "Rose Serum", price=math.nan)),
        lambda p: p.send("ClickEvent", {"event_id": "e", "user_id": "u"}, key="u"),
        lambda p: p.send("NoSuchSchema", {}, key="u"),
    ],
)
def test_invalid_records_raise_a_value_error_and_queue_nothing(producer: EventProducer, call: Any) -> None:
    with pytest.raises(ValueError) as raised:
        call(producer)
    assert isinstance(raised.value, EncodeError | InvalidRecordError)


def test_event_ids_are_uuid4_hex_and_timestamps_now() -> None:
    p = EventProducer(Settings(bootstrap_servers=f"127.0.0.1:{free_port()}"))
    ids = {p._event_id(None) for _ in range(100)}
    assert len(ids) == 100
    assert all(uuid.UUID(hex=i).hex == i and uuid.UUID(hex=i).version == 4 for i in ids)  # 32 hex digits
    assert abs(p._timestamp(None) - time.time() * 1000) < 5_000
    aware = datetime.fromisoformat("2026-05-01T12:00:00+00:00")
    assert p._timestamp(aware) == int(aware.timestamp() * 1000)


def test_events_topic_subjects_are_per_record_type() -> None:
    s = Settings()
    schemas = make_codec(s, resolve_from_topic=False).schemas  # type: ignore[attr-defined]
    assert subject_for(s, schemas["ClickEvent"]) == "streamrec.events-streamrec.ClickEvent"
    assert subject_for(s, schemas["CatalogItem"]) == "streamrec.catalog-value"
    assert subject_for(s, schemas["Recommendation"]) == "streamrec.recommendations-value"


class CountingResolver(SchemaTopicResolver):
    """A resolver whose topic reads are counted instead of done (the real read is an integration test)."""

    def __init__(self, on_topic: dict[bytes, str], **kwargs: Any) -> None:
        super().__init__(Settings(), **kwargs)
        self.on_topic = on_topic

    def _read_to_end(self) -> None:
        self._recent_reads.append(schema_store.time.monotonic())
        self.reads += 1
        self._schemas.update(self.on_topic)
        self._loaded = True


def test_unknown_fingerprints_are_re_read_at_most_once_per_interval() -> None:
    resolver = CountingResolver({b"known---": "{}"}, retry_interval_s=60.0)
    assert resolver(b"known---") == "{}" and resolver.reads == 1  # first lookup loads the topic
    assert resolver(b"known---") == "{}" and resolver.reads == 1  # cached
    for _ in range(100):
        assert resolver(b"garbage-") is None
    assert resolver.reads == 2  # one re-read for the unknown fingerprint, then refused
    resolver.on_topic[b"late----"] = "{}"
    assert resolver(b"late----") == "{}" and resolver.reads == 3  # a new fingerprint is looked up at once


def test_a_flood_of_made_up_fingerprints_is_capped_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(schema_store, "time", SimpleNamespace(monotonic=lambda: now[0]))
    resolver = CountingResolver({}, max_rereads_per_s=5)
    flood = (i.to_bytes(8, "big") for i in range(10_000))
    for fp in itertools.islice(flood, 1000):
        assert resolver(fp) is None
    assert resolver.reads == 5  # five reads of the topic in this second, the first load among them
    now[0] += 0.999
    for fp in itertools.islice(flood, 1000):
        resolver(fp)
    assert resolver.reads == 5, "still the same second"
    now[0] += 0.001
    for fp in itertools.islice(flood, 1000):
        resolver(fp)
    assert resolver.reads == 10, "five more in the next second"
