"""Per-user state: what a user's history looks like after events, duplicates and limits."""

from __future__ import annotations

import io

import fastavro
from hypothesis import given
from hypothesis import strategies as st

from streamrec.catalog import Catalog
from streamrec.records import CatalogItem, Event, EventKind, UserState
from streamrec.serde import bundled_schemas
from streamrec.state import (
    StateLimits,
    appends_to_history,
    apply_event,
    decode_state,
    encode_state,
    encode_state_bytes,
    event_id_hash,
    seen_ids,
    state_to_avro,
)

LIMITS = StateLimits(history_length=5, max_purchased=3, dedupe_window=4)
NOW = 1_800_000_000_000


def click(n: int, item: str = "i1", user: str = "u1", ts: int = NOW) -> Event:
    return Event(event_id=f"e{n}", user_id=user, kind=EventKind.CLICK, timestamp=ts, item_id=item)


def purchase(n: int, item: str) -> Event:
    return Event(f"e{n}", "u1", EventKind.PURCHASE, NOW, item_id=item, price=9.5, quantity=1)


def test_events_build_history_newest_last_and_count_kinds() -> None:
    state = None
    for n, event in enumerate(
        [click(1, "a"), Event("e2", "u1", EventKind.SEARCH, NOW, query="red shoes"), purchase(3, "b")]
    ):
        state, applied = apply_event(state, event, LIMITS)
        assert applied, n
    assert state is not None
    assert [h.item_id or h.query for h in state.history] == ["a", "red shoes", "b"]
    assert (state.clicks, state.searches, state.purchases) == (1, 1, 1)
    assert state.purchased == ["b"]
    assert state.recent_queries == ["red shoes"]
    assert state.last_event_id == "e3"


def test_duplicate_event_id_is_not_applied_twice() -> None:
    state, _ = apply_event(None, click(1, "a"), LIMITS)
    state, applied = apply_event(state, click(1, "a"), LIMITS)
    assert not applied
    assert len(state.history) == 1 and state.clicks == 1


def test_a_state_remembers_48_bit_ids_and_still_knows_the_64_bit_ones_written_before() -> None:
    """Seen ids shrank to 48 bits (issue 30: 7 bytes each as a varint, not 10); a state written before holds
    64-bit ones, and an event it remembers that way is still a duplicate after the upgrade."""
    state, _ = apply_event(None, click(1), LIMITS)
    [kept] = state.seen_event_ids
    assert -(2**47) <= kept < 2**47 and (kept, event_id_hash("e1")) == seen_ids("e1")
    assert kept == int.from_bytes(
        event_id_hash("e1").to_bytes(8, "little", signed=True)[:6], "little", signed=True
    )
    old = UserState("u1", seen_event_ids=[event_id_hash("e2")])  # remembered before the upgrade
    old, applied = apply_event(old, click(2), LIMITS)
    assert not applied and old.clicks == 0
    old, applied = apply_event(old, click(3), LIMITS)
    assert applied and old.seen_event_ids[-1] == seen_ids("e3")[0]


def test_state_stays_bounded() -> None:
    state = None
    for n in range(20):
        state, _ = apply_event(state, click(n, f"i{n}"), LIMITS)
        state, _ = apply_event(state, purchase(100 + n, f"p{n}"), LIMITS)
    assert state is not None
    assert len(state.history) == 5 and state.history[-1].item_id == "p19"
    assert state.purchased == ["p17", "p18", "p19"]
    assert len(state.seen_event_ids) == 4
    assert state.clicks == 20 and state.purchases == 20


def test_a_backfilled_older_event_is_inserted_by_timestamp() -> None:
    state = None
    for n, ts in enumerate([NOW, NOW + 2, NOW + 4]):
        state, _ = apply_event(state, click(n, f"live{n}", ts=ts), LIMITS)
    state, _ = apply_event(state, click(10, "old", ts=NOW + 1), LIMITS)
    state, _ = apply_event(state, click(11, "tie", ts=NOW + 2), LIMITS)  # after the entry it ties with
    assert state is not None
    assert [h.item_id for h in state.history] == ["live0", "old", "live1", "tie", "live2"]
    state, _ = apply_event(state, click(12, "ancient", ts=NOW - 1), LIMITS)  # history full: falls off
    assert [h.item_id for h in state.history] == ["live0", "old", "live1", "tie", "live2"]
    assert state.last_event_id == "e2" and state.clicks == 6


