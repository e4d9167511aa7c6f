"""Sample catalogue and simulated shoppers for the demo and the tests (deterministic with a seed).

Shoppers have one or two favourite categories, search for what they want, browse items of that category
(popular ones more often, and neighbours of what they just viewed) and sometimes buy. That gives a trained
encoder real structure to find: category affinity, sequential neighbours and query intent.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from streamrec.records import CatalogItem, Event, EventKind

CATEGORIES: dict[str, tuple[list[str], list[str]]] = {
    "beauty/skin care": (
        ["serum", "moisturiser", "cleanser", "toner", "face mask", "eye cream", "sunscreen"],
        ["hydrating", "rose", "vitamin c", "retinol", "aloe", "charcoal", "green tea", "hyaluronic"],
    ),
    "beauty/makeup": (
        ["lipstick", "mascara", "foundation", "eyeliner", "blush", "concealer", "nail polish"],
        ["matte", "glossy", "long-lasting", "waterproof", "nude", "ruby red", "coral", "velvet"],
    ),
    "beauty/hair care": (
        ["shampoo", "conditioner", "hair oil", "hair mask", "dry shampoo", "styling gel"],
        ["argan", "coconut", "keratin", "volumising", "anti-frizz", "tea tree", "silk"],
    ),
    "sports/running": (
        ["running shoes", "running socks", "sports watch", "water bottle", "running jacket", "headband"],
        ["trail", "lightweight", "cushioned", "reflective", "breathable", "marathon", "waterproof"],
    ),
    "electronics/audio": (
        ["headphones", "earbuds", "bluetooth speaker", "soundbar", "microphone", "turntable"],
        ["wireless", "noise-cancelling", "studio", "portable", "bass", "retro", "waterproof"],
    ),
    "home/kitchen": (
        ["coffee grinder", "french press", "chef knife", "cast iron pan", "kettle", "teapot"],
        ["ceramic", "stainless", "electric", "vintage", "compact", "professional", "glass"],
    ),
    "books/fiction": (
        ["mystery novel", "fantasy saga", "science fiction novel", "thriller", "romance novel"],
        ["bestselling", "award-winning", "illustrated", "collector's", "classic", "debut"],
    ),
    "toys/games": (
        ["board game", "puzzle", "card game", "building blocks", "model kit", "plush toy"],
        ["family", "strategy", "1000-piece", "cooperative", "wooden", "space", "dinosaur"],
    ),
}


def title_case(text: str) -> str:
    """Each word capitalised, but not what follows an apostrophe: "collector's long-lasting" becomes
    "Collector's Long-Lasting" (``str.title()`` starts a word after any non-letter: "Collector'S")."""
    return re.sub(r"[A-Za-z]+('[A-Za-z]+)?", lambda word: word.group(0).capitalize(), text)


def stocked_item(
    rng: random.Random, item_id: str, title: str, category: str, description: str | None = None
) -> CatalogItem:
    """A sample catalogue item: a price between 4 and 250, and 3% of items out of stock (drawn in that
    order from ``rng``)."""
    return CatalogItem(
        item_id=item_id,
        title=title,
        category=category,
        price=round(rng.uniform(4, 250), 2),
        in_stock=rng.random() > 0.03,
        description=description,
        updated_at=0,
    )


def sample_catalog(seed: int = 7, items_per_category: int = 60) -> list[CatalogItem]:
    """A catalogue with titles, categories and prices; item ids are stable ``sku-00042`` strings."""
    rng = random.Random(seed)
    items: list[CatalogItem] = []
    for category, (nouns, adjectives) in CATEGORIES.items():
        seen: set[str] = set()
        while len(seen) < items_per_category:
            title = title_case(f"{rng.choice(adjectives)} {rng.choice(nouns)}")
            if title in seen:
                title = f"{title} {rng.choice(['Mini', 'Pro', 'Plus', 'Max', 'Set', 'XL', 'Duo'])}"
            if title in seen:
                continue
            seen.add(title)
            description = f"{title} from our {category.split('/')[-1]} range."
            items.append(stocked_item(rng, f"sku-{len(items):05d}", title, category, description))
    return items


def shop_catalog(items: int, seed: int = 7) -> list[CatalogItem]:
    """A catalogue of any size over the sample categories, for measuring at a shop's scale (the bench's
    production-shape model): ids ``shop-00042`` (none of them the sample catalogue's, so a model trained on
    it is never taken for the sample model), titles "Rose Serum 42" (unique by their number), prices and
    stock as ``sample_catalog``'s, items dealt to the categories in turn."""
    rng = random.Random(seed)
    categories = list(CATEGORIES.items())
    out: list[CatalogItem] = []
    for n in range(items):
        category, (nouns, adjectives) = categories[n % len(categories)]
        title = title_case(f"{rng.choice(adjectives)} {rng.choice(nouns)} {n}")
        out.append(stocked_item(rng, f"shop-{n:05d}", title, category))
    return out


