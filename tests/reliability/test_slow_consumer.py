"""A slow consumer: clicks arrive faster than one worker ranks them, then slower. Its memory stays flat
(the consumer's prefetch, the producer's queue and the state cache are bounded by settings), each batch
coalesces a user's events into one recommendation, and the backlog shrinks once the load drops; every event
is applied in the end. benchmarks/reliability.py `soak` runs the same for 10 minutes and prints the
figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.reliability import SteadyLoad, rig, soak, users_of, worker_counts
from tests.conftest import wait_for

pytestmark = pytest.mark.reliability

HIGH_RATE = 20_000.0  # clicks/s: above what one worker applies on 2 shared cores (docs/reliability.md)
LOW_RATE = 100.0


def test_an_overloaded_worker_keeps_its_memory_coalesces_users_and_catches_up(
    model_registry: Path, tmp_path: Path
) -> None:
    with rig(model_registry, tmp_path) as r:
        # 2,000 users: 10 clicks/s each, under the per-user rate limit
        load = SteadyLoad(r.producer, users_of("shopper", 2000), r.items, HIGH_RATE, raw=True)
        figures = soak(r, load, minutes=1.0, high_rate=HIGH_RATE, low_rate=LOW_RATE)
        samples = figures["samples"]
        assert figures["backlog_at_peak"] > 20_000, f"not overloaded: {figures['backlog_at_peak']}"
        assert figures["events_per_recommendation"] > 2, "a user's events in one batch: one recommendation"
        low, high = figures["rss_mb_second_half_of_overload_min_max"]
        assert high < low * 1.25, f"memory grew under the overload: {low} -> {high} MB"
        assert max(s["rss_mb"] for s in samples) < 1500
        assert figures["backlog_at_end"] < figures["backlog_at_peak"] / 10, (
            "the backlog drains at the low rate"
        )
        load.drain()
        worker = r.alive()[0]
        wait_for(
            lambda: worker_counts(worker).get("streamrec_events_total", 0) >= load.total,
            120,
            what="the backlog applied",
        )
        assert worker_counts(worker)["streamrec_events_total"] == load.total, "each event applied once"
