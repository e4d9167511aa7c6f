"""Model registry: versioned directories, CURRENT pointer, promotion only of a better model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_statuses_and_the_serving_chain_follow_promotions_and_rollbacks(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    for version, ndcg in (("v1", 0.1), ("v2", 0.2), ("v3", 0.3)):
        fake_model(reg, version, ndcg)
    assert registry.status_of(reg / "v1")["status"] == "candidate"
    assert registry.rollback_target(reg) is None
    registry.serve(reg, "v1", "first")
    registry.serve(reg, "v2", "better")
    registry.serve(reg, "v3", "better still")
    assert registry.serving_chain(reg) == ["v1", "v2", "v3"]
    assert registry.status_of(reg / "v2")["status"] == "retired"
    assert registry.rollback_target(reg) == "v2"

    assert registry.serve(reg, "v2", "v3 hurt live figures", action="rollback") == "v3"
    assert registry.current(reg) == reg / "v2"
    assert registry.status_of(reg / "v2")["status"] == "serving"
    v3 = registry.status_of(reg / "v3")
    assert v3["status"] == "retired" and v3["reason"] == "rolled back to v2"
    assert [h["status"] for h in v3["history"]] == ["serving", "retired"]
    # a second rollback goes one further back; a promotion after it pushes again
    assert registry.rollback_target(reg) == "v1"
    registry.serve(reg, "v1", "again", action="rollback")
    assert registry.serving_chain(reg) == ["v1"] and registry.rollback_target(reg) is None
    registry.serve(reg, "v3", "by command")
    assert registry.serving_chain(reg) == ["v1", "v3"]
    assert [e["action"] for e in registry.history(reg)] == ["promote"] * 3 + ["rollback"] * 2 + ["promote"]


def test_promote_keeps_the_log_and_describe_shows_lineage_and_figures(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    assert registry.promote(fake_model(reg, "v1", 0.1), reg)
    child = fake_model(reg, "v2", 0.2)
    meta = json.loads((child / "metadata.json").read_text())
    meta |= {
        "parent_version": "v1",
        "trigger": {"ids": ["t1", "t2"], "reasons": ["new_data", "accuracy_drift"]},
        "data_window": {"events": 1234},
        "metrics": {"temporal": {"candidate": {"ndcg@10": 0.2}, "parent": {"ndcg@10": 0.15}}},
    }
    (child / "metadata.json").write_text(json.dumps(meta))
    registry.set_status(child, "rejected", "not better by the margin")
    rows = {r["version"]: r for r in registry.describe(reg)}
    assert rows["v1"]["status"] == "serving"
    assert rows["v2"] == rows["v2"] | {
        "parent_version": "v1",
        "status": "rejected",
        "reason": "not better by the margin",
        "trigger": "accuracy_drift,new_data",
        "window_events": 1234,
        "candidate": {"ndcg@10": 0.2},
        "parent": {"ndcg@10": 0.15},
    }
    assert registry.lineage(reg, "v2") == ["v2", "v1"]
    assert registry.trigger_ids(reg) == {"t1", "t2"}
    assert registry.history(reg)[0] | {"at": 0} == {
        "action": "promote", "version": "v1", "previous": None, "reason": "ndcg@10 0.1000", "at": 0
    }  # fmt: skip


def test_a_version_that_is_not_in_the_registry_cannot_be_served(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    fake_model(reg, "v1", 0.1)
    for bad in ("v9", "", "../v1"):
        with pytest.raises(registry.RegistryError):
            registry.serve(reg, bad, "no")
    assert registry.current(reg) is None


def test_a_canary_runs_beside_the_served_version_and_ends_promoted_or_rejected(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    for version in ("v1", "v2", "v3"):
        fake_model(reg, version, 0.1)
    registry.serve(reg, "v1", "first")
    with pytest.raises(registry.RegistryError):
        registry.start_canary(reg, "v1", 0.1, "the served version is no canary")
    started = registry.start_canary(reg, "v2", 0.1, "passed the slice")
    assert registry.canary(reg) == started and started["parent_version"] == "v1"
    assert registry.status_of(reg / "v2")["reason"].startswith("canary: 10.0% of users beside v1")
    registry.end_canary(reg, "rejected", "canary: lower online hit rate")
    assert registry.canary(reg) is None
    assert registry.status_of(reg / "v2")["status"] == "rejected"
    registry.start_canary(reg, "v3", 0.2, "passed the slice")
    registry.end_canary(reg, "serving", "canary: held up")
    registry.serve(reg, "v3", "canary: held up")
    assert registry.serving_chain(reg) == ["v1", "v3"]  # a canary's start and end serve no one in full
    assert registry.rollback_target(reg) == "v1"
