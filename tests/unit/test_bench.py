"""The benchmark's pure pieces: percentiles, the sustained rate, metric and profile parsing."""

from __future__ import annotations

import subprocess
import sys
import time

from streamrec.models.data import PAD
from streamrec.models.train import DataShape, TrainConfig, recipe
from streamrec.sample import sample_catalog
from streamrec.streams.bench import (
    PRODUCTION_ATTRIBUTES,
    PRODUCTION_ATTRIBUTES_PER_ITEM,
    PRODUCTION_ITEMS,
    CpuSampler,
    batch_breakdown,
    cpu_cores,
    cpu_us_per_event,
    metric_total,
    over_time,
    partitions_spread,
    production_shape_data,
    profile_summary,
    ratio_to_ceiling,
    summarize,
    sustained_rate,
    worst_latencies,
)


def test_summarize_gives_percentiles_and_handles_an_empty_sample() -> None:
    s = summarize([float(x) for x in range(1, 101)])
    assert s["count"] == 100 and s["max"] == 100.0
    assert s["p50"] == 50.5 and s["p99"] == 99.0
    assert summarize([]) == {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}


def test_sustained_rate_leaves_out_start_up_and_the_drain() -> None:
    # 10 s of start-up with nothing done, then 1,000 events/s, then a slow tail.
    samples = [(float(t), 0.0) for t in range(10)]
    samples += [(10.0 + t, 1000.0 * t) for t in range(1, 10)]
    samples += [(20.0, 9_500.0), (30.0, 10_000.0)]
    assert sustained_rate(samples, 10_000) == 1000.0
    assert sustained_rate([(0.0, 0.0), (1.0, 10.0)], 10_000) is None


def test_metric_total_sums_the_labelled_samples_of_one_metric() -> None:
    text = """# HELP streamrec_events_total Events applied
streamrec_events_total{kind="click"} 700.0
streamrec_events_total{kind="search"} 300.0
streamrec_events_created{kind="click"} 1.7e9
streamrec_batches_total 12.0
"""
    assert metric_total(text, "streamrec_events_total") == 1000.0
    assert metric_total(text, "streamrec_batches_total") == 12.0
    assert metric_total(text, "streamrec_missing_total") == 0.0


def test_profile_summary_counts_inclusive_and_self_time_of_one_thread() -> None:
    collapsed = "\n".join(
        [
            "run (event_stage.py:10);process (event_stage.py:20);decode (serde.py:5) 30",
            "run (event_stage.py:10);process (event_stage.py:21);recommend (serving.py:9) 70",
            "other (faust.py:1) 500",
        ]
    )
    s = profile_summary(collapsed, "event_stage.py")
    assert s["samples"] == 100
    assert s["inclusive"]["process (event_stage.py)"] == 1.0
    assert s["self"] == {"recommend (serving.py)": 0.7, "decode (serde.py)": 0.3}


def test_batch_breakdown_counts_the_slow_batches_between_two_scrapes() -> None:
    def scrape(counts: dict[str, int], flush_s: float) -> str:
        lines = [f'streamrec_batch_seconds_bucket{{le="{le}"}} {n}' for le, n in counts.items()]
        lines += [
            f"streamrec_batches_total {counts['+Inf']}",
            f'streamrec_batch_phase_seconds_total{{phase="flush"}} {flush_s}',
        ]
        return "\n".join(lines)

    before = scrape({"0.01": 5, "0.025": 8, "0.05": 9, "0.5": 10, "1.0": 10, "+Inf": 10}, 0.1)
    # 20 more batches: 10 under 10 ms, 6 of 10-25 ms, 2 of 25-50 ms, 1 of 50-500 ms, 1 over 1 s
    after = scrape({"0.01": 15, "0.025": 24, "0.05": 27, "0.5": 29, "1.0": 29, "+Inf": 30}, 0.3)
    out = batch_breakdown(before, after)
    assert out["phase_ms_per_batch"] == {"flush": 10.0}
    assert out["batches_slower_than_ms"] == {"25": 4, "50": 2, "500": 1, "1000": 1}


def test_worst_latencies_place_the_slowest_events_in_the_run() -> None:
    start = 1_000_000.0
    rows = [(int(start) + 1000 * i, int(start) + 1000 * i + 10, start + 1000 * i + 20.0) for i in range(10)]
    rows[7] = (int(start) + 7000, int(start) + 7000 + 520, start + 7000 + 530.0)
    worst = worst_latencies(rows, start, n=2)
    assert worst[0] == {"at_s": 7.0, "to_publish_ms": 520.0, "to_arrival_ms": 530.0}
    assert worst[1]["to_publish_ms"] == 10.0


def test_partitions_are_spread_when_every_worker_holds_some_and_each_is_held_once() -> None:
    assert partitions_spread([[0, 1], [2, 3]], 4)
    assert partitions_spread([[3], [0, 2], [1]], 4)
    assert not partitions_spread([[0, 1, 2, 3], []], 4)  # the second worker has not joined yet
    assert not partitions_spread([[0, 1], [1, 2, 3]], 4)  # a rebalance half done: 1 held twice
    assert not partitions_spread([[0], [2, 3]], 4)  # 1 held by nobody


