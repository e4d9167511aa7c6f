"""What a record must be to be applied: the rules the worker enforces and the Python producer checks before
sending, in one place. Pure functions; each answers the problem in words, or None when the value is fine.

A backend in any language that keeps these rules never sees a dead letter for invalid values
(docs/contracts.md lists them with their limits).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamrec.records import CatalogItem, Event, EventKind

if TYPE_CHECKING:
    from streamrec.settings import Settings

AVRO_INT_MIN, AVRO_INT_MAX = -(2**31), 2**31 - 1
# C0 and C1 control characters and the Unicode line and paragraph separators: invisible in logs and
# dashboards, they make two ids that look the same differ (and can forge log lines).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# A catalogue description may keep its line breaks and tabs.
_CONTROL_IN_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
SHOWN_CHARS = 60  # of an offending value in a dead letter's detail: never the whole of a megabyte


@dataclass(frozen=True)
class Rejection:
    reason: str  # dead-letter reason code
    detail: str


@dataclass(frozen=True)
class ValidationRules:
    max_event_age_ms: int | None  # None: no age limit (history replayed through the backfill topic)
    max_clock_skew_ms: int
    reject_unknown_items: bool = True
    max_id_bytes: int = 256
    max_query_bytes: int = 1024
    max_text_bytes: int = 16_384

    @classmethod
    def from_settings(cls, settings: Settings, historical: bool = False) -> ValidationRules:
        """The worker's rules; history is old by nature: only the clock-skew (future) rule bounds its time."""
        return cls(
            max_event_age_ms=None if historical else settings.max_event_age_days * 86_400_000,
            max_clock_skew_ms=settings.max_clock_skew_s * 1000,
            reject_unknown_items=settings.reject_unknown_items,
            max_id_bytes=settings.max_id_bytes,
            max_query_bytes=settings.max_query_bytes,
            max_text_bytes=settings.max_item_text_bytes,
        )


def shown(value: object) -> str:
    """A value as a detail quotes it: repr, cut short."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} chars)"


def _too_long(value: str, max_bytes: int) -> int:
    """The UTF-8 size of ``value`` when it is over ``max_bytes``, else 0 (a short string is not encoded)."""
    if len(value) * 4 <= max_bytes:
        return 0
    size = len(value.encode())
    return size if size > max_bytes else 0


def text_problem(what: str, value: object, max_bytes: int, line_breaks: bool = False) -> str | None:
    """A non-blank string of at most ``max_bytes`` UTF-8 bytes without control characters (``line_breaks``
    allows tab, line feed and carriage return)."""
    # The common case in a few C calls: printable (no control character) and short enough in any encoding.
    if isinstance(value, str) and value.isprintable() and len(value) * 4 <= max_bytes and value.strip():
        return None
    if not isinstance(value, str) or not value or value.isspace():
        return f"{what} must be a non-blank string, got {shown(value)}"
    size = _too_long(value, max_bytes)
    if size:
        return f"{what} is {size} bytes long, more than the {max_bytes} allowed"
    if (_CONTROL_IN_TEXT if line_breaks else _CONTROL).search(value) is not None:
        return f"{what} contains a control character: {shown(value)}"
    return None


def id_problem(what: str, value: object, max_bytes: int) -> str | None:
    """An id (user, item, event, session): non-blank, at most ``max_bytes`` UTF-8 bytes, no control
    character."""
    return text_problem(what, value, max_bytes)


def timestamp_problem(what: str, value: int, now_ms: int, rules: ValidationRules) -> Rejection | None:
    """Epoch milliseconds no further ahead than the clock skew allows, nor older than the age limit."""
    if value > now_ms + rules.max_clock_skew_ms:
        return Rejection(
            "absurd_timestamp",
            f"{what} {value} is in the future (now {now_ms}; epoch milliseconds, UTC, are expected)",
        )
    if rules.max_event_age_ms is not None and value < now_ms - rules.max_event_age_ms:
        return Rejection(
            "absurd_timestamp",
            f"{what} {value} is older than the retention window (seconds instead of milliseconds?)",
        )
    return None


def price_problem(value: object, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return f"price must be a finite number >= 0, got {shown(value)}"
    return None


def quantity_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= AVRO_INT_MAX:
        return f"quantity must be an integer from 1 to {AVRO_INT_MAX}, got {shown(value)}"
    return None


def currency_problem(value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) != 3 or not value.isalpha()):
        return f"currency must be an ISO 4217 code such as 'EUR', got {shown(value)}"
    return None


def validate_event(event: Event, now_ms: int, rules: ValidationRules, knows_item: Any) -> Rejection | None:
    """Decide whether a decoded event may change state; ``knows_item(item_id) -> bool`` is the catalogue."""
    limit = rules.max_id_bytes
    problem = id_problem("event_id", event.event_id, limit) or id_problem("user_id", event.user_id, limit)
    if problem is None and event.session_id is not None:
        problem = id_problem("session_id", event.session_id, limit)
    if problem is None:
        if event.kind is EventKind.SEARCH:
            problem = text_problem("search query", event.query, rules.max_query_bytes)
        else:
            problem = id_problem("item_id", event.item_id, limit)
    if problem is None and event.kind is EventKind.PURCHASE:
        problem = price_problem(event.price) or quantity_problem(event.quantity)
    if problem is not None:
        return Rejection("invalid_record", problem)
    rejection = timestamp_problem("timestamp", event.timestamp, now_ms, rules)
    if rejection is not None:
        return rejection
    if event.kind is not EventKind.SEARCH and rules.reject_unknown_items and not knows_item(event.item_id):
        return Rejection("unknown_item", f"item {event.item_id!r} is not in the catalogue")
    return None


def validate_deletion(record: dict[str, Any], now_ms: int, rules: ValidationRules) -> Rejection | None:
    """A UserDeletion record: the ids as an event's, and a timestamp that is not in the future (events up to
    it are refused after the erasure: one far ahead would refuse the user's events until then)."""
    problem = id_problem("event_id", record.get("event_id"), rules.max_id_bytes) or id_problem(
        "user_id", record.get("user_id"), rules.max_id_bytes
    )
    if problem is not None:
        return Rejection("invalid_record", problem)
    return timestamp_problem("timestamp", record["timestamp"], now_ms, rules)


def validate_item(item: CatalogItem, now_ms: int, rules: ValidationRules) -> Rejection | None:
    """A catalogue upsert: an id, a title, an optional category, price and description within their limits,
    and an ``updated_at`` that is not in the future (the newest version of an item wins: one dated ahead
    would win over every later upsert)."""
    problem = (
        id_problem("item_id", item.item_id, rules.max_id_bytes)
        or text_problem("title", item.title, rules.max_text_bytes)
        or price_problem(item.price, optional=True)
    )
    if problem is None and item.category is not None:
        problem = text_problem("category", item.category, rules.max_text_bytes)
    if problem is None and item.description is not None and item.description != "":
        problem = text_problem("description", item.description, rules.max_text_bytes, line_breaks=True)
    if problem is None and item.updated_at < 0:
        problem = f"updated_at must be epoch milliseconds >= 0, got {item.updated_at}"
    if problem is not None:
        return Rejection("invalid_record", problem)
    if item.updated_at > now_ms + rules.max_clock_skew_ms:
        return Rejection("absurd_timestamp", f"updated_at {item.updated_at} is in the future (now {now_ms})")
    return None
