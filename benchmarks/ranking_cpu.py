"""What one ranking costs the worker and its ranking process, from the states or from their bytes
(docs/performance.md, "Round 13").

Simulated shoppers' events are applied to states (``--events`` events over ``--users`` shoppers, as the
bench's simulator sends them); the first ``--batch`` states are then ranked ``--rankings`` times in a row
through a real ranking process, in each of two ways, alternating twice:

- ``states``: the worker reads the serving windows from the states (``ProcessRecommender.prepare``, round 12);
- ``bytes``: the worker sends the states as encoded for the changelog and the child reads the windows
  (``ProcessRecommender.prepare_encoded``, what the event stage does since round 13).

It prints one JSON object: per way and repetition, the wall time and the CPU of each process per ranking.
Needs a trained model (the bench's, ``var/bench/models``, by default).

    .venv/bin/python benchmarks/ranking_cpu.py [--model-dir DIR] [--events 300000] [--batch 2100]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from streamrec.models.ranking_process import ProcessRecommender
from streamrec.models.registry import current
from streamrec.records import UserState
from streamrec.sample import ShopperSimulator, sample_catalog
from streamrec.state import StateLimits, apply_event, encode_state
from streamrec.streams.bench import cpu_seconds


def shoppers(events: int, users: int) -> list[UserState]:
    simulator = ShopperSimulator(sample_catalog(), users=users, seed=1)
    limits = StateLimits()
    states: dict[str, UserState] = {}
    for i in range(events):
        event = simulator.next_event(1_700_000_000_000 + i)
        states[event.user_id] = apply_event(states.get(event.user_id), event, limits)[0]
    return list(states.values())


def per_ranking(
    ranker: ProcessRecommender, way: str, users: list[UserState], rankings: int
) -> dict[str, Any]:
    encoded = [encode_state(u) for u in users]
    child = ranker.pid
    assert child is not None
    ours, theirs = cpu_seconds(os.getpid()), cpu_seconds(child)
    started = time.perf_counter()
    for _ in range(rankings):
        if way == "states":
            ranker.prepare(users, 10)()
        else:
            ranker.prepare_encoded(encoded, 10)()
    took = time.perf_counter() - started
    ours_after, theirs_after = cpu_seconds(os.getpid()), cpu_seconds(child)
    assert None not in (ours, theirs, ours_after, theirs_after)
    ms = lambda seconds: round(1000 * seconds / rankings, 1)  # noqa: E731
    return {
        "way": way,
        "wall_ms": ms(took),
        "worker_cpu_ms": ms(ours_after - ours),  # type: ignore[operator]
        "ranking_process_cpu_ms": ms(theirs_after - theirs),  # type: ignore[operator]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="default: var/bench/models' current")
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=2_100, help="users per ranking (a backlog batch's)")
    parser.add_argument("--rankings", type=int, default=20)
    args = parser.parse_args()
    model_dir = args.model_dir or current(Path("var/bench/models"))
    if model_dir is None:
        raise SystemExit("no model: run `streamrec bench` once, or pass --model-dir")
    users = shoppers(args.events, args.users)[: args.batch]
    ranker = ProcessRecommender(Path(model_dir))
    try:
        ranker.prepare(users, 10)()  # warm: the first ranking loads the encoder's kernels
        runs = [
            per_ranking(ranker, way, users, args.rankings) for _ in range(2) for way in ("states", "bytes")
        ]
    finally:
        ranker.close()
    print(
        json.dumps(
            {
                "model_dir": str(model_dir),
                "events": args.events,
                "users_ranked": len(users),
                "mean_history": round(sum(len(u.history) for u in users) / len(users), 1),
                "mean_state_bytes": round(sum(len(encode_state(u)) for u in users) / len(users), 1),
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
