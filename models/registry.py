"""The model registry: versioned model directories under one folder, a CURRENT pointer, and promotion that
only replaces the current model with a better one on the validation metric."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

CURRENT = "CURRENT"
PROMOTION_METRIC = "ndcg@10"


def new_version() -> str:
    """Sortable by time, unique across concurrent trainers."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def read_metadata(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "metadata.json").read_text())


def current(registry: Path) -> Path | None:
    pointer = Path(registry) / CURRENT
    if not pointer.exists():
        return None
    version = pointer.read_text().strip()
    path = Path(registry) / version
    return path if version and (path / "metadata.json").exists() else None


def validation_metric(model_dir: Path, metric: str = PROMOTION_METRIC) -> float:
    metrics = read_metadata(model_dir).get("metrics", {})
    value = metrics.get("valid", {}).get(metric)
    return float(value) if value is not None else float("-inf")


def _point_to(registry: Path, version: str) -> None:
    tmp = Path(registry) / f".{CURRENT}.{uuid.uuid4().hex}"
    tmp.write_text(version + "\n")
    os.replace(tmp, Path(registry) / CURRENT)  # atomic: readers see the old or the new pointer, never half


def promote(candidate: Path, registry: Path, metric: str = PROMOTION_METRIC, force: bool = False) -> bool:
    """Make ``candidate`` CURRENT if its validation metric beats the current model's (or there is none).

    A candidate outside the registry is copied in under its version. Returns whether it was promoted.
    """
    registry = Path(registry)
    registry.mkdir(parents=True, exist_ok=True)
    candidate = Path(candidate)
    version = read_metadata(candidate)["version"]
    incumbent = current(registry)
    if incumbent is not None and incumbent.name == version:
        return False
    better = incumbent is None or validation_metric(candidate, metric) > validation_metric(incumbent, metric)
    if not (force or better):
        return False
    target = registry / version
    if candidate.resolve() != target.resolve():
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(candidate, target)
    _point_to(registry, version)
    return True


def versions(registry: Path) -> list[str]:
    return sorted(p.name for p in Path(registry).iterdir() if (p / "metadata.json").exists())
