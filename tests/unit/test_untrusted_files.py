"""Model and data files run no code when read: a worker loads whatever model directory a ModelUpdate record
names, so a planted pickle must fail to load, not run. Also: nothing in streamrec's code unpickles."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamrec.models import artifacts
from streamrec.models.artifacts import ItemTable
from streamrec.models.encoder import EncoderConfig, SequenceEncoder
from streamrec.models.text import MiniLMEmbedder

ROOT = Path(__file__).resolve().parents[2]


class Planted:
    """Unpickling this opens (creates) a file: the proof that a loader ran code from the file it read."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = SequenceEncoder(EncoderConfig(num_items=3, dim=8, layers=1, heads=2, max_len=4))
    items = ItemTable(["a", "b", "c"], ["A", "B", "C"], [True, True, True])
    directory = tmp_path / "v1"
    artifacts.save(directory, model, {}, {"version": "v1"}, items, np.ones(4), None)
    assert artifacts.load(directory).items.ids == ["a", "b", "c"]  # the untouched directory loads
    return directory


def test_a_planted_pickle_in_the_weights_is_refused(model_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    state = {"weights": torch.zeros(1), "payload": Planted(marker)}
    torch.save(state, model_dir / "model.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        artifacts.load(model_dir)
    assert not marker.exists()


def test_a_pickled_array_is_refused(model_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    np.save(model_dir / "popularity.npy", np.array([Planted(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        artifacts.load(model_dir)
    words = tmp_path / "query_words.npz"
    np.savez(words, words=np.array([Planted(marker)], dtype=object), vectors=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="allow_pickle"):
        MiniLMEmbedder.load_words(words)
    assert not marker.exists()


UNPICKLERS = ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal")


def call_name(node: ast.Call) -> str:
    parts = []
    func: ast.expr = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def keyword(node: ast.Call, name: str) -> Any:
    for kw in node.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def test_every_loader_in_the_code_refuses_code() -> None:
    """torch.load with weights_only=True, np.load with allow_pickle=False, from_pretrained of a model with
    use_safetensors=True, and no unpickling module imported at all."""
    found = []
    for folder in ("streamrec", "streams", "models", "benchmarks"):
        for path in sorted((ROOT / folder).glob("**/*.py")):
            where = f"{path.relative_to(ROOT)}"
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    found += [f"{where}: imports {n}" for n in names if n.split(".")[0] in UNPICKLERS]
                if not isinstance(node, ast.Call):
                    continue
                name = call_name(node)
                if name.endswith("torch.load") and keyword(node, "weights_only") is not True:
                    found.append(f"{where}:{node.lineno} {name} without weights_only=True")
                if name in ("np.load", "numpy.load") and keyword(node, "allow_pickle") is not False:
                    found.append(f"{where}:{node.lineno} {name} without allow_pickle=False")
                if name.endswith("Model.from_pretrained") and keyword(node, "use_safetensors") is not True:
                    found.append(f"{where}:{node.lineno} {name} without use_safetensors=True")
    assert not found
