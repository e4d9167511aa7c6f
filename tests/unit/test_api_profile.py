"""A user's profile from their state and the catalogue: categories, prices, visits, purchases, searches."""

from __future__ import annotations

from streamrec.records import Event, EventKind, UserState
from streamrec.state import StateLimits, apply_event
from streamrec.streams.api.profile import DAY_MS, ItemFacts, build_profile, price_band, visit_starts

T = 1_767_225_600_000
MINUTE = 60_000
ITEMS = {
    "serum": ItemFacts("beauty/skin care", 20.0),
    "cream": ItemFacts("beauty/skin care", 40.0),
    "shampoo": ItemFacts("beauty/hair", 10.0),
    "novel": ItemFacts("books/fiction", 30.0),
}


def state_of(*events: tuple[int, EventKind, str]) -> UserState:
    """Events as (minutes after T, kind, item id or query)."""
    state: UserState | None = None
    for n, (minutes, kind, what) in enumerate(events):
        fields = {"query": what} if kind is EventKind.SEARCH else {"item_id": what}
        event = Event(f"e{n}", "u", kind, T + minutes * MINUTE, **fields)  # type: ignore[arg-type]
        state, _ = apply_event(state, event, StateLimits())
    assert state is not None
    return state


def test_categories_are_weighted_by_clicks_and_purchases_and_visits_split_at_half_an_hour_gaps() -> None:
    state = state_of(
        (0, EventKind.SEARCH, "hair care"),
        (1, EventKind.CLICK, "shampoo"),
        (2, EventKind.CLICK, "shampoo"),
        (100, EventKind.SEARCH, "face serum"),  # a second visit
        (101, EventKind.CLICK, "serum"),
        (102, EventKind.PURCHASE, "cream"),
        (140, EventKind.SEARCH, "hair care"),  # a third one; the query again
        (141, EventKind.CLICK, "unknown-item"),  # not in the catalogue: no category, no price
    )
    now = T + 14 * DAY_MS
    profile = build_profile(state, ITEMS, now)
    assert profile["top_categories"] == [
        {"category": "beauty/skin care", "weight": round(4 / 6, 4)},  # a click (1) and a purchase (3)
        {"category": "beauty/hair", "weight": round(2 / 6, 4)},
    ]
    assert profile["visits"]["count"] == 3 and profile["visits"]["last"] == T + 140 * MINUTE
    assert profile["visits"]["per_week"] == round(3 * 7 / 14, 2)
    assert profile["purchases"] == {
        "count": 1,
        "last": T + 102 * MINUTE,
        "days_since_last": round((now - T - 102 * MINUTE) / DAY_MS, 2),
        "per_week": 0.5,
        "all_time": 1,
    }
    assert [s["query"] for s in profile["recent_searches"]] == ["hair care", "face serum"]
    assert profile["recent_searches"][0]["timestamp"] == T + 140 * MINUTE
    assert profile["totals"] == {"clicks": 4, "searches": 3, "purchases": 1}
    assert profile["history"] == {"events": 8, "from": T, "to": T + 141 * MINUTE}


def test_the_price_band_is_the_middle_half_of_the_prices_of_distinct_items_seen_or_bought() -> None:
    state = state_of(
        (0, EventKind.CLICK, "shampoo"),
        (1, EventKind.CLICK, "shampoo"),
        (2, EventKind.CLICK, "serum"),
        (3, EventKind.CLICK, "novel"),
        (4, EventKind.PURCHASE, "cream"),
    )
    band = price_band(state, ITEMS)
    # distinct prices 10, 20, 30, 40: quartiles by linear interpolation
    assert band == {"low": 17.5, "median": 25.0, "high": 32.5, "min": 10.0, "max": 40.0, "items": 4}


def test_a_user_without_catalogued_items_or_history_has_an_empty_profile_not_an_error() -> None:
    state = state_of((0, EventKind.SEARCH, "anything"), (1, EventKind.CLICK, "unknown-item"))
    profile = build_profile(state, {}, T + DAY_MS)
    assert profile["top_categories"] == [] and profile["price_band"] is None
    assert profile["purchases"]["last"] is None and profile["purchases"]["days_since_last"] is None
    empty = build_profile(UserState("new"), ITEMS, T)
    assert empty["visits"]["count"] == 0 and empty["history"] == {"events": 0, "from": None, "to": None}


def test_visit_starts() -> None:
    gap = 30 * MINUTE
    assert visit_starts([]) == []
    assert visit_starts([T + 2 * gap, T, T + gap]) == [T]  # gaps of exactly 30 minutes stay in one visit
    assert visit_starts([T, T + gap + 1]) == [T, T + gap + 1]
