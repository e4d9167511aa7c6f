"""The recommendation API under load (issue 28's targets: p99 under 5 ms at 1,000 requests/s; the view at most
a second behind the topic), measured with wrk, a real HTTP load generator (Debian: `apt-get install wrk`),
against `streamrec api` on the embedded broker while new recommendations keep arriving. Prints one JSON
object.

    .venv/bin/python benchmarks/api_load.py [--users 10000] [--rate 1000] [--seconds 30] [--publish-rate 500]

1. A fresh embedded broker and topics; ``--users`` users' recommendations (10 items with reasons) and states
   (20 simulated events each), and the sample catalogue, written to the topics.
2. `streamrec api` on an empty directory: the time until it is ready (it reads everything back: the restore).
3. For ``--seconds``: a producer writes ``--publish-rate`` new recommendations/s for random users, and a probe
   writes one for its own user every 100 ms and asks the API for it every 10 ms until it shows (the view's
   delay, end to end: producer, broker, fetch, view, HTTP); a plain consumer of the topic, configured as the
   API's reader, times the same records (the broker's part, the floor under the view's delay). Meanwhile
   wrk offers ``--rate`` requests/s over random users: ``--connections`` connections, each pausing
   connections/rate between requests (wrk's ``delay()``; closed loop: a slow answer delays the next request
   of its connection). Then the same for the profiles, for half as long.
4. Once the traffic has stopped, wrk without pauses for half as long: the most the API answers.

Everything shares the machine's cores: the broker, the API, wrk, and this process's producers and probe.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

from streamrec.partitioner import partition_of
from streamrec.records import Recommendation, RecommendedItem
from streamrec.sample import ShopperSimulator, sample_catalog
from streamrec.serde import AvroCodec
from streamrec.settings import Settings
from streamrec.state import StateLimits, apply_event, encode_state
from streamrec.streams.api.process import ApiProcess
from streamrec.streams.broker import EmbeddedBroker
from streamrec.streams.client import EventProducer, reader_config
from streamrec.streams.kafka_security import client_config, on_embedded_broker
from streamrec.streams.ops.status import Samples, histogram_quantile, interval_buckets, parse_metrics
from streamrec.streams.reading import consume_arrived
from streamrec.streams.simulate import publish_catalog
from streamrec.streams.topics import create_topics

REASONS = ("similar_to_recent", "matches_search", "goes_with_purchase", "popular")

WRK_SCRIPT = """
local users = tonumber(os.getenv("API_USERS"))
local key = os.getenv("API_KEY")
local what = os.getenv("API_WHAT")
local pause = tonumber(os.getenv("API_DELAY_MS"))
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
request = function()
  local path = "/users/bench-" .. math.random(0, users - 1) .. "/" .. what
  return wrk.format("GET", path, {["X-API-Key"] = key})
end
if pause > 0 then
  delay = function() return pause end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "p99.9": %d, "max": %d, "mean": %.1f}}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
"""


def recommendation(user: str, cause: str, items: list[str], now: int) -> dict[str, Any]:
    ranked = [
        RecommendedItem(i, round(1.0 - n / 20, 3), REASONS[n % 4], f"Because you viewed item {n}", items[0])
        for n, i in enumerate(items)
    ]
    return Recommendation(user, ranked, "bench-model", "bench-index", cause, now - 30, now).to_avro()


def fill(settings: Settings, users: int, codec: AvroCodec) -> int:
    """Every user's recommendation and state, and the catalogue; returns the records written."""
    catalog = sample_catalog()
    with EventProducer(settings) as producer:
        publish_catalog(producer, catalog)
    simulator = ShopperSimulator(catalog, users=users, seed=1, user_prefix="bench")
    ids = [i.item_id for i in catalog]
    states: dict[str, Any] = {}
    start = int(time.time() * 1000) - 3_600_000
    for event in simulator.history(users * 20, start, spacing_ms=1):
        states[event.user_id], _ = apply_event(states.get(event.user_id), event, StateLimits())
    producer = Producer({**client_config(settings), "linger.ms": 20})

    def send(topic: str, key: bytes, value: bytes, partition: int) -> None:
        while True:
            try:
                return producer.produce(topic, key=key, value=value, partition=partition)
            except BufferError:
                producer.poll(0.1)

    now = int(time.time() * 1000)
    rng = random.Random(2)
    for u in range(users):
        user = f"bench-{u}"
        key = user.encode()
        partition = partition_of(key, settings.partitions)
        rec = recommendation(user, f"fill-{u}", rng.sample(ids, 10), now)
        send(settings.recommendations_topic, key, codec.encode("Recommendation", rec), partition)
        state = states.get(f"bench-{u:06d}")  # the simulator's name for the same shopper
        if state is not None:
            state.user_id = user
            send(settings.state_changelog_topic, key, encode_state(state), partition)
    producer.flush(60)
    return users + len(states) + len(catalog)


