"""Contract shared by every item-index back-end: top hits on clear data, ids kept, adds, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamrec.models.index import ItemIndex


@pytest.fixture()
def vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(500, 16)).astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_index_finds_the_best_inner_product(kind: str, vectors: np.ndarray, tmp_path: Path) -> None:
    ids = np.arange(1, 501)
    index = ItemIndex.build(vectors, ids, kind)  # type: ignore[arg-type]
    queries = vectors[:20] * 10  # each query points at one item far harder than at any other
    scores, found = index.search(queries, 5)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, 0] + 1
    assert (found[:, 0] == exact).mean() >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first

    index.add(np.full((1, 16), 50.0, dtype=np.float32), np.array([999]))
    _, found = index.search(np.ones((1, 16), dtype=np.float32), 1)
    assert found[0, 0] == 999 and index.size == 501

    index.save(tmp_path, "v1.0")
    loaded, version = ItemIndex.load(tmp_path)
    assert version == "v1.0" and loaded.size == 501 and loaded.kind == index.kind
