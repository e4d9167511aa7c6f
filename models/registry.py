"""The model registry: versioned model directories under one folder, a CURRENT pointer, and promotion that
only replaces the current model with a better one on the validation metric.

Every version also has a status (``status.json``: candidate, serving, rejected or retired, with the reason
and when each changed), and the registry keeps a log of what was served (``history.jsonl``): promotions
push a version onto the serving chain, a rollback pops the one served now and serves the one before it. A
version's metadata (parent, trigger, data window, training config, metrics) is written once, when it is
trained; its status is the only part that changes."""

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
    _served(
        registry,
        version,
        "promote",
        f"{metric} {validation_metric(target, metric):.4f}" if better else "forced",
        incumbent.name if incumbent is not None else None,
    )
    return True


def versions(registry: Path) -> list[str]:
    return sorted(p.name for p in Path(registry).iterdir() if (p / "metadata.json").exists())


# --- status, lineage and what was served ----------------------------------------------------------------

STATUS_FILE = "status.json"
HISTORY = "history.jsonl"
STATUSES = ("candidate", "serving", "rejected", "retired")


class RegistryError(ValueError):
    """A version that does not exist, or a rollback with nothing to go back to."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def status_of(model_dir: Path) -> dict:
    """``{"status", "reason", "changed_at", "history": [...]}``; a version written before statuses existed
    is a candidate."""
    path = Path(model_dir) / STATUS_FILE
    if path.exists():
        return json.loads(path.read_text())
    return {"status": "candidate", "reason": "", "changed_at": None, "history": []}


def set_status(model_dir: Path, status: str, reason: str, at_ms: int | None = None) -> None:
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    current_status = status_of(model_dir)
    at_ms = _now_ms() if at_ms is None else at_ms
    entry = {"status": status, "reason": reason, "at": at_ms}
    _write_json(
        Path(model_dir) / STATUS_FILE,
        {
            "status": status,
            "reason": reason,
            "changed_at": at_ms,
            "history": [*current_status["history"], entry],
        },
    )


def version_dir(registry: Path, version: str) -> Path:
    path = Path(registry) / version
    if not version or "/" in version or not (path / "metadata.json").exists():
        raise RegistryError(f"no version {version!r} in {registry}")
    return path


def history(registry: Path) -> list[dict]:
    """Every change of the served version, oldest first."""
    path = Path(registry) / HISTORY
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def serving_chain(registry: Path) -> list[str]:
    """The versions served one after another, the current one last: a promotion pushes, a rollback pops."""
    chain: list[str] = []
    for entry in history(registry):
        version = entry["version"]
        if entry["action"] not in ("promote", "rollback"):
            continue  # a canary's start and end change nothing served to everyone
        if entry["action"] == "rollback" and chain:
            chain.pop()
        if not chain or chain[-1] != version:
            chain.append(version)
    served = current(registry)
    if served is not None and (not chain or chain[-1] != served.name):
        chain.append(served.name)  # a registry from before the log: its current version is the chain
    return chain


def rollback_target(registry: Path) -> str | None:
    """The version a rollback would serve: the one served before the current one."""
    chain = serving_chain(registry)
    return chain[-2] if len(chain) >= 2 else None


def _served(registry: Path, version: str, action: str, reason: str, previous: str | None) -> None:
    """Bookkeeping after CURRENT points at ``version``: the log, and the statuses of both versions."""
    at = _now_ms()
    entry = {"action": action, "version": version, "previous": previous, "reason": reason, "at": at}
    with (Path(registry) / HISTORY).open("a") as log:
        log.write(json.dumps(entry) + "\n")
    if previous is not None and previous != version and (Path(registry) / previous).exists():
        why = f"rolled back to {version}" if action == "rollback" else f"replaced by {version}"
        set_status(Path(registry) / previous, "retired", why, at)
    set_status(Path(registry) / version, "serving", reason, at)


def serve(registry: Path, version: str, reason: str, action: str = "promote") -> str | None:
    """Make ``version`` (already in the registry) the one served: CURRENT, its status, the log. Returns the
    version served before. Publishing the ModelUpdate that tells the workers is the caller's, first."""
    if action not in ("promote", "rollback"):
        raise ValueError(f"action {action!r}")
    version_dir(registry, version)
    incumbent = current(registry)
    previous = incumbent.name if incumbent is not None else None
    _point_to(registry, version)
    _served(registry, version, action, reason, previous)
    return previous


