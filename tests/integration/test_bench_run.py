"""`streamrec bench` end to end, kept short: its own embedded broker, a real worker process with its ranking
process, a backlog, one fixed load and saturation. Figures are not asserted (the machine is shared); what
an operator reads from the JSON is: that every part ran, that the figures are consistent with each other,
and which process used the cores."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from streamrec.settings import Settings
from streamrec.streams.bench import BenchConfig, run_bench

# slow: a minute of a 2-core machine for an operator's tool; `make test-slow` runs it, `make test` does not
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_short_bench_run_reports_every_part_and_the_cores_each_process_used(
    model_registry: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    config = BenchConfig(
        parts=("ceiling", "throughput", "latency"),
        events=30_000,  # long enough for the rate between 10% and 90% done
        users=500,
        loads=(200.0,),
        load_seconds=3.0,
        profile=False,
        out_dir=out,
    )
    settings = Settings(model_registry=model_registry, data_dir=tmp_path / "unused", web_enabled=False)
    result = run_bench(settings, config, Console(file=io.StringIO()))

    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "latency.png").stat().st_size > 0

    throughput, ceiling = result["throughput"], result["ceiling"]
    assert throughput["events"] == 30_000 and ceiling["events"] == 30_000
    assert 0 < throughput["ratio_to_ceiling"] < 1  # over 1 where the ceiling timed its own wait (round 12)
    # the worker did the work, with a ranking process beside it (the default); the broker was sampled too
    assert throughput["cpu_cores"]["worker"] > 0.1
    assert {"broker", "ranking_process", "bench"} <= set(throughput["cpu_cores"])
    # the worker's CPU per event: a Python worker spends microseconds to milliseconds on one, never nothing
    assert 1 < throughput["cpu_us_per_event"]["worker"] < 10_000

    fixed, saturation = result["latency"]
    assert (fixed["offered_per_s"], fixed["saturation"], saturation["saturation"]) == (200.0, False, True)
    assert fixed["recommendations"] > 0
    publish, arrival = fixed["to_publish_ms"], fixed["to_arrival_ms"]
    assert publish["count"] == arrival["count"] == fixed["recommendations"]
    assert 0 <= publish["p50"] <= arrival["p50"]  # a recommendation arrives after it is published
    assert fixed["cpu_cores"]["broker"] > 0  # the broker served the load
    spans = fixed["over_time"]
    assert len(spans) == 4 and sum(s["records"] for s in spans) == fixed["recommendations"]
    assert all(set(s["cpu_cores"]) >= {"broker", "worker"} for s in spans)
    round_trip = fixed["broker_round_trip"]
    assert round_trip["received"] == round_trip["sent"] > 0
    assert sum(s["records"] for s in round_trip["over_time"]) == round_trip["received"]
    assert saturation["broker_round_trip"] is None

    memory = result["worker_memory"]
    assert memory["peak_rss_mb"] > 0 and memory["children_peak_rss_mb"] > 0
