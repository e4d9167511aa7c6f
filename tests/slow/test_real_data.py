"""The suites that train on real data (`make test-slow`, `pytest -m slow`; excluded from `make test`).

Amazon Beauty from ../shared/data, trained and evaluated exactly as `benchmarks/quality.py` does it (the
default recipe `streamrec train` takes with no options, its time limit, leave-one-out with full ranking over
every item): the model must beat the published
SASRec figures and the item-kNN baseline of the same run, seen items excluded, as docs/quality.md's table
claims; and items held out of training entirely must be found through their content far above chance. About
45 minutes on 2 cores; on a busy machine the time limit cuts the training short, so run it alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import quality

DATASET = "amazon-beauty"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(not (quality.DATA / DATASET).is_dir(), reason=f"no {quality.DATA / DATASET}"),
]


def test_the_default_recipe_on_beauty_beats_published_sasrec_and_the_item_knn_baseline(
    tmp_path: Path,
) -> None:
    results = quality.run([DATASET], tmp_path, seed=42, minutes=None, preset="auto")
    run = results["datasets"][DATASET]
    excluded = run["seen_excluded"]
    model, knn = excluded["model"], excluded["itemknn"]
    sasrec_hr, sasrec_ndcg = quality.TARGETS[DATASET]["sasrec"]  # type: ignore[misc]
    assert model["hr@10"] > sasrec_hr and model["ndcg@10"] > sasrec_ndcg, run
    assert model["hr@10"] > knn["hr@10"] and model["ndcg@10"] > knn["ndcg@10"], run
    assert model["users"] == knn["users"] == 22_363  # every user, ranked against all items
    assert (tmp_path / "quality.json").exists() and (tmp_path / "quality.md").exists()


def test_items_held_out_of_training_are_found_through_their_content(tmp_path: Path) -> None:
    results = quality.run_cold_start([DATASET], tmp_path, seed=42, minutes=10.0, threads=2, extra={})
    cold = results[DATASET]
    served = cold["content_only_calibrated"]  # as serving ranks a new item: its content vector, rescaled
    assert cold["held_out_items"] > 0 and served["users"] > 100, cold
    assert served["hr@10"] > 20 * cold["chance_hr@10"], cold
    assert served["hr@10"] > cold["zero_vector_reference"]["hr@10"], "the content is what finds them"
