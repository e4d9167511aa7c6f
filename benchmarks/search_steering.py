"""Does a search steer recommendations, for items the model was trained on and for catalogue items it never
saw (issue 26, item 8)? Before/after shares with and without search steering (``SearchSteering`` in
streamrec.models.serving).

For each text embedder (``--embedders``: hashing, MiniLM), a ``tiny`` model is trained on the sample shoppers
(``streamrec.sample``: 8 categories, 480 items; ~20 s and ~40 s), and then:

- ``trained_items``: the sample catalogue is published; shoppers who clicked ``--clicks`` items of one
  category A search for category C in the sample's own words ("hydrating serum"), for every A other than C.
  The share of their top 10 in C before the search (the clicks only) and after it, over all and per query;
  the share given as ``matches_search`` after it; and the share in A before it. ``unsold``: searches for
  what the shop does not sell ("umbrella"), the share given as ``matches_search``.
- ``new_items``: a second catalogue, six categories the model never saw (outdoor/camping, pets/dogs,
  garden/tools, baby/nursery, automotive/car care, office/stationery; 60 items each, with titles and
  descriptions), is published as the shop's catalogue, so only its items are recommendable, every one of
  them through its content vector. Shoppers who clicked items of new category A search for new category C
  ("camping tent", "dog leash"): the same shares.
- ``next_item``: fresh simulated shoppers (another seed) on the trained catalogue; each of the newest
  ``--cases`` clicks and purchases is ranked from the state before it (as the worker's ranking process reads
  it, from the encoded state): HR@10 and NDCG@10 of that item, for the cases with a search among the
  ``SearchSteering.recent`` events before it and the others. The others must be ranked exactly alike with
  and without steering (``identical``).
- ``rank_ms``: ``Recommender.rank`` of a batch of ``--batch`` simulated shoppers' states, one torch thread
  (as the ranking process runs), median of ``--repeats`` runs each way, the two ways alternating.
- ``share_sweep``: the searched category's share after the search, and the next item after a recent search,
  for other shares of the k slots (``--sweep``).

"baseline" is this code with steering off (``SearchSteering(share=0)``, which ranks every window as one
without a recent search is ranked, as the code before steering did); "steering" the defaults. In the sample
shoppers' world a search says which category, never which item (the next click is a popular item of the
category, whatever the query's words), so the next-item figures after a search show what steering costs
where the query's words carry no more than its category. One JSON object on stdout; the models and data go
under ``--out``.

    .venv/bin/python benchmarks/search_steering.py [--embedders hashing,minilm] [--out var/search_steering]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from streamrec.models.serving import Recommender, SearchSteering, set_threads
from streamrec.models.train import TrainConfig, train
from streamrec.records import CatalogItem, EventKind, HistoryEntry, RecommendedItem, UserState
from streamrec.sample import CATEGORIES, ShopperSimulator, sample_catalog, title_case, write_sample_dataset
from streamrec.state import StateLimits, apply_event, encode_state

K = 10
# The two ways every figure is measured: steering off (the code before steering), and the defaults.
WAYS = {"baseline": SearchSteering(share=0.0), "steering": SearchSteering()}

# Categories the sample shoppers never touch: per category, (noun, what it is) pairs and adjectives.
NEW_CATEGORIES: dict[str, tuple[list[tuple[str, str]], list[str]]] = {
    "outdoor/camping": (
        [
            ("camping tent", "a two-person dome tent with a waterproof flysheet and aluminium poles"),
            ("sleeping bag", "a mummy sleeping bag rated to minus five degrees, with a compression sack"),
            ("camping stove", "a folding gas stove for boiling water and cooking on the trail"),
            ("hiking backpack", "a 45 litre trekking pack with a ventilated back and rain cover"),
            ("head torch", "a rechargeable LED headlamp for night hikes and the campsite"),
            ("camping chair", "a folding camp chair with a cup holder and a carry bag"),
        ],
        ["ultralight", "four-season", "family", "compact", "trekking", "insulated", "all-weather"],
    ),
    "pets/dogs": (
        [
            ("dog leash", "a strong nylon lead with a padded handle for daily walks"),
            ("dog collar", "an adjustable collar with a quick-release buckle and a tag ring"),
            ("dog bed", "a washable orthopaedic bed for dogs that love to curl up"),
            ("chew toy", "a durable rubber chew toy that keeps puppies busy"),
            ("dog harness", "a no-pull harness with reflective straps for walking your dog"),
            ("puppy treats", "grain-free training treats for puppies and adult dogs"),
        ],
        ["reflective", "orthopaedic", "puppy", "large breed", "no-pull", "squeaky", "waterproof"],
    ),
    "garden/tools": (
        [
            ("pruning shears", "bypass secateurs for pruning roses, shrubs and small branches"),
            ("garden spade", "a stainless steel digging spade with an ash handle"),
            ("lawn mower", "a push mower for small lawns with a grass box"),
            ("watering can", "a ten litre watering can with a brass rose for seedlings"),
            ("hedge trimmer", "a cordless hedge trimmer for tidy hedges and bushes"),
            ("wheelbarrow", "a steel wheelbarrow for soil, compost and garden waste"),
        ],
        ["cordless", "heavy-duty", "ergonomic", "galvanised", "telescopic", "rust-proof", "allotment"],
    ),
    "baby/nursery": (
        [
            ("baby crib", "a wooden cot for the nursery with an adjustable mattress base"),
            ("baby monitor", "a video baby monitor with night vision and two-way talk"),
            ("changing mat", "a wipe-clean changing mat for nappy changes"),
            ("baby stroller", "a lightweight pushchair that folds with one hand"),
            ("baby bottle", "an anti-colic feeding bottle for newborns"),
            ("nursery lamp", "a dimmable night light for the baby's room"),
        ],
        ["newborn", "anti-colic", "organic cotton", "foldable", "soothing", "pastel", "travel"],
    ),
    "automotive/car care": (
        [
            ("car wax", "a carnauba paste wax that protects and shines the paintwork"),
            ("tyre inflator", "a 12 volt air compressor that pumps up car tyres"),
            ("dash cam", "a front dashboard camera that records every drive"),
            ("jump starter", "a portable battery booster that starts a flat car"),
            ("microfibre cloths", "soft cloths for washing and drying the car without scratches"),
            ("car seat covers", "washable covers that protect the car seats"),
        ],
        ["carnauba", "12 volt", "full hd", "universal fit", "scratch-free", "heavy-duty", "quick-dry"],
    ),
    "office/stationery": (
        [
            ("fountain pen", "a refillable fountain pen with a fine steel nib"),
            ("notebook", "an A5 dotted notebook with numbered pages"),
            ("desk organiser", "a bamboo desk tidy for pens, clips and notes"),
            ("sticky notes", "self-adhesive notes for reminders on the desk"),
            ("stapler", "a desktop stapler that binds 25 sheets"),
            ("letter tray", "a stackable in-tray for letters and documents"),
        ],
        ["bamboo", "refillable", "dotted", "leather-bound", "pastel", "ergonomic", "recycled"],
    ),
}

# The searches of the trained categories, in the sample shoppers' own words.
TRAINED_QUERIES = {c: [f"{adj[i]} {nouns[i]}" for i in (0, 2, 4)] for c, (nouns, adj) in CATEGORIES.items()}
NEW_QUERIES = {c: [nouns[i][0] for i in (0, 1, 2)] for c, (nouns, _) in NEW_CATEGORIES.items()}
# What neither catalogue sells: the share given as matches_search should stay low.
UNSOLD_QUERIES = ["bicycle helmet", "umbrella", "wedding dress"]


def new_catalog(seed: int = 11, items_per_category: int = 60) -> list[CatalogItem]:
    """The second catalogue: items of categories no sample shopper ever touched."""
    rng = random.Random(seed)
    items: list[CatalogItem] = []
    for category, (nouns, adjectives) in NEW_CATEGORIES.items():
        seen: set[str] = set()
        while len(seen) < items_per_category:
            noun, what = rng.choice(nouns)
            title = title_case(f"{rng.choice(adjectives)} {noun}")
            if title in seen:
                title = f"{title} {rng.choice(['Mini', 'Pro', 'Plus', 'Max', 'Set', 'XL', 'Duo'])}"
            if title in seen:
                continue
            seen.add(title)
            items.append(
                CatalogItem(
                    item_id=f"new-{len(items):05d}",
                    title=title,
                    category=category,
                    price=round(rng.uniform(4, 250), 2),
                    in_stock=True,
                    description=f"{title}: {what}.",
                    updated_at=0,
                )
            )
    return items


def clicks_then_search(items: list[str], query: str | None) -> UserState:
    history = [HistoryEntry(EventKind.CLICK, t, item_id=i) for t, i in enumerate(items)]
    if query is not None:
        history.append(HistoryEntry(EventKind.SEARCH, len(items), query=query))
    return UserState("u", history)


def share(recs: list[RecommendedItem], test: Callable[[RecommendedItem], bool]) -> float:
    return sum(1 for r in recs if test(r)) / max(len(recs), 1)


def mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 4) if values else float("nan")


def category_shares(
    rec: Recommender,
    catalog: list[CatalogItem],
    queries: dict[str, list[str]],
    clicks: int,
    users_per_pair: int,
    seed: int,
    ways: dict[str, SearchSteering] = WAYS,
) -> dict[str, Any]:
    """Shoppers who clicked items of category A search for category C (every A other than C): the share of
    their top K in C before the search and after it, in all and per query, baseline and steering; the share
    of the top K given as matches_search after it; and, before it, the share in A (what the clicks steer)."""
    rng = random.Random(seed)
    category_of = {i.item_id: i.category for i in catalog}
    by_category: dict[str, list[str]] = {}
    for item in catalog:
        by_category.setdefault(item.category or "", []).append(item.item_id)
    cases = [  # (clicked category, searched category, query, clicked items)
        (clicked, searched, query, rng.sample(by_category[clicked], clicks))
        for searched, category_queries in queries.items()
        for query in category_queries
        for clicked in by_category
        if clicked != searched
        for _ in range(users_per_pair)
    ]
    before_users = [clicks_then_search(items, None) for _, _, _, items in cases]
    after_users = [clicks_then_search(items, query) for _, _, query, items in cases]
    out: dict[str, Any] = {"users": len(cases), "queries": sum(len(q) for q in queries.values())}
    per_query: dict[str, dict[str, float]] = {q: {} for _, _, q, _ in cases}
    for name, steering in ways.items():
        rec.search_steering = steering
        before, after = rec.recommend(before_users, K), rec.recommend(after_users, K)
        in_clicked, in_before, in_after, searched = [], [], [], []
        for (clicked, category, _, _), b, a in zip(cases, before, after, strict=True):
            in_clicked.append(share(b, lambda r, c=clicked: category_of.get(r.item_id) == c))
            in_before.append(share(b, lambda r, c=category: category_of.get(r.item_id) == c))
            in_after.append(share(a, lambda r, c=category: category_of.get(r.item_id) == c))
            searched.append(share(a, lambda r: r.reason == "matches_search"))
        out[name] = {
            "share_in_searched_category_before": mean(in_before),
            "share_in_searched_category_after": mean(in_after),
            "matches_search_after": mean(searched),
            "share_in_clicked_category_before": mean(in_clicked),
        }
        for query, row in per_query.items():
            mine = [j for j, case in enumerate(cases) if case[2] == query]
            row[f"{name}_before"] = mean([in_before[j] for j in mine])
            row[f"{name}_after"] = mean([in_after[j] for j in mine])
    out["per_query"] = per_query
    return out


def unsold_searches(rec: Recommender, catalog: list[CatalogItem], clicks: int, seed: int) -> dict[str, float]:
    """Shoppers search for what the shop does not sell: the share of their top K given as matches_search."""
    rng = random.Random(seed)
    ids = [i.item_id for i in catalog]
    users = [clicks_then_search(rng.sample(ids, clicks), q) for q in UNSOLD_QUERIES for _ in range(20)]
    out = {}
    for name, steering in WAYS.items():
        rec.search_steering = steering
        out[f"{name}_matches_search"] = mean(
            [share(r, lambda r: r.reason == "matches_search") for r in rec.recommend(users, K)]
        )
    return out


def simulated_states(
    events: int, users: int, seed: int, recent: int
) -> tuple[list[tuple[bytes, str, bool]], list[UserState]]:
    """Fresh shoppers' events applied to states: every click or purchase of a shopper with a history is a
    case (the state before it, encoded as for the changelog; the item; whether a search is among the newest
    ``recent`` events before it), and the final states."""
    simulator = ShopperSimulator(sample_catalog(), users=users, seed=seed, user_prefix="fresh")
    limits = StateLimits()
    states: dict[str, UserState] = {}
    cases: list[tuple[bytes, str, bool]] = []
    for n in range(events):
        event = simulator.next_event(1_700_000_000_000 + n * 1000)
        state = states.get(event.user_id)
        if state is not None and event.kind is not EventKind.SEARCH and event.item_id is not None:
            searched = any(e.kind is EventKind.SEARCH for e in state.history[-recent:])
            cases.append((encode_state(state), event.item_id, searched))
        states[event.user_id] = apply_event(state, event, limits)[0]
    return cases, list(states.values())


def next_item(
    rec: Recommender,
    cases: list[tuple[bytes, str, bool]],
    ways: dict[str, SearchSteering] = WAYS,
    batch: int = 1000,
) -> dict[str, Any]:
    """HR@K and NDCG@K of the next item, for the cases after a recent search and the others, each way;
    whether every case without a recent search was ranked exactly alike every way."""
    ranked: dict[str, list[list[RecommendedItem]]] = {}
    for name, steering in ways.items():
        rec.search_steering = steering
        ranked[name] = []
        for start in range(0, len(cases), batch):
            inputs = rec.inputs_from_bytes([data for data, _, _ in cases[start : start + batch]])
            ranked[name] += rec.rank_inputs(inputs, K).all_items()
    out: dict[str, Any] = {}
    for group, searched in (("after_a_recent_search", True), ("without_a_recent_search", False)):
        rows = [j for j, case in enumerate(cases) if case[2] is searched]
        out[group] = {"cases": len(rows)}
        for name, lists in ranked.items():
            hits = [position(lists[j], cases[j][1]) for j in rows]
            out[group][name] = {
                "hr@10": mean([float(h is not None) for h in hits]),
                "ndcg@10": mean([0.0 if h is None else 1.0 / math.log2(h + 2) for h in hits]),
            }
    quiet = [j for j, case in enumerate(cases) if not case[2]]
    first, *others = ranked.values()
    out["without_a_recent_search"]["identical"] = all(first[j] == o[j] for o in others for j in quiet)
    return out


def position(recs: list[RecommendedItem], item_id: str) -> int | None:
    return next((p for p, r in enumerate(recs) if r.item_id == item_id), None)


def rank_ms(rec: Recommender, users: list[UserState], repeats: int) -> dict[str, Any]:
    """Recommender.rank for one batch, each way, alternating: median milliseconds, and the median of the
    steering phase alone (``last_timings["steer"]``)."""
    times: dict[str, list[float]] = {"baseline": [], "steering": []}
    steer_phase = []
    for _ in range(repeats):
        for name, steering in WAYS.items():
            rec.search_steering = steering
            started = time.perf_counter()
            rec.rank(users, K)
            times[name].append((time.perf_counter() - started) * 1000)
        steer_phase.append(rec.last_timings["steer"] * 1000)
    steered = sum(
        any(e.kind is EventKind.SEARCH for e in u.history[-SearchSteering().recent :]) for u in users
    )
    return {
        "users": len(users),
        "users_steered": steered,
        **{name: round(statistics.median(t), 1) for name, t in times.items()},
        "steer_phase_ms": round(statistics.median(steer_phase), 2),
    }


def measure(text: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    model_dir = out / f"model-{text}"
    result: dict[str, Any] = {}
    if not (args.reuse and (model_dir / "metadata.json").exists()):
        started = time.perf_counter()
        train(data, out=model_dir, config=TrainConfig.preset("tiny", text=text), progress=False)
        result["training_s"] = round(time.perf_counter() - started, 1)
        torch.use_deterministic_algorithms(False)  # training's settings; serving has neither
        set_threads(1)
    result["valid"] = json.loads((model_dir / "metadata.json").read_text())["metrics"]["valid"]
    trained = Recommender.load(model_dir, device="cpu")
    trained.upsert_items(sample_catalog())
    fresh = Recommender.load(model_dir, device="cpu")
    catalog = new_catalog()
    fresh.upsert_items(catalog)
    result["trained_items"] = category_shares(
        trained, sample_catalog(), TRAINED_QUERIES, args.clicks, args.users, 1
    )
    result["trained_items"]["unsold"] = unsold_searches(trained, sample_catalog(), args.clicks, 2)
    result["new_items"] = category_shares(fresh, catalog, NEW_QUERIES, args.clicks, args.users, 3)
    result["new_items"]["unsold"] = unsold_searches(fresh, catalog, args.clicks, 4)
    cases, states = simulated_states(args.events, args.batch, seed=1234, recent=SearchSteering().recent)
    cases = cases[-args.cases :]
    result["next_item"] = next_item(trained, cases)
    result["rank_ms"] = rank_ms(trained, states[: args.batch], args.repeats)
    # Other shares: what the searched category gains against what the next item loses.
    ways = {f"share {x}": SearchSteering(share=float(x)) for x in args.sweep.split(",")}
    on_trained = category_shares(trained, sample_catalog(), TRAINED_QUERIES, args.clicks, args.users, 1, ways)
    on_new = category_shares(fresh, catalog, NEW_QUERIES, args.clicks, args.users, 3, ways)
    after_search = next_item(trained, cases, ways)["after_a_recent_search"]
    result["share_sweep"] = {
        name: {
            "trained_items_after": on_trained[name]["share_in_searched_category_after"],
            "new_items_after": on_new[name]["share_in_searched_category_after"],
            "next_item_after_a_recent_search": after_search[name],
        }
        for name in ways
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--embedders", default="hashing,minilm")
    parser.add_argument("--out", type=Path, default=Path("var/search_steering"))
    parser.add_argument("--clicks", type=int, default=6, help="clicks of each shopper before the search")
    parser.add_argument("--users", type=int, default=4, help="shoppers per query and clicked category")
    parser.add_argument("--events", type=int, default=60_000, help="simulated events for next_item")
    parser.add_argument("--cases", type=int, default=20_000, help="the newest next_item cases ranked")
    parser.add_argument("--batch", type=int, default=2000, help="users in the timed batch")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sweep", default="0.2,0.3,0.5,0.7", help="other shares to measure")
    parser.add_argument("--reuse", action="store_true", help="the models an earlier run left under --out")
    args = parser.parse_args()
    set_threads(1)
    data = args.out / "data"
    if not (args.reuse and (data / "events.jsonl").exists()):
        write_sample_dataset(data)
    report: dict[str, Any] = {"k": K, "steering": asdict(SearchSteering()), "cpus": os.cpu_count()}
    load = os.getloadavg()[0]
    for text in args.embedders.split(","):
        report[text] = measure(text, data, args.out, args)
    report["load_average_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # at the start, at the end
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