def trigger_ids(registry: Path) -> set[str]:
    """Ids of the fine-tuning triggers that some version's run has answered (accepted or rejected)."""
    found: set[str] = set()
    root = Path(registry)
    if not root.exists():
        return found
    for version in versions(root):
        trigger = read_metadata(root / version).get("trigger") or {}
        found.update(trigger.get("ids", []))
    return found


def describe(registry: Path) -> list[dict]:
    """One row per version, oldest first: its lineage, status, trigger, window and figures on its temporal
    slice (a fine-tuned version's own and its parent's), for ``streamrec models list``."""
    root = Path(registry)
    if not root.exists():
        return []
    served = current(root)
    rows = []
    for version in versions(root):
        meta = read_metadata(root / version)
        state = status_of(root / version)
        status = state["status"]
        if served is not None and served.name == version:
            status = "serving"  # a registry from before statuses: CURRENT is the truth
        temporal = (meta.get("metrics") or {}).get("temporal") or {}
        window = meta.get("data_window")
        trigger = meta.get("trigger") or {}
        rows.append(
            {
                "version": version,
                "parent_version": meta.get("parent_version"),
                "status": status,
                "reason": state.get("reason", ""),
                "trigger": ",".join(sorted(set(trigger.get("reasons", [])))) or None,
                "window_events": window.get("events") if isinstance(window, dict) else None,
                "candidate": temporal.get("candidate"),
                "parent": temporal.get("parent"),
                "valid": (meta.get("metrics") or {}).get("valid"),
                "created_at": meta.get("created_at"),
            }
        )
    return rows


def lineage(registry: Path, version: str) -> list[str]:
    """``version`` and its ancestors, newest first, as far as the registry holds them."""
    chain, seen = [], set()
    root = Path(registry)
    name: str | None = version
    while name and name not in seen and (root / name / "metadata.json").exists():
        seen.add(name)
        chain.append(name)
        name = read_metadata(root / name).get("parent_version")
    return chain


# --- a canary: a candidate served beside the current version to a share of users --------------------------

CANARY = "CANARY"


def canary(registry: Path) -> dict | None:
    """The canary running now: ``{"version", "share", "parent_version", "started_at", "reason"}``, or None."""
    path = Path(registry) / CANARY
    return json.loads(path.read_text()) if path.exists() else None


def start_canary(registry: Path, version: str, share: float, reason: str) -> dict:
    """Record that ``version`` is served to ``share`` of the users beside the current version (publishing
    the canary's ModelUpdate is the caller's, first)."""
    model_dir = version_dir(registry, version)
    served = current(registry)
    if served is None or served.name == version:
        raise RegistryError(f"a canary runs beside the version served, and {version} is not another one")
    record = {
        "version": version,
        "share": share,
        "parent_version": served.name,
        "started_at": _now_ms(),
        "reason": reason,
    }
    _write_json(Path(registry) / CANARY, record)
    with (Path(registry) / HISTORY).open("a") as log:
        log.write(json.dumps({"action": "canary", **record, "at": record["started_at"]}) + "\n")
    set_status(model_dir, "candidate", f"canary: {share:.1%} of users beside {served.name}; {reason}")
    return record


def end_canary(registry: Path, status: str, reason: str) -> dict | None:
    """The canary is over: its version becomes ``status`` (serving: promoted; rejected: rolled back)."""
    running = canary(registry)
    if running is None:
        return None
    (Path(registry) / CANARY).unlink(missing_ok=True)
    with (Path(registry) / HISTORY).open("a") as log:
        entry = {"action": "canary_end", "version": running["version"], "status": status, "reason": reason}
        log.write(json.dumps({**entry, "at": _now_ms()}) + "\n")
    if status != "serving":  # a promotion sets its own status
        set_status(Path(registry) / running["version"], status, reason)
    return running
