"""Recommendation quality, measured honestly: trains the encoder on each dataset, evaluates it and the
baselines with leave-one-out full ranking (seen items kept and excluded), writes JSON + markdown tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from streamrec.models.data import load
from streamrec.models.evaluate import evaluate
from streamrec.models.train import DataShape, TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"

# Published full-ranking figures (HR@10 / NDCG@10) this project is measured against.
# "best": issue 29's bars, the newest published figures on the same data files (seen items excluded).
TARGETS: dict[str, dict[str, object]] = {
    "amazon-beauty": {"sasrec": (0.0605, 0.0318), "best": ("WEARec", 0.1041, 0.0614)},
    "ml-1m": {"sasrec": (0.2500, 0.1341), "best": ("HSTU-large", 0.3294, 0.1893)},
    "yelp": {"sasrec": (0.0274, 0.0136), "best": ("BSARec (re-run)", 0.0442, 0.0226)},
}
# What a multi-seed summary reports, each as mean, standard deviation and standard error over the seeds.
SUMMARY_METRICS = ("hr@10", "ndcg@10")
# No per-dataset settings: every dataset trains with the default recipe, `streamrec train --data D` with
# no options (TrainConfig.for_data: settings picked from the data's shape, time budget included; the probes
# that chose them are in models/MODEL_CARD.md). `--preset full` and `--set` measure anything else.


def run(
    datasets: list[str],
    out_dir: Path,
    seed: int,
    minutes: float | None,
    preset: str,
    threads: int = 2,
    extra: dict[str, object] | None = None,
) -> dict:
    results: dict[str, object] = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "seed": seed,
        "host": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "protocol": "leave-one-out; full ranking over all items; seen=kept and seen=excluded both reported",
        "datasets": {},
    }
    for name in datasets:
        path = DATA / name
        data = load(path)
        given = {"seed": seed, "max_minutes": minutes, "threads": threads} | (extra or {})
        if preset == "auto":
            config = TrainConfig.for_data(data, **given)
        else:
            config = TrainConfig.preset(preset, **given)
        model_dir = out_dir / "models" / name
        start = time.perf_counter()
        train(data, model_dir, config, progress=sys.stderr.isatty())
        train_s = time.perf_counter() - start
        kept = evaluate(data, model_dir, filter_seen=False)
        excluded = evaluate(data, model_dir, filter_seen=True)
        meta = json.loads((model_dir / "metadata.json").read_text())
        results["datasets"][name] = {  # type: ignore[index]
            "shape": asdict(DataShape.of(data)),
            "config": asdict(config),
            "training_seconds": round(train_s, 1),
            "best_epoch": meta["best_epoch"],
            "epochs_run": meta["epochs_run"],
            "valid": best_valid(meta),
            "seen_kept": kept,
            "seen_excluded": excluded,
            "targets": TARGETS.get(name),
        }
        write(results, out_dir)
    return results


def best_valid(meta: dict) -> dict[str, float]:
    """The validation figures of the epoch early stopping kept (what chose the model, never the test)."""
    epoch = next(h for h in meta["history"] if h["epoch"] == meta["best_epoch"])
    return {m: epoch[m] for m in SUMMARY_METRICS}


def summarise(runs: list[dict]) -> dict:
    """Mean, sample standard deviation and standard error over runs that differ only in their seed: for each
    dataset, validation (the kept epoch) and test with seen items excluded and kept. Runs of different
    settings, or two of one seed, are refused: their spread would not be a seed's."""
    seeds = [r["seed"] for r in runs]
    if len(runs) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"a summary needs runs of at least two distinct seeds, got seeds {seeds}")
    names = list(runs[0]["datasets"])
    if any(list(r["datasets"]) != names for r in runs):
        raise ValueError("the runs measured different datasets")
    datasets: dict[str, object] = {}
    for name in names:
        each = [r["datasets"][name] for r in runs]
        configs = [{k: v for k, v in e["config"].items() if k != "seed"} for e in each]
        if any(c != configs[0] for c in configs):
            differ = sorted(k for c in configs for k in c if c[k] != configs[0].get(k))
            raise ValueError(f"{name}: the runs' settings differ beyond the seed ({', '.join(differ)})")
        figures = {
            "valid": [e["valid"] for e in each],
            "seen_excluded": [e["seen_excluded"]["model"] for e in each],
            "seen_kept": [e["seen_kept"]["model"] for e in each],
        }
        datasets[name] = {
            "config": configs[0],
            "best_epochs": [e["best_epoch"] for e in each],
            "training_seconds": [e["training_seconds"] for e in each],
        } | {
            part: {m: _spread([f[m] for f in values]) for m in SUMMARY_METRICS}
            for part, values in figures.items()
        }
    return {"seeds": seeds, "commands": [r["command"] for r in runs], "datasets": datasets}


def load_run(run_dir: Path) -> dict:
    """A run's quality.json; the kept epoch's validation figures from its models' metadata where the run
    predates their being recorded there."""
    results = json.loads((run_dir / "quality.json").read_text())
    for name, r in results["datasets"].items():
        if "valid" not in r:
            r["valid"] = best_valid(json.loads((run_dir / "models" / name / "metadata.json").read_text()))
    return results