class Traffic:
    """New recommendations for random users at ``rate``/s, and the probe that times the view's delay."""

    def __init__(
        self, settings: Settings, api: ApiProcess, users: int, rate: float, codec: AvroCodec
    ) -> None:
        self.settings, self.api, self.users, self.rate, self.codec = settings, api, users, rate, codec
        self.stop = threading.Event()
        self.published = 0
        self.delays_ms: list[float] = []
        self.missed = 0
        self.floor_ms: list[float] = []  # what a plain consumer of the topic sees: the broker's part
        targets = (self._publish, self._probe, self._read) if rate > 0 else (self._probe, self._read)
        self.threads = [threading.Thread(target=target) for target in targets]

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _producer(self, linger_ms: int) -> Producer:
        return Producer({**client_config(self.settings), "linger.ms": linger_ms})

    def _publish(self) -> None:
        # Batched as the worker's producer batches (linger 2 ms there): one request per record would make the
        # embedded broker the bottleneck, and the records' timestamps would include their wait in the client.
        producer, rng, n = self._producer(linger_ms=5), random.Random(3), 0
        started = time.monotonic()
        while not self.stop.is_set():
            wait = started + n / self.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            user = f"bench-{rng.randrange(self.users)}"
            items = [f"sku-{rng.randrange(480):05d}" for _ in range(10)]
            value = self.codec.encode(
                "Recommendation", recommendation(user, f"live-{n}", items, int(time.time() * 1000))
            )
            producer.produce(
                self.settings.recommendations_topic,
                key=user.encode(),
                value=value,
                partition=partition_of(user.encode(), self.settings.partitions),
            )
            producer.poll(0)
            n += 1
        producer.flush(10)
        self.published = n

    def _read(self) -> None:
        """The delay from a record's timestamp to its arrival at a plain consumer configured as the API's
        reader (20 ms fetch wait on the embedded broker): the floor under the view's delay."""
        consumer = Consumer(reader_config(self.settings, None, from_beginning=False))
        topic = self.settings.recommendations_topic
        consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in range(self.settings.partitions)])
        started = time.time() * 1000
        while not self.stop.is_set():
            for msg in consume_arrived(consumer, 1000, 0.1):
                if msg.error() is None and msg.timestamp()[1] >= started:
                    self.floor_ms.append(time.time() * 1000 - msg.timestamp()[1])
        consumer.close()

    def _probe(self) -> None:
        producer, n, user = self._producer(linger_ms=0), 0, "bench-probe"
        partition = partition_of(user.encode(), self.settings.partitions)
        while not self.stop.wait(0.1):
            cause = f"probe-{n}"
            value = self.codec.encode(
                "Recommendation", recommendation(user, cause, ["sku-00001"] * 10, int(time.time() * 1000))
            )
            sent = time.perf_counter()
            producer.produce(
                self.settings.recommendations_topic, key=user.encode(), value=value, partition=partition
            )
            producer.poll(0)
            deadline = sent + 5.0
            while time.perf_counter() < deadline:
                status, body = self.api.user(user)
                if status == 200 and body["cause_event_id"] == cause:
                    self.delays_ms.append((time.perf_counter() - sent) * 1000)
                    break
                time.sleep(0.01)
            else:
                self.missed += 1
            n += 1
        producer.flush(5)


def wrk(
    api: ApiProcess, users: int, what: str, rate: float | None, connections: int, seconds: float, script: Path
) -> dict[str, Any]:
    pause_ms = 0 if rate is None else max(1, round(connections * 1000 / rate))
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "-s", str(script), api.url]
    env = {
        **os.environ,
        "API_USERS": str(users),
        "API_KEY": api.api_key,
        "API_WHAT": what,
        "API_DELAY_MS": str(pause_ms),
    }
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    found = json.loads(next(line for line in out.splitlines() if line.startswith("WRK_JSON "))[9:])
    seconds_run = found.pop("duration_us") / 1e6
    latency = {k: round(v / 1000, 3) for k, v in found.pop("latency_us").items()}
    return {
        "seconds": seconds_run,
        "command": " ".join(command) + f"  (API_DELAY_MS={pause_ms}, API_WHAT={what})",
        "offered_per_s": rate,
        "requests_per_s": round(found["requests"] / seconds_run, 1),
        "latency_ms": latency,
        **found,
    }