@given(st.permutations(list(range(12))), st.integers(min_value=1, max_value=12))
def test_any_arrival_order_keeps_the_newest_events_in_time_order(order: list[int], length: int) -> None:
    """What backfill relies on: replayed history interleaved with live events gives the same history."""
    limits = StateLimits(history_length=length, dedupe_window=64)
    state = None
    for n in order:
        state, applied = apply_event(state, click(n, f"i{n}", ts=NOW + 1000 * n), limits)
        assert applied
    assert state is not None
    # Inserting by time and dropping the oldest keeps the newest `length` seen so far, whatever the order.
    assert [h.item_id for h in state.history] == [f"i{n}" for n in range(12)[-length:]]
    assert state.clicks == 12 and state.last_event_id == "e11"


def test_out_of_order_event_does_not_move_last_event_back() -> None:
    state, _ = apply_event(None, click(1, ts=NOW), LIMITS)
    state, _ = apply_event(state, click(2, ts=NOW - 10_000), LIMITS)
    assert state.last_event_id == "e1" and state.last_event_time == NOW


@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(EventKind)),
            st.text(min_size=1, max_size=12),
            st.integers(min_value=0, max_value=2**62),
        ),
        max_size=30,
    )
)
def test_state_round_trips_through_its_wire_format(events: list[tuple[EventKind, str, int]]) -> None:
    state = None
    for n, (kind, text, ts) in enumerate(events):
        event = Event(
            event_id=f"id{n}",
            user_id="ü-1",
            kind=kind,
            timestamp=ts,
            item_id=None if kind is EventKind.SEARCH else text,
            query=text if kind is EventKind.SEARCH else None,
            price=1.0,
        )
        state, _ = apply_event(state, event, StateLimits())
    if state is not None:
        assert decode_state(encode_state(state)) == state


def test_catalog_keeps_latest_version_and_queues_changes_once() -> None:
    catalog = Catalog()
    catalog.upsert(CatalogItem("a", "New", updated_at=20))
    catalog.upsert(CatalogItem("a", "Stale", updated_at=10))  # delivered late
    catalog.upsert(CatalogItem("b", "B"))
    got = catalog.get("a")
    assert got is not None and got.title == "New"
    assert sorted(i.item_id for i in catalog.drain_changes()) == ["a", "b"]
    assert catalog.drain_changes() == []


# --- the hand-written UserState encoding -------------------------------------------------------------------

_events = st.lists(
    st.tuples(
        st.sampled_from([EventKind.CLICK, EventKind.SEARCH, EventKind.PURCHASE]),
        st.text(min_size=1, max_size=12),  # item id or query, any unicode
        st.integers(-(2**63), 2**63 - 1),  # timestamp: any Avro long
        st.integers(0, 30),  # event id: small range, so duplicates happen
    ),
    max_size=40,
)


_STATE_SCHEMA = bundled_schemas()["UserState"].parsed  # parsed once: parsing all schemas costs ~8 ms


def _fastavro_encoding(state: UserState) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, _STATE_SCHEMA, state_to_avro(state))
    return buf.getvalue()


@given(_events, st.integers(1, 5))
def test_state_encoding_is_fastavros_and_incremental_encoding_is_the_full_one(
    events: list[tuple[EventKind, str, int, int]], batch: int
) -> None:
    """Byte for byte what fastavro writes; re-encoding after each micro-batch from the previous bytes
    gives the same bytes as encoding the state from scratch, and decodes back to the state. An event older
    than the history's newest is inserted by time, not appended: that batch is encoded whole, as the worker
    does."""
    state: UserState | None = None
    parts = None
    for start in range(0, len(events), batch):
        new = 0
        for kind, text, ts, n in events[start : start + batch]:
            item, query = (None, text) if kind is EventKind.SEARCH else (text, None)
            event = Event(f"e{n}", "u\u00e9", kind, ts, item_id=item, query=query, price=1.0)
            if not appends_to_history(state, event):
                parts = None
            state, applied = apply_event(state, event, LIMITS)
            new += applied
        assert state is not None
        data, parts = encode_state_bytes(state, parts, new)
        assert data == encode_state(state) == _fastavro_encoding(state)
        assert decode_state(data) == state
