"""The learning loop on real data replayed in time order (issue 25): online HR@10 over time with the loop on
and off, what a fine-tuning run costs, and how much of a full offline retrain's gain the loop keeps.

    python benchmarks/learning_loop.py --data ../shared/data/tmall --out var/learning-loop

Tmall (SR-GNN/GCE-GNN preprocessing) is replayed with a pseudo-clock, one event a second: its training
sessions in file order (item ids ascend in order of first appearance through the file, the order of the
date-sorted preprocessing), then its test sessions, which are the later period. Each session is a shopper.
A first model is trained offline on the oldest ``--pretrain-share`` of the training clicks and served. The
rest arrives in chunks of about ``--chunk`` events. Online HR@10 of a chunk: for every click after a
session's first, whether the served model's top 10 for the session so far (its newest 16 events, as the
worker serves) held it; items the served model does not know can be neither input nor recommended, as on a
worker without catalogue text. Loop off: the first model serves throughout. Loop on: after each chunk a
new-data trigger; the trainer's own code (``streamrec.streams.trainer.run.train_candidate``: fine-tune on
the newest ``--window`` events, judge on the window's newest slice, promote only by the margin) answers it,
and a promoted version serves from the next chunk on. The offline reference is a model trained from
scratch on every training session (what a full retrain before the later period gives): the loop's share of
its gain over the frozen model on the later period is reported. Prints one JSON object and writes it, with
a plot, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamrec.models import artifacts, registry
from streamrec.models.data import Interactions, Step
from streamrec.models.sequences import user_vectors
from streamrec.models.train import TrainConfig, train
from streamrec.records import Event, EventKind
from streamrec.settings import Settings
from streamrec.streams.trainer.run import Trigger, train_candidate
from streamrec.streams.trainer.window import Window

CLICK = int(EventKind.CLICK)
SERVE_LEN = 16  # the worker's serving window (models/item_map.py DEFAULT_SERVE_LEN)
BASE_MS = 1_577_836_800_000  # 2020-01-01, the replay tool's default base time for datasets


def read_sessions(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def model_config(minutes: float) -> TrainConfig:
    """The deployed model's recipe: the `small` preset (LiGR blocks) at a session's length, no text, and a
    sampled softmax (2,048 shared negatives): the full one over Tmall's 40k items took 5 minutes an epoch
    here, which would leave a first model and every fine-tuning run undertrained."""
    return TrainConfig.preset(
        "small", max_len=20, text="none", max_minutes=minutes, eval_users=2000, epochs=30, negatives=2048
    )


def train_offline(sessions: dict[str, list[str]], out: Path, minutes: float) -> tuple[Path, dict, float]:
    vocab: dict[str, int] = {}
    for items in sessions.values():
        for item in items:
            vocab.setdefault(item, len(vocab) + 1)
    data = Interactions(
        item_ids=list(vocab),
        sequences={s: [Step(CLICK, vocab[i]) for i in items] for s, items in sessions.items()},
        source="tmall replay",
    )
    started = time.perf_counter()
    path = train(data, out, model_config(minutes), progress=False)
    return path, registry.read_metadata(path)["metrics"], time.perf_counter() - started


def online_hr(model_dir: Path, sessions: list[list[str]], k: int = 10) -> dict[str, float]:
    """HR@k of the model's top k (seen items not excluded, as served) at every click after a session's
    first; a session with no item the model knows yet gets the model's most popular items (the worker's
    popularity fill)."""
    art = artifacts.load(model_dir)
    model = art.model.eval()
    index = {item: i + 1 for i, item in enumerate(art.items.ids)}
    popular = torch.from_numpy(np.argsort(-art.popularity[1:], kind="stable")[:k] + 1)
    with torch.inference_mode():
        vecs = model.item_vectors()
    histories: list[list[Step]] = []
    targets: list[int] = []
    hits = cold = 0
    for items in sessions:
        ids = [index.get(i, 0) for i in items]
        for t in range(1, len(ids)):
            known = [i for i in ids[:t] if i][-SERVE_LEN:]
            if not known:
                cold += 1
                hits += bool(ids[t]) and ids[t] in popular.tolist()
                continue
            histories.append([Step(CLICK, i) for i in known])
            targets.append(ids[t])
    for start in range(0, len(histories), 2048):
        batch = histories[start : start + 2048]
        with torch.inference_mode():
            scores = user_vectors(model, batch, {}, None, item_vecs=vecs) @ vecs.T
            scores[:, 0] = -torch.inf
            top = scores.topk(k, dim=1).indices
        wanted = torch.tensor(targets[start : start + 2048]).unsqueeze(1)
        hits += int(((top == wanted) & (wanted > 0)).any(1).sum())
    n = len(targets) + cold
    return {"hr@10": round(hits / n, 5) if n else 0.0, "clicks": n, "cold": cold}


def chunks(sessions: list[tuple[str, list[str]]], size: int) -> list[list[tuple[str, list[str]]]]:
    """Consecutive sessions, about ``size`` clicks a chunk (a session is never split)."""
    out: list[list[tuple[str, list[str]]]] = [[]]
    count = 0
    for session in sessions:
        if count >= size:
            out.append([])
            count = 0
        out[-1].append(session)
        count += len(session[1])
    return [c for c in out if c]


def window_of(stream: list[Event], size: int) -> Window:
    events = stream[-size:]
    description = {
        "source": "tmall replay (pseudo-clock, 1 event/s)",
        "events": len(events),
        "time_range": [events[0].timestamp, events[-1].timestamp],
        "max_events": size,
    }
    return Window(events, description)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["chunks"]
    x = [r["events_before"] / 1000 for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(x, [r["frozen"]["hr@10"] for r in rows], "o-", color="grey", label="loop off (first model)")
    ax.plot(x, [r["loop"]["hr@10"] for r in rows], "o-", color="tab:blue", label="loop on (fine-tuned)")
    promoted = [r for r in rows if r["loop_version"] != result["initial"]["version"]]
    test = [r for r in rows if r["period"] == "test" and r.get("oracle")]
    if test:
        ax.plot(
            [r["events_before"] / 1000 for r in test],
            [r["oracle"]["hr@10"] for r in test],
            "s",
            color="tab:green",
            label="full offline retrain on all earlier sessions",
        )
    start = next((r["events_before"] / 1000 for r in rows if r["period"] == "test"), None)
    if start is not None:
        ax.axvline(start, color="black", lw=0.8, ls=":")
        ax.text(start, ax.get_ylim()[1], " later period (test sessions)", va="top", fontsize=8)
    ax.set_xlabel(
        f"clicks replayed after the first model, thousands ({len(promoted)} chunks served fine-tuned)"
    )
    ax.set_ylabel("online HR@10 of the chunk")
    ax.set_title("Tmall replayed in time order: the learning loop on and off")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/tmall"))
    parser.add_argument("--out", type=Path, default=Path("var/learning-loop"))
    parser.add_argument("--pretrain-share", type=float, default=0.5)
    parser.add_argument("--chunk", type=int, default=20_000, help="clicks between triggers")
    parser.add_argument("--window", type=int, default=100_000, help="the trainer's window, events")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning passes per run")
    parser.add_argument("--minutes", type=float, default=4.0, help="fine-tuning budget per run")
    parser.add_argument("--margin", type=float, default=0.01, help="the promotion margin")
    parser.add_argument("--metric", default="ndcg@10", help="the promotion metric on the slice")
    parser.add_argument("--initial-minutes", type=float, default=10.0, help="first model's training budget")
    parser.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--limit", type=int, default=0, help="use only this many training sessions (smoke)")
    parser.add_argument("--replot", type=Path, help="only draw the plot again from a run's JSON")
    args = parser.parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        plot(result, args.replot.with_suffix(".png"))
        return result
    torch.set_num_threads(2)
    out: Path = args.out
    shutil.rmtree(out / "registry", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    reg = out / "registry"
    train_sessions = read_sessions(args.data / "train_sessions.txt")
    if args.limit:
        train_sessions = train_sessions[: args.limit]
    test_sessions = read_sessions(args.data / "test_sessions.txt")
    stream = [(f"tr-{n}", s, "train") for n, s in enumerate(train_sessions)]
    stream += [(f"te-{n}", s, "test") for n, s in enumerate(test_sessions)]
    train_clicks = sum(len(s) for s in train_sessions)
    split, seen = 0, 0
    while seen < args.pretrain_share * train_clicks:
        seen += len(stream[split][1])
        split += 1
    started = time.perf_counter()

    # The first model, trained offline on the oldest sessions, served by both arms.
    first_dir, first_metrics, first_seconds = train_offline(
        {sid: items for sid, items, _ in stream[:split]}, out / "first", args.initial_minutes
    )
    registry.promote(first_dir, reg, force=True)
    first = registry.current(reg)
    assert first is not None
    settings = Settings(
        model_registry=reg,
        trainer_window_events=args.window,
        trainer_min_events=1000,
        trainer_epochs=args.epochs,
        trainer_max_minutes=args.minutes,
        trainer_promotion_margin=args.margin,
        trainer_promotion_metric=args.metric,
        trainer_threads=2,
        device="cpu",
    )

    events: list[Event] = []
    clock = 0

    def replay(sessions: list[tuple[str, list[str]]]) -> None:
        nonlocal clock
        for sid, items in sessions:
            for item in items:
                events.append(
                    Event(f"{sid}-{clock}", sid, EventKind.CLICK, BASE_MS + clock * 1000, item_id=item)
                )
                clock += 1

    replay([(sid, items) for sid, items, _ in stream[:split]])
    rest = stream[split:]
    periods = {
        "train": [(s, i) for s, i, p in rest if p == "train"],
        "test": [(s, i) for s, i, p in rest if p == "test"],
    }
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    oracle_dir: Path | None = None
    oracle_seconds = 0.0
    for period in ("train", "test"):
        if period == "test" and args.oracle:
            all_train = {sid: items for sid, items, p in stream if p == "train"}
            oracle_dir, _, oracle_seconds = train_offline(all_train, out / "oracle", args.initial_minutes)
        for chunk in chunks(periods[period], args.chunk):
            served = registry.current(reg)
            assert served is not None
            sessions = [items for _, items in chunk]
            row: dict[str, Any] = {
                "period": period,
                "events_before": clock - seen,
                "clicks": sum(len(s) for s in sessions),
                "sessions": len(sessions),
                "loop_version": served.name,
                "frozen": online_hr(first_dir, sessions),
                "loop": online_hr(served, sessions) if served != first else None,
            }
            row["loop"] = row["loop"] or row["frozen"]
            if oracle_dir is not None and period == "test":
                row["oracle"] = online_hr(oracle_dir, sessions)
            rows.append(row)
            replay(chunk)
            trigger = Trigger(
                f"chunk-{len(rows)}", "new_data", served.name, "benchmark", BASE_MS + clock * 1000
            )
            cpu0 = _cpu()
            outcome = train_candidate(settings, [trigger], window_of(events, args.window), {})
            if outcome.outcome == "promoted" and outcome.version is not None:
                registry.serve(reg, outcome.version, outcome.reason)
            runs.append(
                {"after_chunk": len(rows), "cpu_seconds_total": round(_cpu() - cpu0, 1), **asdict(outcome)}
            )
            print(json.dumps({"chunk": row, "run": runs[-1]}), flush=True)

    def mean(period: str, arm: str) -> float | None:
        picked = [r for r in rows if r["period"] == period]
        clicks = sum(r[arm]["clicks"] for r in picked)
        return round(sum(r[arm]["hr@10"] * r[arm]["clicks"] for r in picked) / clicks, 5) if clicks else None

    summary: dict[str, Any] = {}
    for period in ("train", "test"):
        summary[period] = {"frozen": mean(period, "frozen"), "loop": mean(period, "loop")}
    if oracle_dir is not None:
        summary["test"]["oracle"] = mean("test", "oracle")
        o, f, lp = summary["test"]["oracle"], summary["test"]["frozen"], summary["test"]["loop"]
        summary["test"]["loop_share_of_retrain_gain"] = round((lp - f) / (o - f), 3) if o != f else None
    seconds = [r["seconds"] for r in runs if r["outcome"] != "skipped"]
    cpu = [r["cpu_seconds_total"] for r in runs if r["outcome"] != "skipped"]
    summary["runs"] = {
        "count": len(runs),
        "promoted": sum(r["outcome"] == "promoted" for r in runs),
        "rejected": sum(r["outcome"] == "rejected" for r in runs),
        "seconds_median": float(np.median(seconds)) if seconds else None,
        "seconds_max": max(seconds) if seconds else None,
        "cpu_seconds_median": float(np.median(cpu)) if cpu else None,
        "window_events": args.window,
    }
    result = {
        "command": "python benchmarks/learning_loop.py " + " ".join(argv or []),
        "data": str(args.data),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": asdict(replace(model_config(args.initial_minutes))),
        "initial": {
            "version": first.name,
            "pretrain_clicks": seen,
            "offline": first_metrics,
            "training_seconds": round(first_seconds, 1),
        },
        "oracle_training_seconds": round(oracle_seconds, 1) if oracle_dir is not None else None,
        "chunks": rows,
        "runs": runs,
        "summary": summary,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "learning_loop.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "learning_loop.png")
    print(json.dumps(result["summary"]))
    return result


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
