"""The worker's Prometheus metrics (served on /metrics by the faust web server)."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class WorkerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.events = Counter("streamrec_events", "Events applied to user state", ["kind"], registry=r)
        self.duplicates = Counter("streamrec_duplicate_events", "Events ignored as duplicates", registry=r)
        self.dead_letters = Counter(
            "streamrec_dead_letters", "Records sent to dead letters", ["reason"], registry=r
        )
        self.recommendations = Counter("streamrec_recommendations", "Recommendations published", registry=r)
        self.produce_errors = Counter(
            "streamrec_produce_errors",
            "Records the producer refused to queue (the batch is consumed again)",
            ["topic"],
            registry=r,
        )
        self.erased_users = Counter("streamrec_erased_users", "Users erased on request", registry=r)
        self.flagged_users = Counter(
            "streamrec_flagged_users",
            "Users flagged as bots (streamrec/abuse.py), by reason; again if their batch is consumed again",
            ["reason"],
            registry=r,
        )
        self.producer_restarts = Counter(
            "streamrec_producer_restarts",
            "Event-stage producers replaced after a failure they cannot recover from (fenced, fatal)",
            registry=r,
        )
        self.batches = Counter("streamrec_batches", "Micro-batches processed", registry=r)
        self.batch_seconds = Histogram(
            "streamrec_batch_seconds", "Micro-batch processing time", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.batch_phase_seconds = Counter(
            "streamrec_batch_phase_seconds",
            "Micro-batch time by phase: decode, state, recommend, produce, flush (delivery wait), commit",
            ["phase"],
            registry=r,
        )
        self.latency = Histogram(
            "streamrec_event_to_recommendation_seconds",
            "Event timestamp to recommendation publish time",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.users = Gauge("streamrec_users", "Users held in local state", registry=r)
        self.state_bytes = Gauge(
            "streamrec_state_bytes", "Bytes of the worker's RocksDB state files on disk", registry=r
        )
        self.consumer_lag = Gauge(
            "streamrec_consumer_lag",
            "Records of the event stage's partitions not yet committed by its group (STREAMREC_EVENTS_GROUP)",
            ["topic", "partition"],
            registry=r,
        )
        self.partitions = Gauge("streamrec_partitions", "Event partitions owned", registry=r)
        self.catalog_items = Gauge("streamrec_catalog_items", "Catalogue items known", registry=r)
        self.online_hit_rate = Gauge(
            "streamrec_online_hit_rate",
            "Share of clicks/purchases on an item recommended to that user",
            registry=r,
        )
        self.online_outcomes = Gauge(
            "streamrec_online_outcomes",
            "Clicks/purchases of users who had a recommendation, since the worker started, by the model "
            "version that made it and whether it held the item (outcome hit|miss; sum over workers)",
            ["model_version", "outcome"],
            registry=r,
        )
        self.online_hit_rate_by_version = Gauge(
            "streamrec_online_hit_rate_by_version",
            "This worker's hit rate of each model version since it started (streamrec_online_outcomes)",
            ["model_version"],
            registry=r,
        )
        self.canary_share = Gauge(
            "streamrec_canary_share",
            "Share of users served a canary, by its version",
            ["model_version"],
            registry=r,
        )
        self.model_info = Gauge("streamrec_model_info", "Model being served", ["model_version"], registry=r)
        self.model_updates = Counter(
            "streamrec_model_updates", "Promoted model versions this worker has taken", registry=r
        )
        self.finetune_triggers = Counter(
            "streamrec_finetune_triggers", "Fine-tuning triggers published", ["reason"], registry=r
        )
        self.gc_seconds = Counter(
            "streamrec_gc_seconds", "Time in Python's cyclic garbage collector", ["generation"], registry=r
        )
        self._gc_started = 0.0

    def watch_gc(self) -> None:
        """Count the collector's pauses: they stop every thread, the event stage included."""
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_seconds.labels(str(info["generation"])).inc(time.perf_counter() - self._gc_started)