def _spread(values: list[float]) -> dict[str, object]:
    std = statistics.stdev(values)
    return {
        "mean": statistics.fmean(values),
        "std": std,
        "stderr": std / len(values) ** 0.5,
        "values": values,
    }


def write_summary(summary: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# streamrec quality over seeds {', '.join(map(str, summary['seeds']))} (mean ± standard deviation)",
        "",
        "Test: leave-one-out, full ranking, seen items excluded. Valid: the epoch early stopping kept.",
        "",
        "| dataset | valid NDCG@10 | test HR@10 | test NDCG@10 | bar HR@10, NDCG@10 |",
        "|---|---|---|---|---|",
    ]
    for name, d in summary["datasets"].items():
        cells = [d["valid"]["ndcg@10"], d["seen_excluded"]["hr@10"], d["seen_excluded"]["ndcg@10"]]
        best = TARGETS.get(name, {}).get("best")  # today's bar, whenever the runs were made
        bar = ""
        if isinstance(best, tuple):
            label, hr, ndcg = best
            bar = f"{label} {hr:.4f} / {ndcg:.4f}"
        lines.append(
            f"| {name} | " + " | ".join(f"{c['mean']:.4f} ± {c['std']:.4f}" for c in cells) + f" | {bar} |"
        )
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def run_cold_start(
    datasets: list[str], out_dir: Path, seed: int, minutes: float, threads: int, extra: dict[str, object]
) -> dict:
    from streamrec.models.coldstart import cold_start

    results: dict[str, object] = {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])}
    for name in datasets:
        given = {"seed": seed, "max_minutes": minutes, "threads": threads} | extra
        config = TrainConfig.for_data(load(DATA / name), **given)
        results[name] = cold_start(DATA / name, config, share=0.05, seed=seed) | {"config": asdict(config)}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "cold_start.json").write_text(json.dumps(results, indent=2))
    return results


def _row(name: str, label: str, m: dict) -> str:
    return (
        f"| {name} | {label} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['hr@20']:.4f} | {m['ndcg@20']:.4f} "
        f"| {m['coverage@10']:.3f} | {m['users']} |"
    )


def write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# streamrec quality (leave-one-out, full ranking)",
        "",
        f"Command: `{results['command']}`  seed {results['seed']}",
        "",
        "| dataset | scorer (seen) | HR@10 | NDCG@10 | HR@20 | NDCG@20 | coverage@10 | users |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["datasets"].items():
        for seen in ("seen_kept", "seen_excluded"):
            for scorer in ("model", "popular", "itemknn"):
                tag = "kept" if seen == "seen_kept" else "excluded"
                lines.append(_row(name, f"{scorer} ({tag})", r[seen][scorer]))
        t = r["targets"] or {}
        lines.append(
            f"| {name} | training {r['training_seconds']} s, best epoch {r['best_epoch']}/{r['epochs_run']} "
            f"| bar {t.get('best')} | SASRec {t.get('sasrec')} | | | | |"
        )
    (out_dir / "quality.md").write_text("\n".join(lines) + "\n")


def _parse(value: str) -> object:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=list(TARGETS))
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "quality")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run each seed into OUT/seed-N, then write OUT/summary.{json,md}: mean, std and standard error",
    )
    parser.add_argument(
        "--summarise",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="instead: summarise earlier runs' OUT directories (same settings, other seeds) into --out",
    )
    parser.add_argument(
        "--minutes", type=float, default=None, help="training time limit per dataset (default: the recipe's)"
    )
    parser.add_argument("--preset", default="auto", help="auto: the default recipe (TrainConfig.for_data)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per training")
    parser.add_argument(
        "--set",
        nargs="*",
        action="extend",
        default=[],
        help="TrainConfig overrides, e.g. negatives=2048 bf16=true (repeatable)",
    )
    parser.add_argument(
        "--cold-start",
        action="store_true",
        help="instead: hold 5%% of items out of training, rank them by content",
    )
    args = parser.parse_args()
    extra = {k: _parse(v) for k, v in (a.split("=", 1) for a in args.set)}
    if args.cold_start:
        cold = run_cold_start(args.datasets, args.out, args.seed, args.minutes or 10.0, args.threads, extra)
        print(json.dumps(cold))
        return
    if args.summarise or args.seeds:
        if args.summarise:
            runs = [load_run(d) for d in args.summarise]
        else:
            runs = [
                run(
                    args.datasets,
                    args.out / f"seed-{seed}",
                    seed,
                    args.minutes,
                    args.preset,
                    args.threads,
                    extra,
                )
                for seed in args.seeds
            ]
        try:
            summary = summarise(runs)
        except ValueError as e:
            parser.error(str(e))
        write_summary(summary, args.out)
        print(json.dumps({"seeds": summary["seeds"], "out": str(args.out)}))
        return
    results = run(args.datasets, args.out, args.seed, args.minutes, args.preset, args.threads, extra)
    print(json.dumps({k: v for k, v in results.items() if k != "datasets"} | {"out": str(args.out)}))


if __name__ == "__main__":
    main()
