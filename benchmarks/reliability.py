"""Reliability figures (docs/reliability.md), printed as one JSON object: real embedded brokers, real worker
processes, a producer client sending at a steady rate.

- ``scaling``: one worker, then three, then one of them killed (SIGKILL), then back to one, while clicks
  arrive at ``--rate`` per second; per move, the p99 (and max) event-to-recommendation latency from the move
  until ``--hold`` seconds after the group settled, and the same before any move;
- ``soak``: a rate above what one worker sustains for the first 60% of ``--minutes``, then a low rate: the
  worker's memory (its process and its ranking process, RSS) and its backlog (events sent, not applied yet)
  every few seconds, and how many events each recommendation stood for (users coalesced per batch);
- ``outage``: the broker stopped for ``--down`` seconds under load and a new one started on its port.

The tests in tests/reliability/ run the same scenarios, shorter, and assert what must hold; this prints
the figures:

    .venv/bin/python benchmarks/reliability.py scaling [--rate 200] [--hold 5]
    .venv/bin/python benchmarks/reliability.py soak [--minutes 10] [--rate 6000] [--low-rate 200]
    .venv/bin/python benchmarks/reliability.py outage [--rate 200] [--down 5]

Without ``--registry`` a tiny sample model is trained first (about a minute, not counted in any figure).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from streamrec.records import Recommendation
from streamrec.sample import sample_catalog
from streamrec.serde import AvroCodec
from streamrec.settings import Settings
from streamrec.streams.broker import EmbeddedBroker
from streamrec.streams.client import DeliveryError, EventProducer
from streamrec.streams.demo import train_sample_registry
from streamrec.streams.kafka_security import client_config
from streamrec.streams.process import WorkerProcess
from streamrec.streams.simulate import publish_catalog
from streamrec.streams.topics import create_topics

PLACEHOLDER = "x" * 32  # an event id's place in a pre-encoded click


class SteadyLoad:
    """Clicks at ``rate`` per second from a thread, round robin over ``users``, counted per user. Every 200
    records it serves the producer's reports; records it reports as not delivered are sent again (the
    worker de-duplicates by event id), so the count per user is what the worker must apply.

    ``raw``: each click is a copy of the user's click of this second, encoded once, with its own event id,
    sent with ``send_raw``: several times the rate of ``click()``, whose validation and encoding cap one
    Python thread at about 6,000 clicks/s here, which one worker keeps up with."""

    def __init__(
        self, producer: EventProducer, users: list[str], items: list[str], rate: float, raw: bool = False
    ) -> None:
        self.producer = producer
        self.users = users
        self.items = items
        self.rate = rate
        self.raw = raw
        self._templates: dict[str, tuple[int, bytes, bytes]] = {}  # user -> (second, before id, after id)
        self._event_ids = itertools.count()  # unique for the whole run, across rate changes
        self.sent: Counter[str] = Counter()
        self.reported = 0  # records the producer reported as not delivered (each sent again)
        self.resent = 0
        self.refused = 0  # clicks the producer refused to queue (its buffer full, a schema not published)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> SteadyLoad:
        self._thread.start()
        return self

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def _run(self) -> None:
        try:
            n, started = 0, time.monotonic()
            while not self._stop.is_set():
                ahead = n / self.rate - (time.monotonic() - started) if self.rate else 0.0
                if ahead > 0:
                    self._stop.wait(min(ahead, 0.05))
                    continue
                users = self.users  # may be swapped by the scenario between phases
                user = users[n % len(users)]
                n += 1
                try:
                    if self.raw:
                        value = self._raw_click(user, n)
                        self.producer.send_raw(self.producer.settings.events_topic, user, value)
                    else:
                        self.producer.click(user, self.items[n % len(self.items)])
                except (DeliveryError, BufferError):  # not queued (a backend would answer an error)
                    self.refused += 1
                    continue
                self.sent[user] += 1
                if n % 200 == 0:
                    self._serve(0.0)
        except BaseException as exc:  # the scenario reports it
            self.error = exc

    def _raw_click(self, user: str, n: int) -> bytes:
        second = int(time.time())
        template = self._templates.get(user)
        if template is None or template[0] != second:
            record = {
                "event_id": PLACEHOLDER,
                "user_id": user,
                "timestamp": now_ms(),
                "item_id": self.items[(n + second) % len(self.items)],
            }
            body = self.producer.codec.encode("ClickEvent", record)
            cut = body.index(PLACEHOLDER.encode())
            template = (second, body[:cut], body[cut + len(PLACEHOLDER) :])
            self._templates[user] = template
        return template[1] + b"%032x" % next(self._event_ids) + template[2]

    def set_rate(self, rate: float) -> None:
        """A new rate from now on (the pacing restarts)."""
        self.stop()
        self.rate = rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _serve(self, timeout_s: float) -> bool:
        try:
            self.producer.flush(timeout_s) if timeout_s else self.producer.poll(0)
            if not timeout_s:
                self._raise_reported()
            return True
        except DeliveryError as exc:
            self._resend(exc)
            return False

    def _raise_reported(self) -> None:
        # poll() serves reports; flush(0) raises what they hold without waiting for the queue
        try:
            self.producer.flush(0)
        except DeliveryError as exc:
            if exc.failures:
                self._resend(exc)

    def _resend(self, exc: DeliveryError) -> None:
        self.reported += len(exc.failures)
        for failure in exc.failures:
            self.producer.send_raw(failure.topic, failure.key, failure.value)
            self.resent += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def drain(self, timeout_s: float = 120) -> None:
        """Stop sending and wait until every record is acknowledged (sending reported ones again)."""
        self.stop()
        deadline = time.monotonic() + timeout_s
        while not self._serve(10.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"records still not delivered after {timeout_s:.0f} s")


class LatencyReader:
    """Every live recommendation's publish time and event-to-recommendation latency, read in a thread from
    the start of the recommendations topic."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: list[tuple[int, int]] = []  # (publish time ms, latency ms)
        self.events_per_recommendation: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        codec = AvroCodec()
        consumer = Consumer(
            client_config(self.settings)
            | {
                "group.id": "reliability-reader",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 20,
            }
        )
        topic = self.settings.recommendations_topic
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(self.settings.partitions)])
        while not self._stop.is_set():
            for msg in consumer.consume(1000, 0.1):
                if msg.error() or msg.value() is None:
                    continue
                rec = Recommendation.from_avro(codec.decode(msg.value())[1])
                self.seen.append((rec.publish_time, rec.publish_time - rec.event_time))
        consumer.close()

    def window(self, start_ms: int, end_ms: int) -> dict[str, Any]:
        """Latency figures of the recommendations published in [start_ms, end_ms)."""
        latencies = sorted(lat for at, lat in list(self.seen) if start_ms <= at < end_ms)
        if not latencies:
            return {"recommendations": 0}
        return {
            "recommendations": len(latencies),
            "p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "max_ms": latencies[-1],
        }

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def wait_for(condition: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s:.0f} s")
        time.sleep(0.1)


