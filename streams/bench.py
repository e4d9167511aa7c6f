"""`streamrec bench`: the performance harness. One run on the embedded broker prints one JSON object.

Parts: the raw consume ceiling, the worker's sustained throughput on a backlog, event-to-recommendation
latency at fixed offered loads and at saturation, worker memory and RocksDB bytes per user, and the
models' serving cost (encoder and recommend() by batch size, the item index by catalogue size and index kind).
Timings are reported, never asserted: the machine is shared, so the JSON carries its load.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console

from streamrec import native
from streamrec.records import CatalogItem, HistoryEntry, UserState
from streamrec.sample import ShopperSimulator, sample_catalog
from streamrec.serde import AvroCodec, DecodeError
from streamrec.settings import Settings
from streamrec.state import StateLimits, apply_event, encode_state
from streamrec.streams.broker import EmbeddedBroker
from streamrec.streams.client import EventProducer, reader_config
from streamrec.streams.event_stage import fetch_config
from streamrec.streams.kafka_security import client_config, on_embedded_broker
from streamrec.streams.process import WorkerProcess
from streamrec.streams.reading import ReadToEnd, consume_arrived
from streamrec.streams.simulate import publish_catalog, simulate
from streamrec.streams.state_store import PartitionStore
from streamrec.streams.topics import create_topics

if TYPE_CHECKING:
    from streamrec.models.data import Interactions

# The shape of the model `streamrec train --data ../shared/data/amazon-beauty` makes by default (its item
# count, attribute vocabulary and attributes per item; 128 dims and 2 layers come from the default recipe):
# what the bench measures unless told otherwise, so that its figures describe a shop's model (issue 30).
PRODUCTION_ITEMS = 12_101
PRODUCTION_ATTRIBUTES = 637
PRODUCTION_ATTRIBUTES_PER_ITEM = 6
MODELS = ("production", "sample")
PARTS = ("ceiling", "throughput", "latency", "group", "memory", "models", "index")
BROKER_PARTS = {"ceiling", "throughput", "latency", "group"}


@dataclass
class BenchConfig:
    parts: tuple[str, ...] = PARTS
    events: int = 100_000  # backlog for the throughput run
    users: int = 10_000  # simulated shoppers in the broker parts
    group_workers: int = 2  # worker processes in one consumer group, for the group part
    loads: tuple[float, ...] = (100.0, 1_000.0, 5_000.0)
    load_seconds: float = 10.0
    state_users: tuple[int, ...] = (10_000, 100_000)
    index_items: tuple[int, ...] = (10_000, 100_000)
    batch_sizes: tuple[int, ...] = (1, 10, 100, 1_000, 2_000)
    profile: bool = True
    out_dir: Path = Path("var/bench")
    # without a configured registry: "production", a model of the shape `streamrec train` makes on Amazon
    # Beauty (ensure_production_model), or "sample", the demo's
    model: str = "production"

    @classmethod
    def full(cls, **overrides: Any) -> BenchConfig:
        sizes = dict(
            events=500_000,
            users=100_000,
            load_seconds=30.0,
            state_users=(10_000, 100_000, 1_000_000),
            index_items=(10_000, 100_000, 1_000_000),
        )
        return cls(**{**sizes, **overrides})  # type: ignore[arg-type]


# --- pure helpers ------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, p50, p95, p99 and max of a sample, rounded to 0.1 (None when empty)."""
    if len(values) == 0:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {
        "count": int(arr.size),
        "p50": round(float(p50), 1),
        "p95": round(float(p95), 1),
        "p99": round(float(p99), 1),
        "max": round(float(arr.max()), 1),
    }


def sustained_rate(
    samples: Sequence[tuple[float, float]], total: float, low: float = 0.1, high: float = 0.9
) -> float | None:
    """Rate between the samples where ``low`` and ``high`` shares of ``total`` were first reached.

    ``samples`` are (seconds, count so far), in time order; start-up and the drain at the end are left out.
    """
    start = next(((t, n) for t, n in samples if n >= low * total), None)
    end = next(((t, n) for t, n in samples if n >= high * total), None)
    if start is None or end is None or end[0] <= start[0]:
        return None
    return (end[1] - start[1]) / (end[0] - start[0])


def ratio_to_ceiling(rate: float | None, ceiling: float | None) -> float | None:
    """A rate as a share of the raw consume ceiling of the same run; None when either was not measured
    (a backlog too short for the 10%-90% window), never a 0 that reads as a result."""
    if not rate or not ceiling:
        return None
    return round(rate / ceiling, 4)


def cpu_us_per_event(cores: dict[str, float], seconds: float, events: float) -> dict[str, float]:
    """Each role's CPU per event processed, in microseconds: its mean cores over a run of ``seconds`` that
    processed ``events``. Steadier than events/s on a shared machine: a run slowed by a neighbour takes longer
    but not more of the worker's CPU per event."""
    if events <= 0 or seconds <= 0:
        return {}
    return {role: round(c * seconds / events * 1e6, 1) for role, c in cores.items()}


def partitions_spread(held: Sequence[Sequence[int]], partitions: int) -> bool:
    """Whether every worker holds partitions and together they hold each of ``partitions`` exactly once."""
    return all(held) and sorted(p for ps in held for p in ps) == list(range(partitions))


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def metric_total(text: str, name: str) -> float:
    """Sum of every labelled sample of one Prometheus metric in an exposition text."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group("name") == name:
            total += float(m.group("value"))
    return total


def metric_by_label(text: str, name: str) -> dict[str, float]:
    """One Prometheus metric's samples by their (single) label value, e.g. phase="flush" -> flush."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group("name") == name and m.group("labels"):
            label = m.group("labels").split("=", 1)[1].strip('"')
            out[label] = out.get(label, 0.0) + float(m.group("value"))
    return out


