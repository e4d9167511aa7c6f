"""A user's profile (the "user portrait"), from their state and the catalogue: pure functions.

What the worker keeps of a user bounds what a profile can say: the last ``STREAMREC_HISTORY_LENGTH`` events
(kind, item or query, time), up to ``STREAMREC_MAX_PURCHASED`` purchased items, and all-time counts of
clicks, searches and purchases. Categories and prices are the catalogue's as it is now, not as they were
when the user saw the item.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamrec.records import EventKind, UserState

# A visit is a run of events with no gap longer than this (the usual web-analytics session timeout).
VISIT_GAP_MS = 30 * 60 * 1000
# How much one event says about a user's taste: a purchase more than a click.
CATEGORY_WEIGHTS = {EventKind.CLICK: 1.0, EventKind.PURCHASE: 3.0}
TOP_CATEGORIES = 5
RECENT_SEARCHES = 10
DAY_MS = 86_400_000


@dataclass(frozen=True)
class ItemFacts:
    """What a profile needs of a catalogue item."""

    category: str | None
    price: float | None


def top_categories(state: UserState, items: Mapping[str, ItemFacts], top: int = TOP_CATEGORIES) -> list[dict]:
    """The user's categories by weight: each click of an item in the category counts 1, each purchase 3,
    over the kept history; weights are shares of all weighted events with a known category (the list's
    weights sum to 1 when it holds every category)."""
    totals: dict[str, float] = {}
    for entry in state.history:
        weight = CATEGORY_WEIGHTS.get(entry.kind)
        facts = items.get(entry.item_id) if weight is not None and entry.item_id is not None else None
        if facts is None or not facts.category:
            continue
        totals[facts.category] = totals.get(facts.category, 0.0) + weight  # type: ignore[operator]
    whole = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [{"category": name, "weight": round(weight / whole, 4)} for name, weight in ranked]


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def price_band(state: UserState, items: Mapping[str, ItemFacts]) -> dict[str, Any] | None:
    """The prices of the distinct items the user clicked or bought (kept history and purchases): the middle
    half (``low`` = 25th percentile, ``high`` = 75th), the median and the extremes; None without any."""
    seen = {h.item_id for h in state.history if h.item_id is not None} | set(state.purchased)
    prices = sorted(
        facts.price for i in seen if (facts := items.get(i)) is not None and facts.price is not None
    )
    if not prices:
        return None
    return {
        "low": round(_quantile(prices, 0.25), 2),
        "median": round(_quantile(prices, 0.5), 2),
        "high": round(_quantile(prices, 0.75), 2),
        "min": prices[0],
        "max": prices[-1],
        "items": len(prices),
    }


def visit_starts(timestamps: list[int], gap_ms: int = VISIT_GAP_MS) -> list[int]:
    """When each visit began: the first event, and each event more than ``gap_ms`` after the one before."""
    starts: list[int] = []
    previous: int | None = None
    for t in sorted(timestamps):
        if previous is None or t - previous > gap_ms:
            starts.append(t)
        previous = t
    return starts


def _rhythm(times: list[int], window_start: int, now_ms: int) -> dict[str, Any]:
    """How many, the newest, days since it, and how many a week from the window's start to now (over a week
    at least: one visit of a new user is not seven a week)."""
    span_days = max((now_ms - window_start) / DAY_MS, 7.0)
    last = max(times) if times else None
    return {
        "count": len(times),
        "last": last,
        "days_since_last": round((now_ms - last) / DAY_MS, 2) if last is not None else None,
        "per_week": round(len(times) * 7 / span_days, 2),
    }


def recent_searches(state: UserState, limit: int = RECENT_SEARCHES) -> list[dict[str, Any]]:
    """The newest searches first, each query once (at its newest time)."""
    found: list[dict[str, Any]] = []
    shown: set[str] = set()
    for entry in reversed(state.history):
        if entry.query is not None and entry.query not in shown:
            shown.add(entry.query)
            found.append({"query": entry.query, "timestamp": entry.timestamp})
            if len(found) == limit:
                break
    return found


def build_profile(state: UserState, items: Mapping[str, ItemFacts], now_ms: int) -> dict[str, Any]:
    """The profile the API answers for ``state`` (see docs/api.md for every field)."""
    times = [h.timestamp for h in state.history]
    window_start = min(times) if times else now_ms
    bought = [h.timestamp for h in state.history if h.kind is EventKind.PURCHASE]
    return {
        "user_id": state.user_id,
        "top_categories": top_categories(state, items),
        "price_band": price_band(state, items),
        "visits": _rhythm(visit_starts(times), window_start, now_ms),
        "purchases": _rhythm(bought, window_start, now_ms) | {"all_time": state.purchases},
        "recent_searches": recent_searches(state),
        "totals": {"clicks": state.clicks, "searches": state.searches, "purchases": state.purchases},
        "history": {"events": len(times), "from": min(times, default=None), "to": max(times, default=None)},
        "last_event_time": state.last_event_time,
    }
