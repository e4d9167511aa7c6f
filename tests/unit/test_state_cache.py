"""The worker's state cache: least recently active users go first, and its memory stays within its bound."""

from __future__ import annotations

import tracemalloc

import pytest

from streamrec.records import Event, EventKind, UserState
from streamrec.state import StateBytes, StateLimits, apply_event, decode_state_bytes, encode_state_bytes
from streamrec.streams.state_store import CACHE_BYTES_PER_ENCODED_BYTE as PER_BYTE
from streamrec.streams.state_store import StateCache


def shopper(user: int, events: int) -> tuple[UserState, StateBytes, int]:
    """A state after ``events`` events (a click, a search, a purchase in turn), its parts and encoded size."""
    state = None
    for n in range(events):
        kind = (EventKind.CLICK, EventKind.SEARCH, EventKind.PURCHASE)[n % 3]
        item, query = (
            (None, f"red lipstick {n % 7}") if kind is EventKind.SEARCH else (f"item-{n * 37 % 9000}", None)
        )
        event = Event(
            f"e-{user}-{n}",
            f"user-{user:07d}",
            kind,
            1_700_000_000_000 + n,
            item_id=item,
            query=query,
            price=9.5,
        )
        state, _ = apply_event(state, event, StateLimits())
    assert state is not None
    data, parts = encode_state_bytes(state)
    return state, parts, len(data)


@pytest.mark.parametrize("events", [3, 20, 60, 400])
def test_the_memory_estimate_is_near_what_a_cached_state_takes(events: int) -> None:
    """States as the stage caches them after a RocksDB read: the estimate is 0.6-1.6x what they take."""
    encoded = [encode_state_bytes(shopper(u, events)[0])[0] for u in range(200)]
    cache = StateCache(capacity=1000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    held = [decode_state_bytes(data) for data in encoded]
    taken = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    for u, (data, cached) in enumerate(zip(encoded, held, strict=True)):
        cache.put(0, f"user-{u:07d}", cached, len(data))
    assert 0.6 * taken <= cache.bytes <= 1.6 * taken


def test_the_least_recently_active_users_are_evicted_to_keep_within_the_memory_bound() -> None:
    states = [shopper(u, 60) for u in range(50)]
    per_state = PER_BYTE * states[0][2]
    cache = StateCache(capacity=1000, max_bytes=10 * per_state + per_state // 2)
    for u, (state, parts, size) in enumerate(states[:20]):
        cache.put(0, state.user_id, (state, parts), size)
        if u == 5:  # user 0 active again: now the most recent
            cache.put(0, states[0][0].user_id, states[0][:2], states[0][2])
    assert cache.bytes <= cache.max_bytes  # type: ignore[operator]
    assert len(cache) == 10
    held = [u for u in range(20) if cache.get(0, states[u][0].user_id) is not None]
    assert held == list(range(10, 20))  # user 0's second put was older than users 6-19

    cache.drop(0, states[19][0].user_id)
    assert cache.get(0, states[19][0].user_id) is None and len(cache) == 9
    assert cache.bytes == sum(PER_BYTE * states[u][2] for u in range(10, 19))
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


def test_the_user_bound_holds_whatever_the_memory_bound() -> None:
    cache = StateCache(capacity=3, max_bytes=1 << 40)
    for u in range(10):
        state, parts, size = shopper(u, 5)
        cache.put(1, state.user_id, (state, parts), size)
    assert [u for u in range(10) if cache.get(1, f"user-{u:07d}") is not None] == [7, 8, 9]
    off = StateCache(capacity=0)  # STREAMREC_STATE_CACHE_USERS=0: every state comes from RocksDB
    off.put(1, state.user_id, (state, parts), size)
    assert off.get(1, state.user_id) is None and len(off) == 0 and off.bytes == 0
