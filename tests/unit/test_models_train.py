"""Training: determinism with a seed, both losses learn a clear pattern, the model directory's contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamrec.models import synthetic
from streamrec.models.train import TrainConfig, train, training_windows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write(tmp_path_factory.mktemp("data"), users=400)


def quick(**overrides: object) -> TrainConfig:
    return TrainConfig.preset("tiny", **({"epochs": 6, "max_minutes": 10.0} | overrides))


def test_same_seed_same_model(data_dir: Path, tmp_path: Path) -> None:
    a = train(data_dir, tmp_path / "a", quick(), progress=False)
    b = train(data_dir, tmp_path / "b", quick(), progress=False)
    sa = torch.load(a / "model.pt", weights_only=True)
    sb = torch.load(b / "model.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_directory_is_state_dict_and_json(data_dir: Path, tmp_path: Path) -> None:
    out = train(data_dir, tmp_path / "m", quick(), progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"model.pt", "config.json", "metadata.json", "items.json", "index.faiss", "index.json"} <= names
    meta = json.loads((out / "metadata.json").read_text())
    for key in (
        "version",
        "parent_version",
        "data_fingerprint",
        "data_window",
        "metrics",
        "training_seconds",
    ):
        assert key in meta
    assert json.loads((out / "index.json").read_text())["index_version"] == meta["index_version"]
    state = torch.load(out / "model.pt", weights_only=True)  # plain tensors, loadable without pickled code
    assert all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.mark.parametrize("negatives", [0, 30])
def test_full_and_sampled_softmax_learn_the_pattern(data_dir: Path, tmp_path: Path, negatives: int) -> None:
    out = train(data_dir, tmp_path / "m", quick(negatives=negatives, epochs=15, patience=15), progress=False)
    valid = json.loads((out / "metadata.json").read_text())["metrics"]["valid"]
    assert valid["hr@10"] > 0.8  # popularity scores ~0.1 on this data


@given(
    lengths=st.lists(st.integers(0, 260), max_size=8),
    max_len=st.integers(1, 60),
    all_windows=st.booleans(),
)
def test_training_windows_cover_each_target_once(lengths: list[int], max_len: int, all_windows: bool) -> None:
    # Events are numbered per history so a window's targets (all but its first event) can be traced back.
    seqs = [[(h, i) for i in range(n)] for h, n in enumerate(lengths)]
    windows = training_windows(seqs, max_len, all_windows)  # type: ignore[arg-type]
    assert all(2 <= len(w) <= max_len + 1 for w in windows)
    assert all(list(w) == seqs[w[0][0]][w[0][1] : w[-1][1] + 1] for w in windows)  # contiguous slices
    targets = sorted(step for w in windows for step in w[1:])
    if all_windows:
        assert targets == sorted((h, i) for h, n in enumerate(lengths) for i in range(1, n))
    else:
        newest = [(h, i) for h, n in enumerate(lengths) if n >= 2 for i in range(max(1, n - max_len), n)]
        assert targets == sorted(newest)
