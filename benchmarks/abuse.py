"""Does a click bot at 100x a human rate change what other users are shown, or the trained model's quality
(issue 27, "Abuse")?

Sample shoppers (``streamrec.sample``) are the people. ``--bots`` bots each click one item of the catalogue's
long tail ``--bot-clicks`` times at ``--bot-rate`` events per second: 100x a brisk person's 0.5 per second
(a click every two seconds). Their clicks are injected into the sample dataset, and then:

- ``screening``: the trainer's window (``select_window`` in streams/trainer/window.py, the workers' rate limit
  and bot detector of streamrec/abuse.py with the default settings) over every event, people's and bots', in
  time order, each record arriving at its event's time: how many bots it flags and why, how many of their
  events the rate limit refuses, and how many people it flags or limits (false positives: none expected).
- ``quality``: a ``tiny`` model trained on each dataset, same seed: ``clean`` (no bot), ``screened`` (the
  window with the bots injected: what the trainer trains on), ``poisoned`` (the bots' events kept, as
  without abuse control), and ``clean_seed2`` (the clean data, another seed: the noise between two runs).
  Each is judged on the clean dataset's held-out last events (leave-one-out, full ranking): NDCG@10 and
  HR@10.
- ``recommendations``: ``--users`` people's top 10 from each model, against the clean model's: the share of
  identical lists, the mean overlap (Jaccard), and the share shown the bots' item; and whether a newcomer
  (no history: the popularity fill) is shown it. ``in_the_worker``: the same
  people's lists from one model before and after the worker applies the bots' events (rate limit, detector,
  per-user state): a bot changes only its own state, so the lists are identical; the model is the only path
  from a bot to other users, and the window closes it.

One JSON object on stdout; data and models go under ``--out``. About 2 minutes on 2 cores.

    .venv/bin/python benchmarks/abuse.py [--bots 5] [--bot-clicks 2000] [--bot-rate 50] [--out var/abuse]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from streamrec.abuse import AbuseRules, admit, observe
from streamrec.models.evaluate import evaluate
from streamrec.models.serving import Recommender, set_threads
from streamrec.models.train import TrainConfig, train
from streamrec.records import Event, EventKind, UserState
from streamrec.sample import event_to_json, sample_catalog, write_sample_dataset
from streamrec.state import StateLimits, apply_event
from streamrec.streams.trainer.window import Located, TopicsRead, WindowSpec, select_window

HUMAN_RATE = 0.5  # events per second: a brisk person, a click every two seconds
K = 10


def read_events(path: Path) -> list[Event]:
    events = []
    for line in path.read_text().splitlines():
        raw = json.loads(line)
        kind = EventKind[raw["kind"].upper()]
        events.append(
            Event(
                raw["event_id"],
                raw["user_id"],
                kind,
                raw["timestamp"],
                item_id=raw.get("item_id"),
                query=raw.get("query"),
                session_id=raw.get("session_id"),
                price=raw.get("price"),
                quantity=raw.get("quantity", 1),
            )
        )
    return events


def bot_events(bots: int, clicks: int, rate: float, item: str, start_ms: int) -> list[Event]:
    gap_ms = 1000 / rate
    return [
        Event(
            f"bot-{b}-{n}", f"bot-{b}", EventKind.CLICK, start_ms + b * 7_000 + int(n * gap_ms), item_id=item
        )
        for b in range(bots)
        for n in range(clicks)
    ]


def write_dataset(out: Path, source: Path, events: list[Event]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "catalog.jsonl", out / "catalog.jsonl")
    with (out / "events.jsonl").open("w") as f:
        for event in sorted(events, key=lambda e: e.timestamp):
            f.write(json.dumps(event_to_json(event)) + "\n")
    return out


def screening(events: list[Event], rules: AbuseRules) -> tuple[list[Event], dict[str, Any]]:
    """The trainer's window over every event in time order, each arriving at its own time."""
    ordered = sorted(events, key=lambda e: e.timestamp)
    records = [Located(e, "events", 0, n, e.timestamp) for n, e in enumerate(ordered)]
    window = select_window(
        TopicsRead(records=records, read=len(records)), WindowSpec(len(records), abuse=rules)
    )
    return window.events, window.description


def in_the_worker(
    people: list[Event], bots: list[Event], recommender: Recommender, users: list[str], rules: AbuseRules
) -> dict[str, Any]:
    """People's lists before and after the bots' events go through the worker's per-user path."""
    limits = StateLimits()
    states: dict[str, UserState] = {}

    def apply(events: list[Event]) -> dict[str, int]:
        refused = flagged = 0
        for event in sorted(events, key=lambda e: e.timestamp):
            state = states.get(event.user_id)
            tat = admit(state.rate_tat if state is not None else 0, event.timestamp, rules)
            if tat is None:
                refused += 1
                continue
            previous = state.last_event_time if state is not None else 0
            state, _ = apply_event(state, event, limits)
            state.rate_tat = tat
            flagged += observe(state, event, previous, rules) is not None
            states[event.user_id] = state
        return {"rate_limited": refused, "flagged": flagged}

    apply(people)
    before = [ids for ids in top(recommender, [states[u] for u in users])]
    outcome = apply(bots)
    after = [ids for ids in top(recommender, [states[u] for u in users])]
    return {
        "identical_lists": sum(a == b for a, b in zip(before, after, strict=True)) / len(users),
        "bot_events_rate_limited": outcome["rate_limited"],
        "bots_flagged": outcome["flagged"],
    }