def batch_breakdown(before: str, after: str) -> dict[str, Any]:
    """Milliseconds per micro-batch by phase, and garbage-collector seconds, between two metric texts."""
    batches = metric_total(after, "streamrec_batches_total") - metric_total(before, "streamrec_batches_total")
    phases_before = metric_by_label(before, "streamrec_batch_phase_seconds_total")
    phases = {
        p: round((v - phases_before.get(p, 0.0)) / batches * 1000, 2) if batches else None
        for p, v in metric_by_label(after, "streamrec_batch_phase_seconds_total").items()
    }
    gc_before = metric_by_label(before, "streamrec_gc_seconds_total")
    gc_after = metric_by_label(after, "streamrec_gc_seconds_total")
    # The tail that means hide: how many batches took longer than each histogram bound from 25 ms up.
    buckets_before = metric_by_label(before, "streamrec_batch_seconds_bucket")
    buckets_after = metric_by_label(after, "streamrec_batch_seconds_bucket")
    slower = {
        f"{float(le) * 1000:g}": int(batches - (n - buckets_before.get(le, 0.0)))
        for le, n in buckets_after.items()
        if le != "+Inf" and float(le) >= 0.025
    }
    return {
        "phase_ms_per_batch": phases,
        "batches_slower_than_ms": slower,
        "gc_seconds_by_generation": {g: round(v - gc_before.get(g, 0.0), 3) for g, v in gc_after.items()},
    }


def worst_latencies(
    rows: Sequence[tuple[int, int, float]], start_ms: float, n: int = 5
) -> list[dict[str, float]]:
    """The n slowest recommendations to publish: when their event came (seconds into the load), and both
    latencies, so a stall can be placed (start-up, periodic, or spread)."""
    slowest = sorted(rows, key=lambda r: r[1] - r[0], reverse=True)[:n]
    return [
        {
            "at_s": round((e - start_ms) / 1000, 2),
            "to_publish_ms": float(p - e),
            "to_arrival_ms": round(a - e, 1),
        }
        for e, p, a in slowest
    ]


def profile_summary(collapsed: str, must_contain: str, top: int = 15) -> dict[str, Any]:
    """Shares of samples per function from py-spy's raw (collapsed) output, for the stacks of one thread.

    ``inclusive`` counts a sample for every function on its stack, ``self`` for the innermost one only.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if must_contain not in stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    share = lambda c: round(c / total, 3) if total else 0.0  # noqa: E731
    return {
        "samples": total,
        "inclusive": {f: share(c) for f, c in inclusive.most_common(top)},
        "self": {f: share(c) for f, c in own.most_common(top)},
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def process_memory_mb(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, in MB, and the same summed over its
    child processes (the ranking process with ``STREAMREC_RANKING_PROCESS``), each counted at its own peak."""
    out = _memory_mb(pid)
    children = [_memory_mb(child) for child in child_pids(pid)]
    if children:
        for key in ("rss_mb", "peak_rss_mb"):
            out[f"children_{key}"] = round(sum(c.get(key, 0.0) for c in children), 1)
    return out


