"""Telling the workers what to serve: a ModelUpdate record on the model-updates topic, then the registry's
CURRENT pointer, status and log, in that order. The record comes first so that the registry never claims a
version the workers were not told about; a record that cannot be delivered changes nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from streamrec.models import registry
from streamrec.settings import Settings
from streamrec.streams.client import EventProducer

CURRENT_KEY = "current"  # the workers' models table keeps the last record under each key (streams/app.py)
CANARY_KEY = "canary"


def figures(metadata: dict[str, Any]) -> dict[str, float]:
    """A version's figures as the record's ``metrics`` map: its own and its parent's on the temporal slice
    (``slice_*``, ``parent_slice_*``), or its leave-one-out validation figures (``valid_*``)."""
    metrics = metadata.get("metrics") or {}
    out: dict[str, float] = {}
    temporal = metrics.get("temporal") or {}
    for prefix, values in (("slice_", temporal.get("candidate")), ("parent_slice_", temporal.get("parent"))):
        for name, value in (values or {}).items():
            if isinstance(value, int | float):
                out[prefix + name] = float(value)
    for name, value in (metrics.get("valid") or {}).items():
        if isinstance(value, int | float) and not temporal:
            out["valid_" + name] = float(value)
    return out


def model_update(model_dir: Path) -> dict[str, Any]:
    """The ModelUpdate record for a version directory the workers can read."""
    metadata = registry.read_metadata(model_dir)
    return {
        "model_version": metadata["version"],
        "path": str(Path(model_dir).resolve()),
        "parent_version": metadata.get("parent_version"),
        "metrics": figures(metadata),
        "promoted_at": time.time_ns() // 1_000_000,
    }


def publish(settings: Settings, record: dict[str, Any], key: str = CURRENT_KEY) -> None:
    """Send one ModelUpdate and wait for the broker's acknowledgement (DeliveryError when it is not)."""
    with EventProducer(settings) as producer:
        producer.send("ModelUpdate", record, key=key, topic=settings.model_updates_topic)
        producer.flush()


def promote(settings: Settings, version: str, reason: str) -> dict[str, Any]:
    """Serve ``version`` of the registry everywhere: publish its ModelUpdate, then point CURRENT at it. A
    canary ends with it (promoted if it is this version; otherwise its serving model is gone)."""
    reg = settings.model_registry
    record = model_update(registry.version_dir(reg, version))
    publish(settings, record)
    _end_canary(reg, version, "serving", reason)
    registry.serve(reg, version, reason, action="promote")
    return record


def rollback(settings: Settings, reason: str) -> dict[str, Any]:
    """Serve again the version served before the current one (RegistryError when there is none)."""
    reg = settings.model_registry
    target = registry.rollback_target(reg)
    if target is None:
        raise registry.RegistryError(f"nothing to roll back to in {reg}")
    record = model_update(registry.version_dir(reg, target))
    publish(settings, record)
    _end_canary(reg, target, "serving", reason)
    registry.serve(reg, target, reason, action="rollback")
    return record


def start_canary(settings: Settings, version: str, share: float, reason: str) -> dict[str, Any]:
    """Serve ``version`` to ``share`` of the users (a stable hash of the user id) beside the current version:
    its ModelUpdate under the canary key, with the share and the current version as its parent."""
    reg = settings.model_registry
    served = registry.current(reg)
    if served is None or served.name == version or not 0 < share < 1:
        raise registry.RegistryError("a canary is another version than the one served, at a share in (0, 1)")
    record = model_update(registry.version_dir(reg, version))
    record |= {"parent_version": served.name, "canary_share": share}
    publish(settings, record, key=CANARY_KEY)
    registry.start_canary(reg, version, share, reason)
    return record


def stop_canary(settings: Settings, reason: str) -> dict[str, Any]:
    """Roll the running canary back: its ModelUpdate with share 0, and it is recorded as rejected."""
    reg = settings.model_registry
    running = registry.canary(reg)
    if running is None:
        raise registry.RegistryError(f"no canary runs in {reg}")
    record = model_update(registry.version_dir(reg, running["version"]))
    record |= {"parent_version": running["parent_version"], "canary_share": 0.0}
    publish(settings, record, key=CANARY_KEY)
    registry.end_canary(reg, "rejected", reason)
    return record


def _end_canary(reg: Any, served: str, status: str, reason: str) -> None:
    running = registry.canary(reg)
    if running is None:
        return
    if running["version"] == served:
        registry.end_canary(reg, status, reason)
    else:
        registry.end_canary(reg, "rejected", f"ended: {served} is served now ({reason})")
