"""The quality benchmark's multi-seed summary: the README's headline figures are its means and deviations, so
it must compute them from the runs it is given and refuse runs whose spread would not be a seed's."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmarks import quality


def _run(seed: int, test_ndcg: float, valid_ndcg: float, **config: object) -> dict:
    figures = {"hr@10": test_ndcg * 2, "ndcg@10": test_ndcg}
    return {
        "command": f"quality.py --seed {seed}",
        "seed": seed,
        "datasets": {
            "amazon-beauty": {
                "config": {"dim": 128, "max_len": 50, "seed": seed} | config,
                "best_epoch": 10 + seed % 3,
                "training_seconds": 1500.0,
                "valid": {"hr@10": valid_ndcg * 2, "ndcg@10": valid_ndcg},
                "seen_excluded": {"model": figures},
                "seen_kept": {"model": {m: v / 2 for m, v in figures.items()}},
                "targets": quality.TARGETS["amazon-beauty"],  # what a run records; the summary names today's
            }
        },
    }


def test_the_summary_is_each_figures_mean_and_spread_over_the_seeds(tmp_path: Path) -> None:
    tests, valids = [0.0600, 0.0610, 0.0590], [0.0550, 0.0560, 0.0557]
    runs = [_run(seed, t, v) for seed, t, v in zip([42, 43, 44], tests, valids, strict=True)]

    summary = quality.summarise(runs)

    beauty = summary["datasets"]["amazon-beauty"]
    assert summary["seeds"] == [42, 43, 44]
    ndcg = beauty["seen_excluded"]["ndcg@10"]
    assert ndcg["mean"] == pytest.approx(statistics.fmean(tests))
    assert ndcg["std"] == pytest.approx(statistics.stdev(tests))
    assert ndcg["stderr"] == pytest.approx(statistics.stdev(tests) / 3**0.5)
    assert beauty["valid"]["ndcg@10"]["values"] == valids
    assert beauty["seen_kept"]["hr@10"]["mean"] == pytest.approx(statistics.fmean(tests))
    assert beauty["best_epochs"] == [10 + s % 3 for s in (42, 43, 44)]
    assert "seed" not in beauty["config"]

    quality.write_summary(summary, tmp_path)
    table = (tmp_path / "summary.md").read_text()
    assert f"{statistics.fmean(tests):.4f} ± {statistics.stdev(tests):.4f}" in table
    assert "WEARec 0.1041 / 0.0614" in table  # the bar it is measured against
    assert json.loads((tmp_path / "summary.json").read_text())["seeds"] == [42, 43, 44]


def test_runs_of_other_settings_or_of_one_seed_are_not_summarised() -> None:
    with pytest.raises(ValueError, match="max_len"):
        quality.summarise([_run(42, 0.06, 0.05), _run(43, 0.06, 0.05, max_len=16)])
    with pytest.raises(ValueError, match="distinct seeds"):
        quality.summarise([_run(42, 0.06, 0.05), _run(42, 0.07, 0.05)])
    with pytest.raises(ValueError, match="distinct seeds"):
        quality.summarise([_run(42, 0.06, 0.05)])


def test_an_earlier_runs_validation_figures_come_from_its_models_metadata(tmp_path: Path) -> None:
    run = _run(42, 0.06, 0.05)
    del run["datasets"]["amazon-beauty"]["valid"]
    (tmp_path / "quality.json").write_text(json.dumps(run))
    history = [{"epoch": e, "hr@10": e / 100, "ndcg@10": e / 200} for e in (1, 2, 3)]
    meta = tmp_path / "models" / "amazon-beauty" / "metadata.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"best_epoch": 2, "history": history}))

    loaded = quality.load_run(tmp_path)

    assert loaded["datasets"]["amazon-beauty"]["valid"] == {"hr@10": 0.02, "ndcg@10": 0.01}
