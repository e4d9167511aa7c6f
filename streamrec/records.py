"""Record types shared by the worker, the clients and the models: plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any


class EventKind(IntEnum):
    CLICK = 1
    SEARCH = 2
    PURCHASE = 3


# Avro record name of each event kind on the events topic.
EVENT_SCHEMAS: dict[str, EventKind] = {
    "ClickEvent": EventKind.CLICK,
    "SearchEvent": EventKind.SEARCH,
    "PurchaseEvent": EventKind.PURCHASE,
}


@dataclass(slots=True)
class Event:
    """A decoded user event. ``item_id`` is set for clicks and purchases, ``query`` for searches."""

    event_id: str
    user_id: str
    kind: EventKind
    timestamp: int  # epoch ms, UTC
    item_id: str | None = None
    query: str | None = None
    session_id: str | None = None
    price: float | None = None
    quantity: int = 1
    context: dict[str, str | None] | None = None

    @property
    def schema_name(self) -> str:
        return {EventKind.CLICK: "ClickEvent", EventKind.SEARCH: "SearchEvent"}.get(
            self.kind, "PurchaseEvent"
        )

    def to_avro(self) -> dict[str, object]:
        record: dict[str, object] = {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "timestamp": self.timestamp,
            "session_id": self.session_id,
            "context": self.context,
        }
        if self.kind is EventKind.SEARCH:
            record["query"] = self.query
        else:
            record["item_id"] = self.item_id
        if self.kind is EventKind.PURCHASE:
            record["price"] = self.price
            record["quantity"] = self.quantity
            record["currency"] = None
        return record

    @classmethod
    def from_avro(cls, schema_name: str, record: dict) -> Event:
        return cls(
            event_id=record["event_id"],
            user_id=record["user_id"],
            kind=EVENT_SCHEMAS[schema_name],
            timestamp=record["timestamp"],
            item_id=record.get("item_id"),
            query=record.get("query"),
            session_id=record.get("session_id"),
            price=record.get("price"),
            quantity=record.get("quantity", 1),
            context=record.get("context"),
        )


@dataclass(slots=True)
class CatalogItem:
    item_id: str
    title: str
    category: str | None = None
    price: float | None = None
    in_stock: bool = True
    description: str | None = None
    updated_at: int = 0

    def to_avro(self) -> dict[str, object]:
        return {
            "item_id": self.item_id,
            "title": self.title,
            "category": self.category,
            "price": self.price,
            "in_stock": self.in_stock,
            "description": self.description,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> CatalogItem:
        names = [f.name for f in fields(cls)]
        return cls(**{k: record[k] for k in names if k in record})

    @property
    def text(self) -> str:
        """The item's content as one string, for the text embedder."""
        return " | ".join(p for p in (self.title, self.category, self.description) if p)


@dataclass(slots=True)
class HistoryEntry:
    kind: EventKind
    timestamp: int
    item_id: str | None = None
    query: str | None = None


@dataclass(slots=True)
class UserState:
    """One user's bounded state. Newest entries last."""

    user_id: str
    history: list[HistoryEntry] = field(default_factory=list)
    purchased: list[str] = field(default_factory=list)
    seen_event_ids: list[int] = field(default_factory=list)
    clicks: int = 0
    searches: int = 0
    purchases: int = 0
    last_event_id: str | None = None
    last_event_time: int = 0
    # abuse control (streamrec/abuse.py): the rate limit's theoretical arrival time (microseconds), the bot
    # detector's signals, and the flag once raised (a reason, and the time of the event that raised it)
    rate_tat: int = 0
    fast_streak: int = 0
    repeat_item: str | None = None
    repeat_count: int = 0
    flagged: str | None = None
    flagged_at: int = 0

    @property
    def recent_queries(self) -> list[str]:
        return [h.query for h in self.history if h.query is not None]


@dataclass(slots=True)
class RecommendedItem:
    item_id: str
    score: float
    reason: str  # similar_to_recent | matches_search | goes_with_purchase | popular
    explanation: str
    anchor: str | None = None


Reason = tuple[str, str, str | None]  # (reason code, explanation, anchor)


@dataclass(slots=True)
class RankedBatch:
    """The top-k of a micro-batch as the ranker leaves it: per user, item indices, scores and reason codes
    in lists, best first, and every distinct reason once. The worker writes Recommendation records straight
    from it (no object per recommended item); ``items(u)`` builds user u's RecommendedItem list for anyone
    else. ``fills`` follow the ranked items (the popularity fill of short or cold rows)."""

    item_ids: list[str]  # item index i is item_ids[i - 1] (index 0 is padding)
    picked: list[list[int]]
    scores: list[list[float]]
    codes: list[list[int]]
    reasons: dict[int, Reason]
    fills: list[list[RecommendedItem]]

    @classmethod
    def of(cls, lists: list[list[RecommendedItem]]) -> RankedBatch:
        """A batch from ready-made lists (a recommender that ranks per user)."""
        empty: list[list[int]] = [[] for _ in lists]
        return cls([], empty, [[] for _ in lists], empty, {}, lists)

    def __len__(self) -> int:
        return len(self.fills)

    def items(self, u: int) -> list[RecommendedItem]:
        ids, reasons = self.item_ids, self.reasons
        ranked = [
            RecommendedItem(ids[idx - 1], score, *reasons[code])
            for idx, score, code in zip(self.picked[u], self.scores[u], self.codes[u], strict=True)
        ]
        return ranked + self.fills[u] if self.fills[u] else ranked

    def ids(self, u: int) -> list[str]:
        ids = self.item_ids
        return [ids[idx - 1] for idx in self.picked[u]] + [i.item_id for i in self.fills[u]]

    def all_items(self) -> list[list[RecommendedItem]]:
        return [self.items(u) for u in range(len(self))]


@dataclass(slots=True)
class Recommendation:
    user_id: str
    items: list[RecommendedItem]
    model_version: str
    index_version: str
    cause_event_id: str
    event_time: int
    publish_time: int
    mode: str = "live"

    def to_avro(self) -> dict[str, object]:
        return {
            "user_id": self.user_id,
            "items": [
                {
                    "item_id": i.item_id,
                    "score": i.score,
                    "reason": i.reason,
                    "explanation": i.explanation,
                    "anchor": i.anchor,
                }
                for i in self.items
            ],
            "model_version": self.model_version,
            "index_version": self.index_version,
            "cause_event_id": self.cause_event_id,
            "event_time": self.event_time,
            "publish_time": self.publish_time,
            "mode": self.mode,
        }

    @classmethod
    def from_avro(cls, record: dict) -> Recommendation:
        return cls(
            user_id=record["user_id"],
            items=[RecommendedItem(**i) for i in record["items"]],
            model_version=record["model_version"],
            index_version=record["index_version"],
            cause_event_id=record["cause_event_id"],
            event_time=record["event_time"],
            publish_time=record["publish_time"],
            mode=record.get("mode", "live"),
        )
