"""Training: determinism with a seed, both losses learn a clear pattern, the fused loss equals the plain
one, bfloat16 steps stay deterministic and learn, the model directory's contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

from streamrec.models import synthetic
from streamrec.models.train import TrainConfig, softmax_cross_entropy, train, training_windows


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


@pytest.mark.parametrize("rows", [1, 7, 300])  # one row, one chunk of rows, several
def test_fused_softmax_cross_entropy_equals_the_plain_one(rows: int) -> None:
    torch.manual_seed(rows)
    h = torch.randn(rows, 8, requires_grad=True)
    vecs = torch.randn(50_000, 8, requires_grad=True)  # wide enough for several chunks of rows
    excluded = torch.zeros(50_000, dtype=torch.bool)
    excluded[[0, 3, 9]] = True  # padding and two blocked items
    targets = torch.randint(10, 50_000, (rows,))
    plain = F.cross_entropy((h @ vecs.T).masked_fill(excluded, -torch.inf), targets)
    want = torch.autograd.grad(plain * 3, (h, vecs))
    fused = softmax_cross_entropy(h, vecs, targets, excluded)
    got = torch.autograd.grad(fused * 3, (h, vecs))
    torch.testing.assert_close(fused, plain)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)  # sums over 50k items in another order
    assert torch.all(got[1][excluded] == 0)  # excluded items are no negatives
    low = softmax_cross_entropy(h, vecs, targets, excluded, low_precision=True)
    torch.testing.assert_close(low, plain, rtol=2e-2, atol=2e-2)


def test_bf16_training_is_deterministic_and_learns(data_dir: Path, tmp_path: Path) -> None:
    config = quick(bf16=True, epochs=15, patience=15)
    a = train(data_dir, tmp_path / "a", config, progress=False)
    b = train(data_dir, tmp_path / "b", config, progress=False)
    sa = torch.load(a / "model.pt", weights_only=True)
    sb = torch.load(b / "model.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(v.dtype != torch.bfloat16 for v in sa.values())  # weights stay fp32
    valid = json.loads((a / "metadata.json").read_text())["metrics"]["valid"]
    assert valid["hr@10"] > 0.8