class Rig:
    """A broker with streamrec's topics and the sample catalogue, workers, a producer and a reader."""

    def __init__(
        self, registry: Path, root: Path, broker: EmbeddedBroker | None = None, **overrides: Any
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.broker = (broker or EmbeddedBroker(log_path=root / "broker.log")).start()
        self.settings = Settings(
            bootstrap_servers=self.broker.bootstrap, model_registry=registry, data_dir=root, **overrides
        )
        create_topics(self.settings)
        self.producer = EventProducer(self.settings)
        self.catalog = sample_catalog()
        publish_catalog(self.producer, self.catalog)
        self.producer.flush()
        self.items = [i.item_id for i in self.catalog if i.in_stock][:200]
        self.workers: list[WorkerProcess] = []
        self.reader = LatencyReader(self.settings)

    def worker(self, name: str) -> WorkerProcess:
        w = WorkerProcess(self.settings, self.root / name, name).start()
        self.workers.append(w)
        return w

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive()]

    def settled(self, count: int) -> bool:
        """``count`` live workers, each ready, that between them hold every events partition once."""
        alive = self.alive()
        if len(alive) != count:
            return False
        held: list[int] = []
        for w in alive:
            health = w.health()
            if not health.get("ready"):
                return False
            held += (health.get("assignment") or {}).get(self.settings.events_topic, [])
        return sorted(held) == list(range(self.settings.partitions))

    def wait_settled(self, count: int, timeout_s: float = 90) -> float:
        """Wait until ``count`` workers share the partitions; seconds waited."""
        started = time.monotonic()
        wait_for(lambda: self.settled(count), timeout_s, f"{count} worker(s) sharing every partition")
        return time.monotonic() - started

    def close(self) -> None:
        self.reader.close()
        for w in self.workers:
            w.stop()
        with contextlib.suppress(DeliveryError):
            self.producer.close(5)
        self.broker.stop()