def top(recommender: Recommender, states: list[UserState]) -> list[list[str]]:
    lists: list[list[str]] = []
    for first in range(0, len(states), 256):
        ranked = recommender.rank(states[first : first + 256], K)
        lists += [ranked.ids(u) for u in range(len(ranked))]
    return lists


def compare(lists: list[list[str]], reference: list[list[str]], item: str) -> dict[str, float]:
    pairs = list(zip(lists, reference, strict=True))
    return {
        "identical_lists": round(sum(a == b for a, b in pairs) / len(pairs), 4),
        "mean_overlap": round(
            statistics.fmean(len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in pairs), 4
        ),
        "shown_the_bots_item": round(sum(item in a for a in lists) / len(lists), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000, help="sample shoppers")
    parser.add_argument("--events", type=int, default=30_000, help="their events")
    parser.add_argument("--bots", type=int, default=5)
    parser.add_argument("--bot-clicks", type=int, default=2000)
    parser.add_argument("--bot-rate", type=float, default=100 * HUMAN_RATE, help="events per second")
    parser.add_argument("--item", default="sku-00059", help="the item the bots click (a long-tail item)")
    parser.add_argument("--compare-users", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("var/abuse"))
    args = parser.parse_args()
    started = time.perf_counter()
    rules = AbuseRules()
    source = write_sample_dataset(args.out / "sample", users=args.users, events=args.events, seed=42)
    people = read_events(source / "events.jsonl")
    first = min(e.timestamp for e in people)
    bots = bot_events(args.bots, args.bot_clicks, args.bot_rate, args.item, first + 3_600_000)
    kept, description = screening(people + bots, rules)
    kept_users = {e.user_id for e in kept}
    human_users = {e.user_id for e in people}
    result: dict[str, Any] = {
        "human_rate_per_s": HUMAN_RATE,
        "bot_rate_per_s": args.bot_rate,
        "bots": args.bots,
        "bot_clicks_each": args.bot_clicks,
        "bot_item": args.item,
        "rules": {
            "rate_limit_per_s": rules.rate_per_s,
            "burst": rules.burst,
            "min_gap_ms": rules.min_gap_ms,
            "fast_streak": rules.fast_streak,
            "item_repeats": rules.item_repeats,
        },  # fmt: skip
        "screening": {
            "bots_flagged": description["flagged_users"],
            "bot_events_left_out": description["flagged_events_left_out"],
            "people_flagged": len(human_users - kept_users),
            "people_events_rate_limited": description["rate_limited"],
            "people_events_kept": sum(e.user_id in human_users for e in kept),
            "people_events": len(people),
        },
    }
    datasets = {
        "clean": write_dataset(args.out / "clean", source, people),
        "screened": write_dataset(args.out / "screened", source, kept),
        "poisoned": write_dataset(args.out / "poisoned", source, people + bots),
    }
    models: dict[str, Path] = {}
    for name, seed in (("clean", 42), ("screened", 42), ("poisoned", 42), ("clean_seed2", 43)):
        data = datasets[name.removesuffix("_seed2")]
        out = args.out / "models" / name
        shutil.rmtree(out, ignore_errors=True)
        # every epoch the preset allows (no time limit, which a busy machine would reach at another epoch):
        # the same data and seed give the same model
        config = TrainConfig.preset("tiny", seed=seed, max_minutes=60.0)
        models[name] = train(data, out=out, config=config, progress=False)
    set_threads(2)
    quality = {}
    for name, model_dir in models.items():
        judged = evaluate(datasets["clean"], model_dir, baselines=())
        metrics = judged["model"]
        assert isinstance(metrics, dict)
        quality[name] = {k: round(float(metrics[k]), 4) for k in ("ndcg@10", "hr@10")}
    noise = {k: round(abs(quality["clean"][k] - quality["clean_seed2"][k]), 4) for k in ("ndcg@10", "hr@10")}
    result["quality"] = {
        **quality,
        "noise_between_seeds": noise,
        "screened_minus_clean": {k: round(quality["screened"][k] - quality["clean"][k], 4) for k in noise},
        "poisoned_minus_clean": {k: round(quality["poisoned"][k] - quality["clean"][k], 4) for k in noise},
    }
    users = sorted(human_users)[: args.compare_users]
    recommenders = {}
    for name, model_dir in models.items():
        recommender = Recommender.load(model_dir, device="cpu")
        recommender.upsert_items(sample_catalog())
        recommenders[name] = recommender
    limits = StateLimits()
    states: dict[str, UserState] = {}
    for event in sorted(people, key=lambda e: e.timestamp):
        if event.user_id in users:
            states[event.user_id] = apply_event(states.get(event.user_id), event, limits)[0]
    lists = {name: top(r, [states[u] for u in users]) for name, r in recommenders.items()}
    result["recommendations"] = {
        name: compare(lists[name], lists["clean"], args.item)
        for name in ("screened", "poisoned", "clean_seed2")
    }
    result["recommendations"]["clean"] = {
        "shown_the_bots_item": compare(lists["clean"], lists["clean"], args.item)["shown_the_bots_item"]
    }
    # A newcomer has no history: their list is the popularity fill, which counts every training click.
    result["recommendations"]["newcomer_shown_the_bots_item"] = {
        name: args.item in top(r, [UserState("newcomer")])[0] for name, r in recommenders.items()
    }
    result["recommendations"]["in_the_worker"] = in_the_worker(
        people, bots, recommenders["clean"], users, rules
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