def api_metrics(api: ApiProcess, route: str | None = None) -> Samples:
    """The API's metrics; with ``route``, only that route's samples (and every unlabelled one)."""
    with urllib.request.urlopen(f"{api.url}/metrics", timeout=5) as response:
        samples = parse_metrics(response.read().decode())
    return [s for s in samples if route is None or s[1].get("route", route) == route]


def quantile_ms(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    found = histogram_quantile(q, cumulative)
    return None if found is None else round(found * 1000, 2)


def p99_ms(cumulative: list[tuple[float, float]]) -> float | None:
    return quantile_ms(0.99, cumulative)


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(api: ApiProcess, what: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A wrk run, with the p99 the API itself measured in its handler over the run (its histogram's buckets
    interpolated: 0.5, 1, 2, 3, 5, 7.5 ms...) and the API process's CPU per request (the view's upkeep
    included: the recommendations arriving meanwhile)."""
    assert api.process is not None
    route = f"/users/{{user_id}}/{what}"
    before, cpu = api_metrics(api, route), cpu_seconds(api.process.pid)
    found = run()
    cpu = cpu_seconds(api.process.pid) - cpu
    after = api_metrics(api, route)
    found["in_handler_p99_ms"] = p99_ms(interval_buckets(before, after, "streamrec_api_request_seconds"))
    found["api_cpu_us_per_request"] = round(cpu / max(1, found["requests"]) * 1e6, 1)
    found["api_cpu_cores"] = round(cpu / found.pop("seconds"), 2)
    return found


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="requests/s wrk offers")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--publish-rate",
        type=float,
        default=500.0,
        help="new recommendations/s meanwhile (0: only the probe's)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")
    codec = AvroCodec()
    with (
        tempfile.TemporaryDirectory(prefix="streamrec-api-bench-") as tmp,
        EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker,
    ):
        settings = on_embedded_broker(Settings(log_level="warn"), broker.bootstrap)
        create_topics(settings)
        started = time.monotonic()
        records = fill(settings, args.users, codec)
        filled_s = time.monotonic() - started
        script = Path(tmp) / "users.lua"
        script.write_text(WRK_SCRIPT)
        api = ApiProcess(settings, Path(tmp) / "api").start()
        try:
            started = time.monotonic()
            ready = api.wait_ready(timeout_s=300)
            restore_s = time.monotonic() - started
            runs = {}

            def run(what: str, rate: float | None, seconds: float) -> dict[str, Any]:
                load = functools.partial(wrk, api, args.users, what, rate, args.connections, seconds, script)
                return measured(api, what, load)

            with Traffic(settings, api, args.users, args.publish_rate, codec) as traffic:
                before = api_metrics(api)
                runs["recommendations"] = run("recommendations", args.rate, args.seconds)
                runs["profiles"] = run("profile", args.rate, args.seconds / 2)
                after = api_metrics(api)
            # The most it answers, with nothing else to do: no traffic (it would starve the broker).
            runs["recommendations_unpaced"] = run("recommendations", None, args.seconds / 2)
            delays = traffic.delays_ms
            result = {
                "users": args.users,
                "records_written": records,
                "fill_s": round(filled_s, 1),
                "restore_s": round(restore_s, 2),
                "restore_records": ready["records"],
                "publish_rate": args.publish_rate,
                "published_meanwhile": traffic.published,
                "view_delay_ms": {
                    "probes": len(delays),
                    "missed": traffic.missed,
                    "p50": percentile(delays, 0.5),
                    "p99": percentile(delays, 0.99),
                    "max": round(max(delays), 1) if delays else None,
                    "mean": round(statistics.fmean(delays), 1) if delays else None,
                    "server_side_p99": p99_ms(
                        interval_buckets(before, after, "streamrec_api_view_delay_seconds")
                    ),
                    "plain_consumer_p50": percentile(traffic.floor_ms, 0.5),
                    "plain_consumer_p99": percentile(traffic.floor_ms, 0.99),
                },
                "view_slice_ms": {  # the event loop's time per slice applied to the view, while serving
                    "p50": quantile_ms(
                        0.5, interval_buckets(before, after, "streamrec_api_view_slice_seconds")
                    ),
                    "p99": p99_ms(interval_buckets(before, after, "streamrec_api_view_slice_seconds")),
                },
                "wrk": runs,
                "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        finally:
            api.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