@contextmanager
def rig(registry: Path, root: Path, broker: EmbeddedBroker | None = None, **overrides: Any) -> Iterator[Rig]:
    r = Rig(registry, root, broker, **overrides)
    try:
        yield r
    finally:
        r.close()


def users_of(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{k}" for k in range(n)]


def applied_clicks(worker: WorkerProcess, users: list[str]) -> Counter[str]:
    found: Counter[str] = Counter()
    for u in users:
        state = worker.state(u)
        found[u] = state["clicks"] if state else 0
    return found


# --- scaling -----------------------------------------------------------------------------------------------


def scaling(r: Rig, load: SteadyLoad, hold_s: float) -> dict[str, Any]:
    """One worker, three, one of them killed, back to one, under ``load``; the latency of each move."""
    first = r.worker("w0")
    first.wait_ready()
    first.wait_catalog(len(r.catalog), timeout_s=60)
    r.wait_settled(1)
    load.start()
    moves: list[dict[str, Any]] = []
    time.sleep(hold_s)  # steady state first
    start = now_ms()
    time.sleep(hold_s)
    moves.append({"move": "steady, one worker", **r.reader.window(start, now_ms())})

    def move(name: str, act: Any, workers: int) -> None:
        start = now_ms()
        act()
        settle_s = r.wait_settled(workers)
        time.sleep(hold_s)
        moves.append({"move": name, "settled_s": round(settle_s, 1), **r.reader.window(start, now_ms())})

    def scale_out() -> None:
        for name in ("w1", "w2"):
            r.worker(name)

    move("1 -> 3 workers", scale_out, 3)
    move("kill -9 one of 3", lambda: r.workers[1].kill(), 2)
    move("stop one of 2 (back to 1)", lambda: r.workers[2].stop(), 1)
    return {"rate": load.rate, "hold_s": hold_s, "moves": moves}


# --- soak --------------------------------------------------------------------------------------------------


def rss_bytes(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


METRIC = re.compile(r"^(streamrec_(?:events|recommendations|batches)_total)(\{[^}]*\})? (\S+)$")


def worker_counts(worker: WorkerProcess) -> dict[str, float]:
    """Events applied, recommendations published and batches, from the worker's /metrics."""
    counts: dict[str, float] = {}
    for line in worker.metrics_text().splitlines():
        m = METRIC.match(line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0.0) + float(m.group(3))
    return counts


def soak(r: Rig, load: SteadyLoad, minutes: float, high_rate: float, low_rate: float) -> dict[str, Any]:
    """``high_rate`` for 60% of the time, then ``low_rate``: memory and backlog every few seconds."""
    worker = r.worker("w0")
    worker.wait_ready()
    worker.wait_catalog(len(r.catalog), timeout_s=60)
    r.wait_settled(1)
    total_s = minutes * 60
    high_s = 0.6 * total_s
    step_s = max(2.0, total_s / 60)
    samples: list[dict[str, Any]] = []
    load.rate = high_rate
    started = time.monotonic()
    load.start()
    lowered = False
    while (elapsed := time.monotonic() - started) < total_s:
        if not lowered and elapsed >= high_s:
            load.set_rate(low_rate)
            lowered = True
        health = worker.health()
        ranking = (health.get("ranking_process") or {}).get("pid")
        counts = worker_counts(worker)
        applied = counts.get("streamrec_events_total", 0.0)
        samples.append(
            {
                "t_s": round(elapsed, 1),
                "rate": load.rate,
                "sent": load.total,
                "applied": int(applied),
                "backlog": int(load.total - applied),
                "rss_mb": round((rss_bytes(worker.pid) + rss_bytes(ranking)) / 2**20, 1),
                "worker_rss_mb": round(rss_bytes(worker.pid) / 2**20, 1),
                "recommendations": int(counts.get("streamrec_recommendations_total", 0.0)),
                "batches": int(counts.get("streamrec_batches_total", 0.0)),
            }
        )
        time.sleep(step_s)
    load.stop()
    if load.error is not None:
        raise load.error
    return summarise_soak(samples, high_s, minutes, high_rate, low_rate)


def summarise_soak(
    samples: list[dict[str, Any]], high_s: float, minutes: float, high_rate: float, low_rate: float
) -> dict[str, Any]:
    high = [s for s in samples if s["t_s"] < high_s]
    low = [s for s in samples if s["t_s"] >= high_s]
    rss = [s["rss_mb"] for s in samples]
    half = len(high) // 2  # memory after warm-up: the second half of the overload
    applied_high = (high[-1]["applied"] - high[0]["applied"]) / max(1e-9, high[-1]["t_s"] - high[0]["t_s"])
    recs = samples[-1]["recommendations"] - samples[0]["recommendations"]
    events = samples[-1]["applied"] - samples[0]["applied"]
    return {
        "minutes": minutes,
        "high_rate": high_rate,
        "low_rate": low_rate,
        "applied_per_s_under_overload": round(applied_high),
        "backlog_at_peak": max(s["backlog"] for s in samples),
        "backlog_at_end": samples[-1]["backlog"],
        "rss_mb_min_max": [min(rss), max(rss)],
        "rss_mb_second_half_of_overload_min_max": [
            min(s["rss_mb"] for s in high[half:]),
            max(s["rss_mb"] for s in high[half:]),
        ]
        if high[half:]
        else None,
        "rss_mb_low_rate_min_max": [min(s["rss_mb"] for s in low), max(s["rss_mb"] for s in low)]
        if low
        else None,
        "events_per_recommendation": round(events / recs, 2) if recs else None,
        "samples": samples,
    }


# --- outage ------------------------------------------------------------------------------------------------


def outage(r: Rig, load: SteadyLoad, down_s: float) -> dict[str, Any]:
    """Stop the broker under load, start a new one on its port after ``down_s``: how long the worker said it
    was disconnected, and how long after the restart recommendations flowed again."""
    worker = r.worker("w0")
    worker.wait_ready()
    worker.wait_catalog(len(r.catalog), timeout_s=60)
    r.wait_settled(1)
    load.start()
    time.sleep(3)
    port, log_path = r.broker.port, r.root / "broker-2.log"
    r.broker.stop()
    stopped = time.monotonic()
    wait_for(
        lambda: worker.health().get("broker_connected") is False, 30, "the worker to say it is disconnected"
    )
    reported_down_s = time.monotonic() - stopped
    time.sleep(max(0.0, down_s - reported_down_s))
    r.broker = EmbeddedBroker(port=port, log_path=log_path).start()
    restarted, restarted_ms = time.monotonic(), now_ms()
    create_topics(r.settings)
    r.reader.close()
    r.reader = LatencyReader(r.settings)  # the new broker's topics start empty
    wait_for(
        lambda: r.reader.window(restarted_ms, now_ms() + 1)["recommendations"] > 0, 120, "recommendations"
    )
    flowing_s = time.monotonic() - restarted
    wait_for(lambda: worker.health().get("broker_connected") is True, 60, "the worker to say it is connected")
    time.sleep(3)
    load.drain()
    return {
        "rate": load.rate,
        "down_s": down_s,
        "disconnected_reported_after_s": round(reported_down_s, 1),
        "recommendations_again_after_restart_s": round(flowing_s, 1),
        "records_reported_not_delivered": load.reported,
        "records_sent": load.total,
    }


SOAK_RATE = 20_000.0  # clicks/s: above what one worker applies on 2 shared cores beside the sender


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", choices=["scaling", "soak", "outage"])
    parser.add_argument("--rate", type=float, default=None, help="clicks per second (soak: the high rate)")
    parser.add_argument("--low-rate", type=float, default=200.0, help="soak: the rate after the overload")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak: how long")
    parser.add_argument("--hold", type=float, default=5.0, help="scaling: seconds measured after each move")
    parser.add_argument("--down", type=float, default=5.0, help="outage: seconds without a broker")
    parser.add_argument(
        "--users", type=int, default=1000, help="users the clicks go round (each stays under the rate limit)"
    )
    parser.add_argument("--registry", type=Path, default=None, help="a model registry (default: train one)")
    parser.add_argument(
        "--root", type=Path, default=None, help="where to run and keep logs (default: a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="streamrec-reliability-") as tmp:
        root = args.root or Path(tmp)
        registry = args.registry or train_sample_registry(root / "models")
        overrides: dict[str, Any] = (
            {"producer_delivery_timeout_ms": 5000} if args.scenario == "outage" else {}
        )
        with rig(registry, root / "run", **overrides) as r:
            rate = args.rate or (SOAK_RATE if args.scenario == "soak" else 200.0)
            raw = args.scenario == "soak"
            load = SteadyLoad(r.producer, users_of("shopper", args.users), r.items, rate, raw=raw)
            if args.scenario == "scaling":
                result = scaling(r, load, args.hold)
            elif args.scenario == "soak":
                result = soak(r, load, args.minutes, rate, args.low_rate)
            else:
                result = outage(r, load, args.down)
            load.stop()
    json.dump({"scenario": args.scenario, **result}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
