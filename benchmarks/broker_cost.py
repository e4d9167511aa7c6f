"""What the embedded broker's CPU costs at a steady rate, as its topics fill (docs/performance.md,
"Round 12").

Two measurements on a fresh embedded broker, nothing else running against it, printed as one JSON object. Both
use the bench's broker round trip (``streamrec bench``: a web backend's producer and a consumer configured as
the event stage's) and sample the broker's CPU:

- ``growth``: records produced and consumed at ``--rate`` per second for ``--seconds``; per span, the records
  stored so far, the broker's CPU (cores) and the produce-to-consume p99;
- ``stored``: the broker's CPU for the same steady traffic on a fresh topic, then again after the broker has
  been given 30,000 one-record batches in that topic, in another topic, or 300,000 records in large batches.

    .venv/bin/python benchmarks/broker_cost.py [--rate 1000] [--seconds 40]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streamrec.settings import Settings
from streamrec.streams.bench import CpuSampler, broker_round_trip
from streamrec.streams.broker import EmbeddedBroker
from streamrec.streams.kafka_logging import client_logging

PARTITIONS = 4
PAYLOAD = 140  # bytes, an event's size


def steady(broker: EmbeddedBroker, topic: str, rate: float, seconds: float, parts: int) -> dict[str, Any]:
    """The bench's round trip at ``rate`` records/s on ``topic``, with the broker's CPU, by span."""
    assert broker.process is not None
    pid = broker.process.pid
    settings = Settings.model_validate({"bootstrap_servers": broker.bootstrap, "partitions": PARTITIONS})
    with CpuSampler(lambda: {"broker": [pid]}) as cpu:
        return broker_round_trip(settings, rate, seconds, PAYLOAD, cpu=cpu, topic=topic, parts=parts)


def growth(broker: EmbeddedBroker, rate: float, seconds: float) -> list[dict[str, Any]]:
    spans = steady(broker, "growth", rate, seconds, parts=max(1, round(seconds / 5)))["over_time"]
    stored, rows = 0, []
    for span in spans:
        stored += span["records"]
        rows.append(
            {
                "to_s": span["to_s"],
                "records_stored": stored,
                "broker_cores": span["cpu_cores"].get("broker"),
                "p99_ms": span["round_trip_ms_p99"],
            }
        )
    return rows


def fill(broker: EmbeddedBroker, topic: str, records: int, small_batches: bool) -> float:
    """Store ``records`` in ``topic``: one record per batch, or large batches; seconds it took."""
    config = {"bootstrap.servers": broker.bootstrap, "partitioner": "murmur2_random"}
    config |= {"linger.ms": 0} if small_batches else {"linger.ms": 50, "batch.size": 1_000_000}
    producer = Producer(config | client_logging())
    started = time.monotonic()
    for n in range(records):
        producer.produce(topic, bytes(PAYLOAD + 1), key=f"user-{n % 10_000}".encode())  # never a round trip
        if small_batches:  # each record its own request
            producer.poll(0)
            time.sleep(0.0002)
        elif n % 1000 == 0:
            producer.poll(0)
    producer.flush(60)
    return round(time.monotonic() - started, 1)


def stored(rate: float) -> list[dict[str, Any]]:
    out = []
    cases = [
        ("30,000 one-record batches in the same topic", "a", 30_000, True),
        ("30,000 one-record batches in another topic", "b", 30_000, True),
        ("300,000 records in large batches in the same topic", "a", 300_000, False),
    ]
    for name, target, records, small in cases:
        with EmbeddedBroker() as broker:
            admin = AdminClient({"bootstrap.servers": broker.bootstrap, **client_logging()})
            for topic in ("a", "b"):
                admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(10)
            before = steady(broker, "a", rate, 6.0, parts=1)["cpu_cores"]["broker"]
            took = fill(broker, target, records, small)
            after = steady(broker, "a", rate, 6.0, parts=1)["cpu_cores"]["broker"]
            out.append({"stored": name, "fill_s": took, "broker_cores_before": before, "after": after})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="records/s produced and consumed")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of the growth run")
    args = parser.parse_args()
    with EmbeddedBroker() as broker:
        rows = growth(broker, args.rate, args.seconds)
    print(json.dumps({"rate_per_s": args.rate, "growth": rows, "stored": stored(args.rate)}))


if __name__ == "__main__":
    main()
