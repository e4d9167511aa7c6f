"""One fine-tuning run: read the window, fine-tune the served model on it, judge candidate and served model
on the window's newest slice, record the candidate in the registry, and promote it only if it is better."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from streamrec.models import registry
from streamrec.models.finetune import decide, fine_tune, save_candidate, temporal_split
from streamrec.models.train import TrainConfig
from streamrec.records import CatalogItem
from streamrec.serde import Codec
from streamrec.settings import Settings
from streamrec.streams.trainer import publish
from streamrec.streams.trainer.window import Window, read_window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trigger:
    """A FineTuneTrigger record, as the trainer reads it."""

    trigger_id: str
    reason: str
    model_version: str
    worker_id: str
    created_at: int

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> Trigger:
        return cls(
            record["trigger_id"],
            record["reason"],
            record["model_version"],
            record["worker_id"],
            int(record["created_at"]),
        )


@dataclass
class Outcome:
    """What a run did: ``promoted``, ``canary`` (served to a share of users first), ``rejected`` or
    ``skipped`` (too little data), with the reason."""

    outcome: str
    reason: str
    version: str | None = None
    window_events: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    candidate: dict[str, float] | None = None
    parent: dict[str, float] | None = None


def training_config(settings: Settings, parent_dir: Path | None) -> TrainConfig:
    """The serving model's own training config (its architecture and learning rate), or the first model's
    preset, with the run's budget from the settings."""
    if parent_dir is not None:
        raw = json.loads((parent_dir / "config.json").read_text()).get("train", {})
        config = TrainConfig.from_json(raw)
    else:
        config = TrainConfig.preset(settings.trainer_preset)
    return replace(
        config,
        epochs=settings.trainer_epochs,
        max_minutes=settings.trainer_max_minutes,
        lr=settings.trainer_learning_rate or config.lr,
        threads=settings.trainer_threads,
        device=settings.device,
        seed=settings.seed,
    )


def parent_items(parent_dir: Path | None) -> list[str]:
    if parent_dir is None:
        return []
    return list(json.loads((parent_dir / "items.json").read_text())["ids"])


def run_once(
    settings: Settings,
    triggers: list[Trigger],
    codec: Codec,
    read: Any = read_window,
) -> Outcome:
    """Answer ``triggers`` with one run: ``read(settings, codec)`` gives the window and the catalogue (the
    events topics now), ``train_candidate`` the verdict, and a better candidate is published and served,
    or, with ``canary_share``, first served to that share of the users as a canary."""
    started = time.perf_counter()
    window, catalog = read(settings, codec)
    outcome = train_candidate(settings, triggers, window, catalog)
    if outcome.outcome == "promoted" and outcome.version is not None:
        if settings.canary_share > 0:
            publish.start_canary(settings, outcome.version, settings.canary_share, outcome.reason)
            outcome.outcome = "canary"
        else:
            publish.promote(settings, outcome.version, outcome.reason)
    outcome.seconds = time.perf_counter() - started
    log.info("%s %s: %s", outcome.outcome, outcome.version, outcome.reason)
    return outcome


def train_candidate(
    settings: Settings, triggers: list[Trigger], window: Window, catalog: dict[str, CatalogItem]
) -> Outcome:
    """Fine-tune the registry's current version on ``window``, judge it on the window's newest slice and
    record it in the registry: as rejected with the reason, or as a candidate to promote (``promoted``,
    which the caller then publishes and serves). Nothing here talks to Kafka."""
    started = time.perf_counter()
    reg = Path(settings.model_registry)
    reg.mkdir(parents=True, exist_ok=True)
    parent_dir = registry.current(reg)
    n = len(window.events)
    if n < settings.trainer_min_events:
        reason = f"{n} valid events in the window, fewer than the {settings.trainer_min_events} needed"
        return Outcome("skipped", reason, window_events=n, seconds=time.perf_counter() - started)
    data = temporal_split(
        window.events,
        parent_items(parent_dir),
        catalog,
        settings.trainer_eval_share,
        settings.trainer_eval_cases,
        settings.seed,
    )
    config = training_config(settings, parent_dir)
    result = fine_tune(data, parent_dir, config, full_retrain=settings.trainer_full_retrain)
    metric, margin = settings.trainer_promotion_metric, settings.trainer_promotion_margin
    promote, reason = decide(result.candidate, result.parent, metric, margin)
    version = registry.new_version()
    metadata = {
        "version": version,
        "parent_version": parent_dir.name if parent_dir is not None else None,
        "index_version": f"{version}.0",
        "trigger": {
            "ids": [t.trigger_id for t in triggers],
            "reasons": [t.reason for t in triggers],
            "workers": sorted({t.worker_id for t in triggers}),
            "first_created_at": min((t.created_at for t in triggers), default=None),
        },
        "data_window": {**window.description, "cut_time": data.cut_time, **data.counts},
        "training": {"mode": result.mode, "config": asdict(config), **result.report},
        "metrics": {
            "temporal": {"candidate": result.candidate, "parent": result.parent},
            # the candidate's own figures, where the registry's older readers look for them
            "valid": result.candidate,
            "filter_seen": True,
        },
        "decision": {"promote": promote, "reason": reason, "metric": metric, "margin": margin},
        "num_users": data.counts["users"],
        "num_items": len(data.item_ids),
        "new_items": len(data.new_items),
        # served as its parent was (its training config is the parent's: TrainConfig.serve_len)
        "serve_len": config.serving_window,
        "training_seconds": result.report["training_seconds"],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Written beside the registry and moved in whole: a reader never sees half a version.
    scratch = reg / f".{version}.partial"
    save_candidate(scratch, result, data, metadata)
    registry.set_status(scratch, "candidate", f"trained on {n} events ({result.mode})")
    os.replace(scratch, reg / version)
    if not promote:
        registry.set_status(reg / version, "rejected", reason)
    return Outcome(
        "promoted" if promote else "rejected",
        reason,
        version,
        n,
        seconds=time.perf_counter() - started,
        cpu_seconds=float(result.report["cpu_seconds"]),  # type: ignore[arg-type]
        candidate=result.candidate,
        parent=result.parent,
    )


def discard_partial(settings: Settings) -> None:
    """Remove candidates whose run was cut short (the trainer stopped while writing one)."""
    reg = Path(settings.model_registry)
    if reg.exists():
        for partial in reg.glob(".*.partial"):
            shutil.rmtree(partial, ignore_errors=True)
