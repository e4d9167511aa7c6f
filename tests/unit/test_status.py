"""`streamrec status`'s arithmetic and drawing, from a real worker metrics registry; consumer lag."""

from __future__ import annotations

import math

from prometheus_client import generate_latest
from rich.console import Console

from streamrec.streams.metrics import WorkerMetrics
from streamrec.streams.ops.lag import PartitionLag, lags
from streamrec.streams.ops.status import (
    histogram_quantile,
    parse_metrics,
    render,
    trainer_state,
    worker_summary,
)


def test_histogram_quantile_interpolates_within_the_bucket_as_prometheus_does() -> None:
    buckets = [(0.1, 50.0), (0.2, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == 0.1
    assert histogram_quantile(0.99, buckets) == 0.1 + 0.1 * (99 - 50) / 50
    assert histogram_quantile(0.99, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert (
        histogram_quantile(0.99, [(0.1, 1.0), (0.5, 1.0), (math.inf, 10.0)]) == 0.5
    )  # in +Inf: highest bound


def test_a_worker_line_from_two_samples_of_its_metrics() -> None:
    metrics = WorkerMetrics()
    metrics.events.labels("click").inc(1000)
    metrics.latency.observe(0.02)
    before = parse_metrics(generate_latest(metrics.registry).decode())
    metrics.events.labels("click").inc(300)
    metrics.events.labels("purchase").inc(100)
    for _ in range(99):
        metrics.latency.observe(0.003)  # in the (0.0025, 0.005] bucket
    metrics.latency.observe(3.0)
    metrics.dead_letters.labels("undecodable").inc(2)
    metrics.consumer_lag.labels("streamrec.events", "0").set(7)
    metrics.consumer_lag.labels("streamrec.events", "1").set(5)
    after = parse_metrics(generate_latest(metrics.registry).decode())
    health = {
        "worker_id": "w1",
        "ready": True,
        "stage_alive": True,
        "partitions": [0, 1],
        "model_version": "m1",
    }

    line = worker_summary("http://w1:6066", health, before, after, seconds=2.0)
    assert line["events_per_s"] == 200.0 and line["events_total"] == 1400
    assert 2.5 < line["latency_p99_ms"] <= 5.0, "the p99 of the interval, not of the 20 ms before it"
    assert line["consumer_lag"] == 12 and line["dead_letters"] == {"undecodable": 2}
    assert line["ready"] and line["partitions"] == [0, 1]
    assert worker_summary("http://w2:6066", None, [], [], 2.0) == {"url": "http://w2:6066", "up": False}


def test_the_trainer_state_from_its_topics() -> None:
    trigger = {"reason": "new_data", "created_at": 2_000}
    assert trainer_state(None, None) == "no fine-tuning trigger yet"
    assert trainer_state(trigger, None).startswith("triggered (new_data)")
    assert trainer_state(trigger, {"promoted_at": 1_000}).startswith("triggered")
    assert trainer_state(trigger, {"promoted_at": 3_000}).startswith("idle")


def test_lag_counts_from_the_commit_or_from_the_oldest_record_held() -> None:
    found = lags(
        "g",
        {("t", 0): 90, ("t", 2): 3},
        {("t", 0): (0, 100), ("t", 1): (10, 50), ("t", 2): (20, 60)},
    )
    assert [x.lag for x in found] == [10, 40, 40]  # committed; never committed; committed before retention
    assert found[1] == PartitionLag("g", "t", 1, None, 10, 50)


def test_the_status_draws_every_section() -> None:
    status = {
        "time": "2026-12-06T10:00:00+00:00",
        "interval_s": 2.0,
        "events_per_s": 512.5,
        "workers": [
            {
                "url": "http://w1:6066",
                "up": True,
                "worker_id": "worker-1",
                "ready": True,
                "partitions": [0, 1],
                "model_version": "v1",
                "events_per_s": 512.5,
                "latency_p99_ms": 40.1,
                "consumer_lag": 12,
                "state_bytes": 5_000_000,
            },
            {"url": "http://w2:6066", "up": False},
        ],
        "dead_letters_by_reason": {"undecodable": 3, "unknown_item": 1},
        "kafka": {
            "groups": [
                {
                    "group": "streamrec-events",
                    "lag": 12,
                    "topics": {"streamrec.events": {"partitions": 4, "lag": 12}},
                }
            ],
            "dead_letter_records": 4,
            "trainer": {
                "last_trigger": {
                    "reason": "new_data",
                    "created_at": 1,
                    "worker_id": "worker-1",
                    "model_version": "v1",
                },
                "last_model_update": {"model_version": "v2", "promoted_at": 2},
                "state": "idle: the last trigger was followed by a promotion",
            },
        },
        "apis": [{"url": "http://api:8080", "ready": True, "lag": {"recs": 2}}],
    }
    console = Console(record=True, width=240)
    console.print(render(status))
    text = console.export_text()
    for expected in (
        "worker-1",
        "down",
        "streamrec-events",
        "undecodable",
        "new_data",
        "v2",
        "http://api:8080",
    ):
        assert expected in text, expected
    assert "promoted: v2" in text, "a worker serving another model than the promoted one is pointed out"
