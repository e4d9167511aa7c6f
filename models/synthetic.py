"""A small synthetic catalogue and event log in streamrec's native format, with a pattern a model can learn:
users search a category, then browse its items in order. For tests and smoke runs, not for quality claims."""

from __future__ import annotations

import json
import random
from pathlib import Path

CATEGORIES = {
    "shoes": "running shoe sneaker",
    "laptop": "notebook computer laptop",
    "coffee": "espresso coffee beans",
    "garden": "garden hose plant",
    "camera": "camera lens photo",
}


def write(directory: Path, users: int = 400, items_per_category: int = 20, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with (directory / "catalog.jsonl").open("w") as f:
        for cat, words in CATEGORIES.items():
            for j in range(items_per_category):
                item = {
                    "item_id": f"{cat}-{j}",
                    "title": f"{cat.title()} {j}",
                    "category": cat,
                    "price": 10.0 + j,
                    "in_stock": True,
                    "description": words,
                }
                f.write(json.dumps(item) + "\n")
    ts, n = 1_700_000_000_000, 0
    with (directory / "events.jsonl").open("w") as f:
        for u in range(users):
            cat = rng.choice(list(CATEGORIES))
            start = rng.randrange(items_per_category)
            events: list[dict[str, object]] = []
            if rng.random() < 0.5:
                events.append({"kind": "search", "query": f"{CATEGORIES[cat].split()[0]} {cat}"})
            for j in range(rng.randint(4, 10)):
                kind = "purchase" if rng.random() < 0.1 else "click"
                events.append({"kind": kind, "item_id": f"{cat}-{(start + j) % items_per_category}"})
            for event in events:
                n += 1
                ts += 1000
                record = {"event_id": f"e{n}", "user_id": f"u{u}", "timestamp": ts, **event}
                f.write(json.dumps(record) + "\n")
    return directory