@dataclass
class _Shopper:
    user_id: str
    favourites: list[str]
    last_item: int | None = None
    session: str = ""
    session_left: int = 0
    bought: set[str] = field(default_factory=set)


class ShopperSimulator:
    """An endless, reproducible stream of click, search and purchase events from simulated shoppers."""

    def __init__(
        self, catalog: list[CatalogItem], users: int = 1000, seed: int = 42, user_prefix: str = "user"
    ):
        self.rng = random.Random(seed)
        self.catalog = catalog
        self.by_category: dict[str, list[int]] = {}
        for idx, item in enumerate(catalog):
            self.by_category.setdefault(item.category or "", []).append(idx)
        categories = list(self.by_category)
        self.shoppers = [
            _Shopper(f"{user_prefix}-{u:06d}", self.rng.sample(categories, k=self.rng.choice([1, 1, 2])))
            for u in range(users)
        ]
        # Zipf-like popularity inside each category, so there is a head and a long tail.
        self.weights = {
            c: [1.0 / (rank + 1) ** 0.8 for rank in range(len(ix))] for c, ix in self.by_category.items()
        }

    def _pick(self, shopper: _Shopper, category: str) -> int:
        pool = self.by_category[category]
        if shopper.last_item is not None and self.rng.random() < 0.5:
            # browse to a neighbour of the last item: sequential structure for the encoder to learn
            pos = pool.index(shopper.last_item) if shopper.last_item in pool else 0
            return pool[min(len(pool) - 1, max(0, pos + self.rng.choice([-2, -1, 1, 1, 2, 3])))]
        return self.rng.choices(pool, weights=self.weights[category])[0]

    def next_event(self, timestamp_ms: int) -> Event:
        shopper = self.rng.choice(self.shoppers)
        if shopper.session_left <= 0:
            shopper.session = uuid.UUID(int=self.rng.getrandbits(128)).hex[:16]
            shopper.session_left = self.rng.randint(3, 12)
            shopper.last_item = None
        shopper.session_left -= 1
        category = self.rng.choice(shopper.favourites)
        base = dict(
            event_id=uuid.UUID(int=self.rng.getrandbits(128)).hex,
            user_id=shopper.user_id,
            timestamp=timestamp_ms,
            session_id=shopper.session,
        )
        roll = self.rng.random()
        if shopper.last_item is None and roll < 0.35:
            vocabulary = CATEGORIES.get(category)
            if vocabulary is None:  # a catalogue of its own (the bench's): a search for an item's title
                query = self.catalog[self.rng.choice(self.by_category[category])].title.lower()
            else:
                nouns, adjectives = vocabulary
                query = f"{self.rng.choice(adjectives)} {self.rng.choice(nouns)}"
            return Event(kind=EventKind.SEARCH, query=query, **base)  # type: ignore[arg-type]
        idx = self._pick(shopper, category)
        item = self.catalog[idx]
        shopper.last_item = idx
        if roll > 0.93 and item.in_stock and item.item_id not in shopper.bought:
            shopper.bought.add(item.item_id)
            return Event(kind=EventKind.PURCHASE, item_id=item.item_id, price=item.price or 1.0, **base)  # type: ignore[arg-type]
        return Event(kind=EventKind.CLICK, item_id=item.item_id, **base)  # type: ignore[arg-type]

    def history(self, events: int, start_ms: int, spacing_ms: int = 1000) -> Iterator[Event]:
        """Past behaviour with monotonic timestamps (training data)."""
        for n in range(events):
            yield self.next_event(start_ms + n * spacing_ms)


def event_to_json(event: Event) -> dict[str, object]:
    record: dict[str, object] = {
        "event_id": event.event_id,
        "user_id": event.user_id,
        "kind": event.kind.name.lower(),
        "timestamp": event.timestamp,
        "session_id": event.session_id,
    }
    if event.kind is EventKind.SEARCH:
        record["query"] = event.query
    else:
        record["item_id"] = event.item_id
    if event.kind is EventKind.PURCHASE:
        record["price"] = event.price
        record["quantity"] = event.quantity
    return record


def write_sample_dataset(out: Path, users: int = 2000, events: int = 60_000, seed: int = 42) -> Path:
    """Write ``catalog.jsonl`` and ``events.jsonl`` (streamrec's native dataset format) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    catalog = sample_catalog()
    with (out / "catalog.jsonl").open("w") as f:
        for item in catalog:
            f.write(json.dumps(item.to_avro()) + "\n")
    simulator = ShopperSimulator(catalog, users=users, seed=seed)
    start = int(time.time() * 1000) - events * 1000 - 86_400_000
    with (out / "events.jsonl").open("w") as f:
        for event in simulator.history(events, start):
            f.write(json.dumps(event_to_json(event)) + "\n")
    return out
