"""The API's Prometheus metrics (served on its /metrics)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from streamrec.streams.api.view import Record, ViewBatch

REQUEST_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
DELAY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ApiMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.request_seconds = Histogram(
            "streamrec_api_request_seconds",
            "Time to answer a request, by route (in the handler: the client adds its network)",
            ["route"],
            buckets=REQUEST_BUCKETS_S,
            registry=r,
        )
        self.responses = Counter(
            "streamrec_api_responses", "Responses by route and status", ["route", "status"], registry=r
        )
        self.view_records = Counter(
            "streamrec_api_view_records", "Records read into the view, by topic", ["topic"], registry=r
        )
        self.view_skipped = Counter(
            "streamrec_api_view_skipped", "Records the view could not decode (logged)", registry=r
        )
        self.view_delay = Histogram(
            "streamrec_api_view_delay_seconds",
            "From a recommendation's write to the topic (its timestamp) to its arrival in the view",
            buckets=DELAY_BUCKETS_S,
            registry=r,
        )
        self.view_slice = Histogram(
            "streamrec_api_view_slice_seconds",
            "Time the event loop spent applying one slice of records to the view: the most a request "
            "arriving meanwhile waits for it",
            buckets=REQUEST_BUCKETS_S,
            registry=r,
        )
        self.view_lag = Gauge(
            "streamrec_api_view_lag",
            "Records on the topics not yet in the view, by topic",
            ["topic"],
            registry=r,
        )
        self.ready = Gauge(
            "streamrec_api_ready", "1 once the view has read every partition to its end", registry=r
        )

    def applied(self, records: Sequence[Record], batch: ViewBatch, delays: bool = True) -> None:
        by_topic: dict[str, int] = {}
        for record in records:
            by_topic[record.topic] = by_topic.get(record.topic, 0) + 1
        for topic, n in by_topic.items():
            self.view_records.labels(topic).inc(n)
        if batch.skipped:
            self.view_skipped.inc(batch.skipped)
        for delay_ms in batch.delays_ms if delays else ():
            self.view_delay.observe(max(0, delay_ms) / 1000)