def test_cpu_cores_is_the_mean_use_of_each_role_between_the_samples_around_a_window() -> None:
    samples = [
        (0.0, {10: ("broker", 1.0), 20: ("worker", 5.0)}),
        (1000.0, {10: ("broker", 1.5), 20: ("worker", 5.2)}),
        (2000.0, {10: ("broker", 2.5), 20: ("worker", 5.4)}),
        (3000.0, {10: ("broker", 2.6), 20: ("worker", 5.6)}),
    ]
    # 1,000-2,000 ms: the broker used 1.0 s and the worker 0.2 s in one second
    assert cpu_cores(samples, 1000, 2000) == {"broker": 1.0, "worker": 0.2}
    # a window between samples widens to the samples around it: 1,000-3,000 ms
    assert cpu_cores(samples, 1500, 2500) == {"broker": 0.55, "worker": 0.2}
    assert cpu_cores(samples[:1], 0, 1000) == {}


def test_cpu_cores_leaves_out_a_process_that_was_not_running_at_both_ends() -> None:
    samples = [
        (0.0, {10: ("broker", 1.0), 30: ("ranking_process", 4.0)}),
        (1000.0, {10: ("broker", 1.5), 31: ("ranking_process", 0.3)}),  # restarted: a new pid
    ]
    assert cpu_cores(samples, 0, 1000) == {"broker": 0.5}


def test_over_time_splits_a_load_into_spans_with_their_tail_and_cpu() -> None:
    start = 10_000.0
    sent = [start + t for t in range(0, 2000, 10)]
    publish = [5.0 if t < start + 1000 else 50.0 for t in sent]  # the first half fast, the second slow
    arrival = [9.0 if t < start + 1000 else 80.0 for t in sent]
    samples = [(start, {1: ("broker", 0.0)}), (start + 1000, {1: ("broker", 0.2)})]
    samples.append((start + 2000, {1: ("broker", 1.2)}))
    latencies = {"to_publish_ms": publish, "to_arrival_ms": arrival}
    halves = over_time(sent, latencies, samples, start, start + 2000, parts=2)
    assert halves == [
        {
            "from_s": 0.0,
            "to_s": 1.0,
            "records": 100,
            "to_publish_ms_p99": 5.0,
            "to_arrival_ms_p99": 9.0,
            "cpu_cores": {"broker": 0.2},
        },
        {
            "from_s": 1.0,
            "to_s": 2.0,
            "records": 100,
            "to_publish_ms_p99": 50.0,
            "to_arrival_ms_p99": 80.0,
            "cpu_cores": {"broker": 1.0},
        },
    ]


def test_the_cpu_sampler_tells_a_busy_process_from_an_idle_one() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.5)  # both started: the idle one's start-up is not in the window
    try:
        with CpuSampler(lambda: {"busy": [busy.pid], "idle": [idle.pid]}, interval_s=0.05) as cpu:
            start = time.time() * 1000
            time.sleep(1.0)
            cores = cpu.cores(start, time.time() * 1000)
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
    assert cores["busy"] > 0.4  # one core, on a shared 2-core machine
    assert cores.get("idle", 0.0) < 0.1


def test_a_rate_is_a_share_of_the_ceiling_and_none_when_either_was_not_measured() -> None:
    assert ratio_to_ceiling(25_000.0, 100_000.0) == 0.25
    assert ratio_to_ceiling(None, 100_000.0) is None  # backlog too short for a sustained rate
    assert ratio_to_ceiling(25_000.0, None) is None


def test_cpu_per_event_is_each_roles_cpu_time_over_the_events_processed() -> None:
    # 0.95 cores for 12 s over 300,000 events: 38 us of the worker's CPU per event
    per_event = cpu_us_per_event({"worker": 0.95, "ranking_process": 0.4}, seconds=12.0, events=300_000)
    assert per_event == {"worker": 38.0, "ranking_process": 16.0}
    assert cpu_us_per_event({"worker": 1.0}, seconds=12.0, events=0) == {}  # nothing processed: no figure


def test_the_bench_measures_a_model_of_the_beauty_models_shape_by_default() -> None:
    """The production-shape data has the trained Beauty model's catalogue and attribute vocabulary, and the
    default recipe gives it that model's architecture: the bench's default figures are that model's cost."""
    data = production_shape_data(seed=3, users=500, events=5_000)
    assert data.num_items == PRODUCTION_ITEMS
    assert data.num_attributes == PRODUCTION_ATTRIBUTES
    assert max(len(a) for a in data.attributes.values()) == PRODUCTION_ATTRIBUTES_PER_ITEM
    assert set(data.attributes) == set(data.item_ids) == set(data.catalog)
    # the bench browses the model's own catalogue, never the sample one (bench_catalog tells them by id)
    assert not {item.item_id for item in sample_catalog()} & set(data.item_ids)
    steps = [s for seq in data.sequences.values() for s in seq]
    assert len(steps) == 5_000 and {s.query is not None for s in steps if s.item == PAD} == {True}
    assert all(1 <= s.item <= data.num_items for s in steps if s.item != PAD)

    shaping = ("dim", "layers", "heads", "max_len", "negatives", "gated", "ff")
    chosen = TrainConfig.for_data(data, text="none", epochs=1)
    # Amazon Beauty: 12,101 items, median history 6, no repeats (docs/quality.md's recipe table)
    beauty = TrainConfig.preset("full", **recipe(DataShape(12_101, 6.0, 0.0), bf16_native=False))
    assert {k: getattr(chosen, k) for k in shaping} == {k: getattr(beauty, k) for k in shaping}
