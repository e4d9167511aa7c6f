"""The worker's view of the catalogue: every item upsert seen so far, safe to read from the event stage."""

from __future__ import annotations

import threading

from streamrec.records import CatalogItem


class Catalog:
    """Latest record per item. Writers (the control-topic agent) and the event stage run in different threads.

    Changes since the last ``drain_changes`` are queued so the event stage can hand them to the recommender
    in its own thread, between micro-batches.
    """

    def __init__(self) -> None:
        self._items: dict[str, CatalogItem] = {}
        self._changes: dict[str, CatalogItem] = {}
        self._lock = threading.Lock()
        self.in_stock = 0  # items held whose latest record says in stock

    def upsert(self, item: CatalogItem) -> None:
        with self._lock:
            current = self._items.get(item.item_id)
            if current is not None and item.updated_at and current.updated_at > item.updated_at:
                return  # an older version delivered late must not win
            self.in_stock += int(item.in_stock) - (int(current.in_stock) if current is not None else 0)
            self._items[item.item_id] = item
            self._changes[item.item_id] = item

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def get(self, item_id: str) -> CatalogItem | None:
        return self._items.get(item_id)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[CatalogItem]:
        with self._lock:
            return list(self._items.values())

    def drain_changes(self) -> list[CatalogItem]:
        with self._lock:
            changes, self._changes = list(self._changes.values()), {}
        return changes
