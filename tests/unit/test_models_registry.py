"""Model registry: versioned directories, CURRENT pointer, promotion only of a better model."""

from __future__ import annotations

import json
from pathlib import Path

from streamrec.models import registry


def fake_model(root: Path, version: str, ndcg: float) -> Path:
    path = root / version
    path.mkdir(parents=True)
    meta = {"version": version, "metrics": {"valid": {"ndcg@10": ndcg}}}
    (path / "metadata.json").write_text(json.dumps(meta))
    return path


def test_empty_registry_has_no_current(tmp_path: Path) -> None:
    assert registry.current(tmp_path) is None


def test_promotes_first_and_better_models_and_refuses_worse(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    first = fake_model(reg, "v1", 0.10)
    assert registry.promote(first, reg)
    assert registry.current(reg) == first
    worse = fake_model(reg, "v2", 0.09)
    assert not registry.promote(worse, reg)
    assert registry.current(reg) == first
    equal = fake_model(reg, "v3", 0.10)
    assert not registry.promote(equal, reg)
    better = fake_model(reg, "v4", 0.12)
    assert registry.promote(better, reg)
    assert registry.current(reg) == better
    assert (reg / "CURRENT").read_text().strip() == "v4"


def test_candidate_outside_the_registry_is_copied_in(tmp_path: Path) -> None:
    outside = fake_model(tmp_path / "scratch", "v9", 0.2)
    reg = tmp_path / "reg"
    assert registry.promote(outside, reg)
    assert registry.current(reg) == reg / "v9"
    assert registry.versions(reg) == ["v9"]


def test_new_versions_are_unique_and_time_sortable() -> None:
    a, b = registry.new_version(), registry.new_version()
    assert a != b and a[:15] <= b[:15]
