"""What the embedded broker's CPU costs at a steady rate, as its topics fill (README, "Round 12").

Two measurements on a fresh embedded broker, nothing else running against it, printed as one JSON object:

- ``growth``: records produced (a web backend's producer: idempotent, 5 ms linger) and consumed (fetch wait
  5 ms) at ``--rate`` per second for ``--seconds``; per span, the records stored so far, the broker's CPU
  (cores) and the produce-to-consume p50/p99;
- ``stored``: the broker's CPU for the same steady traffic on a fresh topic, then again after the broker has
  been given 30,000 one-record batches in that topic, in another topic, or 300,000 records in large batches.

    .venv/bin/python benchmarks/broker_cost.py [--rate 1000] [--seconds 40]
"""

from __future__ import annotations

import argparse
import json
import struct
import threading
import time
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streamrec.streams.bench import cpu_seconds, summarize
from streamrec.streams.broker import EmbeddedBroker

PARTITIONS = 4
PAYLOAD = 140  # bytes, an event's size


def steady(
    broker: EmbeddedBroker, topic: str, rate: float, seconds: float, span_s: float
) -> list[dict[str, Any]]:
    """Produce and consume ``rate`` records/s on ``topic`` from its end; one row per ``span_s``."""
    assert broker.process is not None
    pid = broker.process.pid
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": f"broker-cost-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
        }
    )
    ends = [
        consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)
    ]
    consumer.assign([TopicPartition(topic, p, end) for p, end in enumerate(ends)])
    latencies: list[float] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            for msg in consumer.consume(500, 0.005):
                value = msg.value()
                if msg.error() is None and value is not None and len(value) == PAYLOAD:
                    latencies.append(time.time() * 1000 - struct.unpack_from("<d", value)[0])

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    time.sleep(1.0)
    producer = Producer(
        {
            "bootstrap.servers": broker.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "linger.ms": 5,
        }
    )
    producer.produce(topic, b"warm-up")  # connection and producer id before the clock starts (not timed)
    producer.flush(10)
    padding = bytes(PAYLOAD - 8)
    rows: list[dict[str, Any]] = []
    sent, started = 0, time.monotonic()
    mark = (started, cpu_seconds(pid) or 0.0, 0)
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            for _ in range(int(elapsed * rate) + 1 - sent):
                key = f"user-{sent % 10_000}".encode()
                producer.produce(topic, struct.pack("<d", time.time() * 1000) + padding, key=key)
                sent += 1
            producer.poll(0)
            time.sleep(0.002)
            now = time.monotonic()
            if now - mark[0] >= span_s:
                cpu, seen = cpu_seconds(pid) or 0.0, len(latencies)
                span = summarize(latencies[mark[2] : seen])
                rows.append(
                    {
                        "at_s": round(now - started, 1),
                        "records_sent": sent,
                        "broker_cores": round((cpu - mark[1]) / (now - mark[0]), 2),
                        "p50_ms": span["p50"],
                        "p99_ms": span["p99"],
                    }
                )
                mark = (now, cpu, seen)
        producer.flush(10)
    finally:
        stop.set()
        reader.join(timeout=5)
        consumer.close()
    return rows


def fill(broker: EmbeddedBroker, topic: str, records: int, small_batches: bool) -> float:
    """Store ``records`` in ``topic``: one record per batch, or large batches; seconds it took."""
    config = {"bootstrap.servers": broker.bootstrap, "partitioner": "murmur2_random"}
    config |= {"linger.ms": 0} if small_batches else {"linger.ms": 50, "batch.size": 1_000_000}
    producer = Producer(config)
    started = time.monotonic()
    for n in range(records):
        producer.produce(topic, bytes(PAYLOAD), key=f"user-{n % 10_000}".encode())
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
            admin = AdminClient({"bootstrap.servers": broker.bootstrap})
            for topic in ("a", "b"):
                admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(10)
            before = steady(broker, "a", rate, 6.0, 6.0)[0]["broker_cores"]
            took = fill(broker, target, records, small)
            after = steady(broker, "a", rate, 6.0, 6.0)[0]["broker_cores"]
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
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        admin.create_topics([NewTopic("growth", PARTITIONS, 1)])["growth"].result(10)
        growth = steady(broker, "growth", args.rate, args.seconds, 5.0)
    result = {"rate_per_s": args.rate, "growth": growth, "stored": stored(args.rate)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