def _memory_mb(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # exited meanwhile
        return out
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = round(int(value.split()[0]) / 1024, 1)
    return out


def child_pids(pid: int) -> list[int]:
    """The processes a process started that still run (Linux /proc, every thread's children)."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in children.read_text().split()]
    return sorted(set(found))


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process, all its threads, in seconds (Linux /proc); None once it
    has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


CpuSample = tuple[float, dict[int, tuple[str, float]]]  # epoch ms, pid -> (role, CPU seconds so far)


def cpu_cores(samples: Sequence[CpuSample], start_ms: float, end_ms: float) -> dict[str, float]:
    """Mean cores each role used between two times: from the last sample at or before ``start_ms`` to the
    first at or after ``end_ms`` (the nearest ones inside where none lies outside). A process counts only
    while it ran in both samples, so one restarted between them is left out, not counted twice."""
    if len(samples) < 2:
        return {}
    first = max((s for s in samples if s[0] <= start_ms), default=samples[0], key=lambda s: s[0])
    last = min((s for s in samples if s[0] >= end_ms), default=samples[-1], key=lambda s: s[0])
    seconds = (last[0] - first[0]) / 1000
    if seconds <= 0:
        return {}
    used: dict[str, float] = {}
    for pid, (role, cpu) in last[1].items():
        before = first[1].get(pid)
        if before is not None and before[0] == role:
            used[role] = used.get(role, 0.0) + cpu - before[1]
    return {role: round(cpu / seconds, 2) for role, cpu in sorted(used.items())}


def bench_roles(broker_pid: int, worker_pid: int) -> dict[str, list[int]]:
    """The processes of a broker bench by role: the embedded broker, the worker, the worker's children (its
    ranking process) and this process (the load generator, the follower and the round-trip clients)."""
    return {
        "broker": [broker_pid],
        "worker": [worker_pid],
        "ranking_process": child_pids(worker_pid),
        "bench": [os.getpid()],
    }


class CpuSampler:
    """Samples, on a thread, the CPU time of the processes behind a run: ``roles`` names the pids of each
    role (called at every sample, so a restarted process is followed). On a 2-core machine the embedded
    broker, the worker, its ranking process and the load generator share the cores: which of them used
    how much places a latency tail."""

    def __init__(self, roles: Callable[[], dict[str, list[int]]], interval_s: float = 0.25) -> None:
        self.roles = roles
        self.interval_s = interval_s
        self.samples: list[CpuSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        taken: dict[int, tuple[str, float]] = {}
        for role, pids in self.roles().items():
            for pid in pids:
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    taken[pid] = (role, cpu)
        self.samples.append((time.time() * 1000, taken))

    def cores(self, start_ms: float, end_ms: float) -> dict[str, float]:
        self._sample()  # the window's end is covered even when it just passed
        return cpu_cores(self.samples, start_ms, end_ms)


def over_time(
    sent_ms: Sequence[float],
    latencies: Mapping[str, Sequence[float]],
    samples: Sequence[CpuSample],
    start_ms: float,
    end_ms: float,
    parts: int = 4,
) -> list[dict[str, Any]]:
    """The p99 of each latency (``latencies[name][i]`` is record i's, sent at ``sent_ms[i]``) over the
    records sent in each of ``parts`` equal spans of a load, beside the cores each process used in that
    span. A tail that grows through a load while the broker's share grows is the broker's (its in-memory
    store costs more per fetch as it fills: docs/performance.md, "Round 12"); one that comes with the worker's
    share is the worker's."""
    span = (end_ms - start_ms) / parts
    out = []
    for i in range(parts):
        lo = start_ms + i * span
        hi = end_ms if i == parts - 1 else start_ms + (i + 1) * span  # no record lost to rounding
        inside = [j for j, t in enumerate(sent_ms) if lo <= t < hi]
        row: dict[str, Any] = {
            "from_s": round(i * span / 1000, 1),
            "to_s": round((i + 1) * span / 1000, 1),
            "records": len(inside),
        }
        for name, values in latencies.items():
            row[f"{name}_p99"] = summarize([values[j] for j in inside])["p99"]
        out.append(row | {"cpu_cores": cpu_cores(samples, lo, hi)})
    return out


# --- the broker's own round trip ----------------------------------------------------------------------------

ROUND_TRIP_TOPIC = "streamrec.bench-round-trip"


def broker_round_trip(
    settings: Settings,
    rate: float,
    seconds: float,
    payload_bytes: int = 140,
    cpu: CpuSampler | None = None,
    topic: str = ROUND_TRIP_TOPIC,
    parts: int = 4,
) -> dict[str, Any]:
    """Producer to broker to consumer, nothing else, at ``rate`` records/s: the floor under the worker's
    event-to-recommendation latency at that load. The clients are configured as a web backend's
    EventProducer and as the event stage's consumer (group member, same fetch wait and queue); records are
    the size of an event. Latency: consumer's receive time minus the producer's clock at send."""
    admin = AdminClient(client_config(settings))
    if topic not in admin.list_topics(timeout=10).topics:
        new_topic = NewTopic(topic, settings.partitions, settings.replication_factor)
        admin.create_topics([new_topic])[topic].result(timeout=15)
    producer = Producer(
        {
            **client_config(settings),
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "compression.type": settings.internal_compression,
            "linger.ms": 5,
        }
    )
    consumer = Consumer(
        fetch_config(settings)
        | {
            "group.id": f"{topic}-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "latest",
        }
    )
    received: list[tuple[float, float]] = []  # (sent, received), epoch ms
    stop = threading.Event()
    assigned = threading.Event()

    def consume() -> None:
        consumer.subscribe([topic], on_assign=lambda c, ps: assigned.set())
        while not stop.is_set():
            for msg in consume_arrived(consumer, 500, timeout_s=0.1):  # as the follower
                value = msg.value()
                if msg.error() is None and value is not None and len(value) == payload_bytes:
                    received.append((struct.unpack_from("<d", value)[0], time.time() * 1000))

    follower = threading.Thread(target=consume, name="round-trip", daemon=True)
    follower.start()
    try:
        assigned.wait(timeout=30)
        time.sleep(0.5)  # positions fetched: nothing sent below is missed
        padding = bytes(payload_bytes - 8)
        sent, started = 0, time.monotonic()
        start_ms = time.time() * 1000
        while (elapsed := time.monotonic() - started) < seconds:
            for _ in range(max(0, min(int(elapsed * rate) + 1 - sent, 5000))):
                key = f"user-{sent % 10_000:06d}".encode()
                producer.produce(topic, struct.pack("<d", time.time() * 1000) + padding, key=key)
                sent += 1
            producer.poll(0)
            time.sleep(0.002)
        producer.flush(10)
        deadline = time.monotonic() + 5
        while len(received) < sent and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        follower.join(timeout=5)
        consumer.close()
    end_ms = time.time() * 1000
    slowest = sorted(received, key=lambda row: row[1] - row[0], reverse=True)[:5]
    round_trips = [r - s for s, r in received]
    out = {
        "offered_per_s": round(rate, 1),
        "sent": sent,
        "received": len(received),
        "round_trip_ms": summarize(round_trips),
        "slowest": [
            {"at_s": round((s - start_ms) / 1000, 2), "round_trip_ms": round(r - s, 1)} for s, r in slowest
        ],
    }
    if cpu is not None:
        out["cpu_cores"] = cpu.cores(start_ms, end_ms)
        sent_ms = [s for s, _ in received]
        latencies = {"round_trip_ms": round_trips}
        out["over_time"] = over_time(sent_ms, latencies, cpu.samples, start_ms, end_ms, parts)
    return out


# --- recommendations as they arrive ---------------------------------------------------------------------


@dataclass
class Arrivals:
    """(event time, publish time, arrival time) in epoch ms of every recommendation read."""

    rows: list[tuple[int, int, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def between(self, start_ms: float, end_ms: float) -> list[tuple[int, int, float]]:
        with self.lock:
            return [r for r in self.rows if start_ms <= r[0] < end_ms]

    def __len__(self) -> int:
        return len(self.rows)


def follow_recommendations(settings: Settings, arrivals: Arrivals, stop: threading.Event) -> None:
    """Read the recommendations topic from about its end (assign(): no group join), configured and taking
    records as ``RecommendationConsumer`` does: arrival is at the reader a recommendation consumer uses."""
    codec = AvroCodec()
    consumer = Consumer(reader_config(settings, None, from_beginning=False))  # as RecommendationConsumer's
    topic = settings.recommendations_topic
    positions = []
    for p in range(settings.partitions):
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        positions.append(TopicPartition(topic, p, max(0, high - 1)))  # a few old ones: filtered by time
    consumer.assign(positions)
    try:
        while not stop.is_set():
            # what has arrived, as RecommendationConsumer.poll takes it: consume(n, timeout) would hold
            # records until n arrive or the timeout passes, and add that to every arrival time
            msgs = consume_arrived(consumer, 500, timeout_s=0.1)
            arrived = time.time() * 1000
            rows = []
            for msg in msgs:
                value = msg.value()
                if msg.error() or value is None:
                    continue
                try:
                    _, record = codec.decode(value, accept={"Recommendation"})
                except DecodeError:
                    continue
                rows.append((record["event_time"], record["publish_time"], arrived))
            with arrivals.lock:
                arrivals.rows.extend(rows)
    finally:
        consumer.close()


# --- the broker parts ------------------------------------------------------------------------------------


class BrokerBench:
    """Embedded broker, one worker process, a backlog, then fixed offered loads."""

    def __init__(
        self, settings: Settings, config: BenchConfig, console: Console, catalog: list[CatalogItem]
    ) -> None:
        self.settings = settings
        self.config = config
        self.console = console
        self.catalog = catalog  # what the shoppers browse (``bench_catalog``)
        self.results: dict[str, Any] = {}
        self.rss_samples: list[dict[str, float]] = []

    def run(self, model_registry: Path) -> dict[str, Any]:
        cfg = self.config
        workdir = cfg.out_dir
        shutil.rmtree(workdir / "workers", ignore_errors=True)
        with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
            settings = on_embedded_broker(self.settings, broker.bootstrap).model_copy(
                update={"model_registry": model_registry, "data_dir": workdir / "workers"}
            )
            create_topics(settings)
            with EventProducer(settings) as producer:
                publish_catalog(producer, self.catalog)
            # A shop's catalogue is in before its traffic: the worker starts, takes the whole catalogue
            # (12,000 records of a real one take faust's catalogue agent seconds), and is paused (SIGSTOP; a
            # session timeout the pause stays within) while the backlog is produced. The catalogue check
            # is off: the bench's shoppers browse the catalogue the model knows.
            worker = WorkerProcess(
                settings.model_copy(update={"reject_unknown_items": False, "session_timeout_ms": 60_000}),
                settings.data_dir / "worker-0",
                "worker-0",
                workdir / "worker-0.log",
            )
            try:
                worker.start().wait_ready(timeout_s=180)
                worker.wait_catalog(len(self.catalog), timeout_s=180)
                backlog = 0
                if "throughput" in cfg.parts or "ceiling" in cfg.parts:
                    assert worker.process is not None
                    worker.process.send_signal(signal.SIGSTOP)
                    try:
                        backlog = self._preload(settings, settings.seed)
                    finally:
                        worker.process.send_signal(signal.SIGCONT)
                assert worker.pid is not None and broker.process is not None
                roles = partial(bench_roles, broker.process.pid, worker.pid)
                with CpuSampler(roles) as cpu:
                    self._worker_parts(settings, worker, backlog, cpu)
            finally:
                worker.stop()
            if "group" in cfg.parts:
                self.results["group"] = self._group(settings)
                if "ceiling" in self.results:
                    self.results["group"]["ratio_to_ceiling"] = ratio_to_ceiling(
                        self.results["group"]["events_per_s"], self.results["ceiling"]["events_per_s"]
                    )
        return self.results

    def _worker_parts(self, settings: Settings, worker: WorkerProcess, backlog: int, cpu: CpuSampler) -> None:
        """The parts that need the one worker: throughput, ceiling, latency and its memory."""
        cfg = self.config
        assert worker.pid is not None
        if "throughput" in cfg.parts:
            self.results["throughput"] = self._throughput(worker, backlog, cpu)
        else:
            self._wait_processed(worker, backlog, timeout_s=600)
        if "ceiling" in cfg.parts:
            self.results["ceiling"] = self._ceiling(settings, backlog)
            if "throughput" in self.results:
                self.results["throughput"]["ratio_to_ceiling"] = ratio_to_ceiling(
                    self.results["throughput"]["events_per_s"], self.results["ceiling"]["events_per_s"]
                )
        if "latency" in cfg.parts:
            self.results["latency"] = self._latency(settings, worker, cpu)
        self.results["worker_memory"] = {
            **process_memory_mb(worker.pid),
            "samples": self.rss_samples,
        }

    def _group(self, settings: Settings) -> dict[str, Any]:
        """Throughput of group_workers worker processes in one consumer group on this machine (Kafka's
        scale-out: one process runs its event stage on about one core), on topics of their own. Once the
        partitions are spread over the workers they are paused (SIGSTOP; their session timeout is raised so
        the pause is no failure), a backlog is produced, and they are resumed: the rate is the group's
        alone, without the producer's work."""
        cfg = self.config
        workdir = cfg.out_dir
        prefix = "streamrec.bench-group"
        group = settings.model_copy(
            update={
                "events_topic": f"{prefix}.events",
                "backfill_topic": f"{prefix}.backfill",
                "state_changelog_topic": f"{prefix}.state-changelog",
                "events_group": f"{prefix}-events",
            }
        )
        create_topics(group)
        paused = group.model_copy(update={"reject_unknown_items": False, "session_timeout_ms": 60_000})
        workers = [
            WorkerProcess(paused, group.data_dir / f"group-{n}", f"group-{n}", workdir / f"group-{n}.log")
            for n in range(cfg.group_workers)
        ]
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.wait_ready(timeout_s=180)
            held = self._wait_spread(workers, group.partitions)
            self.console.print(f"group of {len(workers)} workers, partitions {held}; paused for the backlog")
            for worker in workers:
                assert worker.process is not None
                worker.process.send_signal(signal.SIGSTOP)
            preload_started = time.monotonic()
            try:
                self._preload(group, settings.seed + 1)
            finally:
                for worker in workers:
                    assert worker.process is not None
                    worker.process.send_signal(signal.SIGCONT)
            preload_s = time.monotonic() - preload_started
            load_before = load_average()
            started = time.monotonic()
            samples: list[tuple[float, float]] = []
            while time.monotonic() - started < 900:
                done = sum(self._events_done(w)[0] for w in workers)
                samples.append((time.monotonic() - started, done))
                if done >= cfg.events:
                    break
                time.sleep(0.25)
            rate = sustained_rate(samples, cfg.events)
            after = [list(w.health().get("partitions") or []) for w in workers]
            out = {
                "workers": len(workers),
                "partitions": held,
                "rebalanced_meanwhile": after != held,  # e.g. a preload longer than the session timeout
                "paused_seconds": round(preload_s, 1),
                "events": int(samples[-1][1]) if samples else 0,
                "events_per_s": round(rate, 1) if rate else None,
                "seconds": round(samples[-1][0], 2) if samples else None,
                "rss_mb": [process_memory_mb(w.pid).get("rss_mb") for w in workers if w.pid is not None],
                "load_before": load_before,
                "load_after": load_average(),
            }
            self.console.print(f"group throughput: {out['events_per_s']} events/s")
            return out
        finally:
            for worker in workers:
                worker.stop()

    @staticmethod
    def _wait_spread(
        workers: list[WorkerProcess], partitions: int, timeout_s: float = 120
    ) -> list[list[int]]:
        """Wait until every worker holds partitions and together they hold each one once."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = [list(w.health().get("partitions") or []) for w in workers]
            if partitions_spread(held, partitions):
                return held
            if time.monotonic() > deadline:
                raise RuntimeError(f"partitions not spread over the group in {timeout_s:.0f} s: {held}")
            time.sleep(0.5)

    def _preload(self, settings: Settings, seed: int) -> int:
        cfg = self.config
        self.console.print(f"preloading {cfg.events:,} events from {cfg.users:,} simulated shoppers ...")
        simulator = ShopperSimulator(self.catalog, users=cfg.users, seed=seed)
        now = time.time_ns() // 1_000_000
        with EventProducer(settings, config={"linger.ms": 50, "batch.size": 1_000_000}) as producer:
            for n in range(cfg.events):
                producer.send_event(simulator.next_event(now))
                if n % 10_000 == 0:
                    producer.poll(0)
        return cfg.events

    def _events_done(self, worker: WorkerProcess) -> tuple[float, str]:
        text = worker.metrics_text()
        done = metric_total(text, "streamrec_events_total") + metric_total(
            text, "streamrec_duplicate_events_total"
        )
        return done + metric_total(text, "streamrec_dead_letters_total"), text

    def _wait_processed(
        self, worker: WorkerProcess, total: int, timeout_s: float
    ) -> list[tuple[float, float]]:
        samples: list[tuple[float, float]] = []
        started = time.monotonic()
        last_change, last = started, -1.0
        while time.monotonic() - started < timeout_s:
            done, _ = self._events_done(worker)
            now = time.monotonic()
            samples.append((now - started, done))
            if worker.pid is not None and len(samples) % 8 == 1:
                self.rss_samples.append({"events": done, **process_memory_mb(worker.pid)})
            if done >= total:
                break
            if done != last:
                last_change, last = now, done
            elif now - last_change > 60:
                break  # stalled: report what was processed
            time.sleep(0.25)
        if worker.pid is not None:
            self.rss_samples.append({"events": samples[-1][1], **process_memory_mb(worker.pid)})
        return samples

    def _throughput(self, worker: WorkerProcess, backlog: int, cpu: CpuSampler) -> dict[str, Any]:
        self.console.print(f"worker ready; measuring throughput on the {backlog:,}-event backlog ...")
        load_before = load_average()
        metrics_before = worker.metrics_text()
        profiler = self._start_profiler(worker) if self.config.profile else None
        start_ms = time.time() * 1000
        samples = self._wait_processed(worker, backlog, timeout_s=900)
        end_ms = time.time() * 1000
        cores = cpu.cores(start_ms, end_ms)
        if profiler is not None:
            self.results["profile"] = self._finish_profiler(*profiler)
        done, text = self._events_done(worker)
        rate = sustained_rate(samples, backlog)
        batches = metric_total(text, "streamrec_batches_total")
        recs = metric_total(text, "streamrec_recommendations_total")
        batch_seconds = metric_total(text, "streamrec_batch_seconds_sum")
        out = {
            "events": int(done),
            "users": self.config.users,
            "events_per_s": round(rate, 1) if rate else None,
            "seconds": round(samples[-1][0], 2),
            "batches": int(batches),
            "mean_batch_events": round(done / batches, 1) if batches else None,
            "recommendations": int(recs),
            "recommendations_per_event": round(recs / done, 3) if done else None,
            "mean_batch_ms": round(batch_seconds / batches * 1000, 1) if batches else None,
            **batch_breakdown(metrics_before, text),
            "cpu_cores": cores,
            # the events processed while the CPU was sampled (the worker may start on the backlog before)
            "cpu_us_per_event": cpu_us_per_event(
                cores, (end_ms - start_ms) / 1000, samples[-1][1] - samples[0][1]
            ),
            "load_before": load_before,
            "load_after": load_average(),
        }
        self.console.print(f"throughput: {out['events_per_s']} events/s")
        return out

    def _start_profiler(self, worker: WorkerProcess) -> tuple[subprocess.Popen[bytes], Path] | None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            self.console.print("[yellow]py-spy not found: no profile[/]")
            return None
        path = self.config.out_dir / "profile.txt"
        proc = subprocess.Popen(
            [spy, "record", "--pid", str(worker.pid), "--format", "raw", "--rate", "50", "--idle"]
            + ["--output", str(path), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return proc, path

    def _finish_profiler(self, proc: subprocess.Popen[bytes], path: Path) -> dict[str, Any]:
        proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if not path.exists():
            return {"error": "py-spy wrote no profile"}
        summary = profile_summary(path.read_text(), "event_stage.py")
        return {"tool": "py-spy 50 Hz, --idle, event-stage thread", "raw": str(path), **summary}

    def _ceiling(self, settings: Settings, backlog: int) -> dict[str, Any]:
        """A plain consumer over the same events: no decoding, no work, no group."""
        consumer = Consumer(
            {
                **client_config(settings),
                "group.id": "streamrec-bench-ceiling",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": settings.batch_wait_ms,
            }
        )
        load_before = load_average()
        count, timed, first, last = 0, 0, None, None
        # What has arrived (consume_arrived): consume(n, timeout) would wait out its timeout for the last,
        # short batch, and that second (through round 12) was most of a 100k-event ceiling's time.
        starts = dict.fromkeys(range(settings.partitions), 0)
        events = ReadToEnd(consumer, settings.events_topic, starts, 30.0, settings.batch_size, poll_s=1.0)
        try:
            for batch in events:
                count += len(batch)
                if first is None:
                    first = time.perf_counter()  # the clock starts once a first batch is in: connecting
                else:
                    timed, last = timed + len(batch), time.perf_counter()
        finally:
            consumer.close()
        seconds = last - first if first is not None and last is not None else 0.0
        rate = timed / seconds if seconds > 0 else None
        self.console.print(f"raw consume ceiling: {rate and round(rate):,} events/s")
        return {
            "events": count,
            "events_per_s": round(rate, 1) if rate else None,
            "consumer": f"confluent-kafka, up to {settings.batch_size} records as they arrive, no decode",
            "load_before": load_before,
        }

    def _latency(self, settings: Settings, worker: WorkerProcess, cpu: CpuSampler) -> list[dict[str, Any]]:
        cfg = self.config
        arrivals = Arrivals()
        stop = threading.Event()
        follower = threading.Thread(
            target=follow_recommendations, args=(settings, arrivals, stop), name="follow", daemon=True
        )
        follower.start()
        sustained = self.results.get("throughput", {}).get("events_per_s") or 5_000.0
        offered = [(rate, False) for rate in cfg.loads] + [(max(2 * sustained, 2 * max(cfg.loads)), True)]
        out = []
        try:
            for i, (rate, saturation) in enumerate(offered):
                round_trip = None
                if not saturation:
                    self.console.print(f"broker round trip alone at {rate:,.0f} records/s ...")
                    round_trip = broker_round_trip(settings, rate, cfg.load_seconds, cpu=cpu)
                self.console.print(f"offered load {rate:,.0f} events/s for {cfg.load_seconds:.0f} s ...")
                load_before = load_average()
                before = self._batch_counters(worker)
                metrics_before = worker.metrics_text()
                start_ms = time.time() * 1000
                stats = simulate(
                    settings,
                    users=cfg.users,
                    rate=rate,
                    seconds=cfg.load_seconds,
                    with_catalog=False,
                    seed=settings.seed + 1 + i,
                    catalog=self.catalog,
                )
                end_ms = time.time() * 1000
                self._settle(arrivals)
                rows = arrivals.between(start_ms, end_ms)
                batches, batch_events, batch_seconds = (
                    a - b for a, b in zip(self._batch_counters(worker), before, strict=True)
                )
                publish = [p - e for e, p, _ in rows]
                arrival = [a - e for e, _, a in rows]
                row = {
                    "offered_per_s": round(rate, 1),
                    "saturation": saturation,
                    "achieved_per_s": round(stats.events / stats.seconds, 1) if stats.seconds else None,
                    "events": stats.events,
                    "recommendations": len(rows),
                    "to_publish_ms": summarize(publish),
                    "to_arrival_ms": summarize(arrival),
                    "slowest": worst_latencies(rows, start_ms),
                    "cpu_cores": cpu.cores(start_ms, end_ms),
                    "over_time": over_time(
                        [e for e, _, _ in rows],
                        {"to_publish_ms": publish, "to_arrival_ms": arrival},
                        cpu.samples,
                        start_ms,
                        end_ms,
                    ),
                    "broker_round_trip": round_trip,
                    "batches": int(batches),
                    "mean_batch_events": round(batch_events / batches, 1) if batches else None,
                    "mean_batch_ms": round(batch_seconds / batches * 1000, 1) if batches else None,
                    **batch_breakdown(metrics_before, worker.metrics_text()),
                    "load_before": load_before,
                    "load_after": load_average(),
                }
                self.console.print(
                    f"  p50/p99 to arrival {row['to_arrival_ms']['p50']}/{row['to_arrival_ms']['p99']} ms;"
                    f" cores used: {row['cpu_cores']}"
                )
                out.append(row)
                assert worker.pid is not None
                self.rss_samples.append({"after_load_per_s": rate, **process_memory_mb(worker.pid)})
        finally:
            stop.set()
            follower.join(timeout=5)
        return out

    def _batch_counters(self, worker: WorkerProcess) -> tuple[float, float, float]:
        """(micro-batches, events applied, seconds spent processing) so far."""
        text = worker.metrics_text()
        return (
            metric_total(text, "streamrec_batches_total"),
            metric_total(text, "streamrec_events_total"),
            metric_total(text, "streamrec_batch_seconds_sum"),
        )

    @staticmethod
    def _settle(arrivals: Arrivals, quiet_s: float = 2.0, timeout_s: float = 120.0) -> None:
        """Wait until no recommendation has arrived for ``quiet_s`` (the worker drained what was sent)."""
        deadline = time.monotonic() + timeout_s
        last, last_change = len(arrivals), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = len(arrivals)
            if now != last:
                last, last_change = now, time.monotonic()
            elif time.monotonic() - last_change > quiet_s:
                return


# --- RocksDB state size ------------------------------------------------------------------------------------


def realistic_states(
    settings: Settings, templates: int = 2_000, catalog: list[CatalogItem] | None = None
) -> list[UserState]:
    """Users with full histories (50 events by default) from the shopper simulator, browsing ``catalog``
    (default: the sample catalogue)."""
    limits = StateLimits(settings.history_length, settings.max_purchased, settings.dedupe_window)
    simulator = ShopperSimulator(catalog or sample_catalog(), users=templates, seed=settings.seed)
    states: dict[str, UserState] = {}
    now = time.time_ns() // 1_000_000
    events = templates * max(settings.history_length, settings.dedupe_window) + templates * 20
    for n in range(events):
        event = simulator.next_event(now - (events - n) * 1000)
        states[event.user_id], _ = apply_event(states.get(event.user_id), event, limits)
    return list(states.values())


def state_size(settings: Settings, user_counts: Sequence[int], workdir: Path) -> list[dict[str, Any]]:
    """Write encoded states straight into a PartitionStore (no broker) and measure bytes on disk."""
    templates = realistic_states(settings)
    rng = random.Random(settings.seed)
    out = []
    for users in user_counts:
        path = workdir / f"state-{users}"
        shutil.rmtree(path, ignore_errors=True)
        store = PartitionStore(path)
        encoded_bytes = 0
        started = time.perf_counter()
        for first in range(0, users, 10_000):
            changes = {}
            for u in range(first, min(users, first + 10_000)):
                t = templates[u % len(templates)]
                state = UserState(
                    user_id=f"user-{u:08d}",
                    history=[HistoryEntry(h.kind, h.timestamp + u, h.item_id, h.query) for h in t.history],
                    purchased=list(t.purchased),
                    seen_event_ids=[rng.getrandbits(48) - 2**47 for _ in t.seen_event_ids],
                    clicks=t.clicks,
                    searches=t.searches,
                    purchases=t.purchases,
                    last_event_id=f"{rng.getrandbits(128):032x}",
                    last_event_time=t.last_event_time + u,
                )
                value = encode_state(state)
                encoded_bytes += len(value)
                changes[state.user_id] = value
            store.write(changes, None)
        store.db.flush()
        store.db.compact_range(None, None)
        store.close()
        seconds = time.perf_counter() - started
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        sst = sum(f.stat().st_size for f in path.rglob("*.sst"))
        out.append(
            {
                "users": users,
                "history_events": len(templates[0].history),
                "encoded_bytes_per_user": round(encoded_bytes / users, 1),
                "sst_bytes_per_user": round(sst / users, 1),
                "disk_bytes_per_user": round(disk / users, 1),
                "disk_mb_per_100k_users": round(disk / users * 100_000 / 2**20, 1),
                "write_s": round(seconds, 1),
            }
        )
        shutil.rmtree(path, ignore_errors=True)
    return out


# --- the whole run ---------------------------------------------------------------------------------------


def bench_catalog(model_dir: Path, categories: int = 48) -> list[CatalogItem]:
    """The catalogue the bench's shoppers browse: the sample catalogue for a model that knows all of it (the
    demo's sample model); else the served model's own items, so that every window is one of real items:
    ids, titles and stock from the model directory, grouped into ``categories`` of items the model holds
    alike (k-means of its item vectors) and listed most popular first, so that the simulator's Zipf head is
    the data's head and a shopper browsing on goes to a similar item."""
    import faiss
    import torch

    from streamrec.models import artifacts

    sample = sample_catalog()
    art = artifacts.load(model_dir)
    ids = art.items.ids
    if {item.item_id for item in sample} <= set(ids):
        return sample
    with torch.inference_mode():
        vectors = np.ascontiguousarray(art.model.item_vectors()[1:].numpy(), dtype=np.float32)
    kmeans = faiss.Kmeans(vectors.shape[1], min(categories, len(ids)), niter=10, seed=7)
    kmeans.train(vectors)
    group = kmeans.index.search(vectors, 1)[1][:, 0]
    popularity = np.zeros(len(ids) + 1, dtype=np.float32)
    popularity[: len(art.popularity)] = art.popularity[: len(ids) + 1]  # row 0 is padding
    rng = random.Random(7)
    return [
        CatalogItem(
            item_id=ids[i],
            title=art.items.titles[i] or ids[i],
            category=f"group-{int(group[i]):02d}",
            price=round(rng.uniform(4, 250), 2),
            in_stock=art.items.in_stock[i],
            updated_at=0,
        )
        for i in np.argsort(-popularity[1:], kind="stable").tolist()
    ]


def production_shape_data(seed: int, users: int = 22_000, events: int = 200_000) -> Interactions:
    """Simulated shoppers over a catalogue of the production model's size, with item attributes as many and
    as varied as Amazon Beauty's (category, a brand, tags), the size and shape of the data that model was
    trained on (22,363 users, 198,502 events)."""
    from streamrec.models.data import PAD, Interactions, Step
    from streamrec.sample import shop_catalog

    catalog = shop_catalog(PRODUCTION_ITEMS, seed=seed)
    rng = random.Random(seed)
    categories = {c: n + 1 for n, c in enumerate(dict.fromkeys(item.category for item in catalog))}
    brands = range(len(categories) + 1, PRODUCTION_ATTRIBUTES - 28)
    tags = range(brands.stop, PRODUCTION_ATTRIBUTES + 1)
    attributes = {
        item.item_id: [categories[item.category or ""], rng.choice(brands)]
        + rng.sample(tags, k=rng.randint(0, PRODUCTION_ATTRIBUTES_PER_ITEM - 2))
        for item in catalog
    }
    index = {item.item_id: n + 1 for n, item in enumerate(catalog)}
    sequences: dict[str, list[Step]] = {}
    simulator = ShopperSimulator(catalog, users=users, seed=seed)
    for event in simulator.history(events, start_ms=0):
        steps = sequences.setdefault(event.user_id, [])
        if event.item_id is not None:
            steps.append(Step(int(event.kind), index[event.item_id]))
        else:
            steps.append(Step(int(event.kind), PAD, event.query))
    return Interactions(
        item_ids=[item.item_id for item in catalog],
        sequences=sequences,
        titles={item.item_id: item.title or item.item_id for item in catalog},
        attributes=attributes,
        catalog={item.item_id: item for item in catalog},
        source=f"streamrec bench: {users:,} simulated shoppers, {events:,} events, {len(catalog):,} items",
    )


def ensure_production_model(registry_dir: Path, seed: int, console: Console) -> Path:
    """A model of the production shape (the default recipe's width and depth over ``PRODUCTION_ITEMS`` items
    with attributes, no text tower, as the Beauty model has none), trained for one epoch on simulated
    shoppers: its weights rank the simulated traffic sensibly, and its serving cost (the encoder, the
    item index, the seen-item filter) is that of the trained Beauty model, which depends on the shape, not
    on the weights. Trained once (under a minute on 2 cores: 23 s for the epoch) and reused."""
    from streamrec.models import registry
    from streamrec.models.train import TrainConfig, train

    current = registry.current(registry_dir)
    if current is not None:
        console.print(f"model [bold]{current.name}[/] (trained earlier; `rm -r {registry_dir}` retrains)")
        return current
    data = production_shape_data(seed)
    config = TrainConfig.for_data(data, text="none", epochs=1, seed=seed)
    console.print(
        f"training the production-shape model ({config.dim} dims, {config.layers} layers, "
        f"{data.num_items:,} items) for one epoch on {len(data.sequences):,} simulated shoppers ..."
    )
    path = train(data, registry_dir=registry_dir, config=config, progress=console.is_terminal)
    registry.promote(path, registry_dir, force=True)
    console.print(f"model [bold]{path.name}[/] trained and promoted")
    return path


def _model_part(
    settings: Settings, model_dir: Path, config: BenchConfig, catalog: list[CatalogItem]
) -> dict[str, Any]:
    import torch

    from streamrec.models.encoder import EncoderConfig
    from streamrec.models.perf import encoder_timings, recommend_timings
    from streamrec.models.serving import Recommender

    recommender = Recommender.load(model_dir, device="cpu", precision=settings.serving_precision)
    if settings.serving_compile:  # served as a worker serves it
        recommender.compile_encoder()
    recommender.warm_up()
    users = realistic_states(settings, templates=500, catalog=catalog)
    result: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "served_model": {
            "dir": model_dir.name,
            "serve_len": recommender.serve_len,
            "items": recommender.num_items,
            "precision": str(recommender.precision).removeprefix("torch."),
            "encoder_compiled": recommender.encoder_compiled,
            "recommend_cpu": recommend_timings(recommender, users, config.batch_sizes),
        },
    }
    # The default recipe's encoder on short histories, untrained: what a production model costs per batch.
    full = EncoderConfig(
        num_items=PRODUCTION_ITEMS, dim=128, layers=2, heads=2, max_len=50, gated=True, ff="swiglu"
    )
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for last_only in (False, True):
            key = f"full_size_encoder_{device.type}_{'last_position' if last_only else 'all_positions'}"
            result[key] = encoder_timings(full, config.batch_sizes, (16, 50), device, last_only)
    result["cuda"] = torch.cuda.is_available()
    return result


def bench_model(settings: Settings, config: BenchConfig, console: Console) -> tuple[Settings, Path]:
    """The settings pointing at the model to measure, and that model: a configured registry's current one;
    else the bench's own, of the production shape (``config.model``), or the demo's sample model."""
    from streamrec.streams.demo import ensure_sample_model

    if "model_registry" in settings.model_fields_set:
        return settings, ensure_sample_model(settings, config.out_dir, console)
    registry_dir = config.out_dir / ("models" if config.model == "sample" else "production-models")
    settings = settings.model_copy(update={"model_registry": registry_dir})
    if config.model == "sample":
        return settings, ensure_sample_model(settings, config.out_dir, console)
    return settings, ensure_production_model(registry_dir, settings.seed, console)


def run_bench(settings: Settings, config: BenchConfig, console: Console) -> dict[str, Any]:
    config.out_dir.mkdir(parents=True, exist_ok=True)
    settings, model_dir = bench_model(settings, config, console)
    catalog = bench_catalog(model_dir)
    started = time.monotonic()
    result: dict[str, Any] = {
        "command": "streamrec bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "streamrec bench",
        "machine": {"cpu_cores": os.cpu_count(), "load_at_start": load_average()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "settings": {
            k: settings.model_dump()[k]
            for k in ("batch_size", "batch_wait_ms", "partitions", "history_length", "top_k", "device")
        },
        "model": model_dir.name,
        "catalog_items": len(catalog),
        "hot_path": native.active(),  # "compiled" (mypyc, `make install`) or "source" per module
    }
    if BROKER_PARTS & set(config.parts):
        result |= BrokerBench(settings, config, console, catalog).run(settings.model_registry)
    if "memory" in config.parts:
        console.print(f"RocksDB state size for {', '.join(f'{u:,}' for u in config.state_users)} users ...")
        result["state_size"] = state_size(settings, config.state_users, config.out_dir)
    if "models" in config.parts:
        console.print("encoder and recommend() by batch size ...")
        result["models"] = _model_part(settings, model_dir, config, catalog)
    if "index" in config.parts:
        from streamrec.models.perf import index_timings

        console.print(f"item index by catalogue size {config.index_items} ...")
        result["index"] = index_timings(config.index_items, ("flat", "ivf", "hnsw"), (1, 100, 2_000))
    result["machine"]["load_at_end"] = load_average()
    result["seconds"] = round(time.monotonic() - started, 1)
    (config.out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    if result.get("latency"):
        write_plot(result["latency"], config.out_dir / "latency.png")
    return result


def write_plot(latency: list[dict[str, Any]], path: Path) -> None:
    """Latency percentiles (to arrival at a consumer) against offered load, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in latency if r["to_arrival_ms"]["count"]]
    if not rows:
        return
    x = [r["achieved_per_s"] or r["offered_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for pct, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^-")):
        ax.plot(x, [r["to_arrival_ms"][pct] for r in rows], style, label=f"{pct} event to arrival")
    ax.plot(x, [r["to_publish_ms"]["p99"] for r in rows], "x:", label="p99 event to publish")
    for r, xi in zip(rows, x, strict=True):
        if r["saturation"]:
            ax.annotate(
                "saturation", (xi, r["to_arrival_ms"]["p99"]), textcoords="offset points", xytext=(-60, 5)
            )
    ax.axhline(100, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (events/s, achieved)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("streamrec: event-to-recommendation latency, one worker, 2 shared cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
