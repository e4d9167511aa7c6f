"""Sample traffic: publish the sample catalogue and simulated shoppers' events at a steady rate."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from streamrec.records import CatalogItem
from streamrec.sample import ShopperSimulator, sample_catalog
from streamrec.settings import Settings
from streamrec.streams.client import EventProducer

# A few records a web backend could get wrong, so the demo shows the dead-letter path at work.
BAD_RECORDS: list[bytes] = [
    b"not avro at all",
    b"\xc3\x01\x00\x00\x00\x00\x00\x00\x00\x00garbage",  # unknown schema fingerprint
    b"{'json': 'instead of avro'}",
]


@dataclass
class TrafficStats:
    events: int = 0
    bad_records: int = 0
    seconds: float = 0.0


def publish_catalog(producer: EventProducer, catalog: list[CatalogItem]) -> None:
    for item in catalog:
        producer.upsert_item(item)
    producer.flush()


def simulate(
    settings: Settings,
    users: int = 1000,
    rate: float = 500.0,
    seconds: float = 60.0,
    bad_every: int = 0,
    with_catalog: bool = True,
    seed: int = 42,
    should_stop: Callable[[], bool] = lambda: False,
    stats: TrafficStats | None = None,
    catalog: list[CatalogItem] | None = None,
) -> TrafficStats:
    """Send events at ``rate`` per second for ``seconds``; every ``bad_every``-th record is a bad one.
    Shoppers browse ``catalog`` (default: the sample catalogue).

    ``stats`` is updated as it goes, so another thread can show progress.
    """
    catalog = catalog if catalog is not None else sample_catalog()
    simulator = ShopperSimulator(catalog, users=users, seed=seed)
    stats = stats if stats is not None else TrafficStats()
    with EventProducer(settings) as producer:
        if with_catalog:
            publish_catalog(producer, catalog)
        producer.prepare()  # connected, schemas acknowledged: the first event's latency is the pipeline's
        started = time.monotonic()
        while not should_stop():
            elapsed = time.monotonic() - started
            if elapsed >= seconds:
                break
            due = int(elapsed * rate) + 1 - stats.events - stats.bad_records
            for _ in range(max(0, min(due, 5000))):
                sent = stats.events + stats.bad_records
                if bad_every and sent and sent % bad_every == 0:
                    bad = BAD_RECORDS[stats.bad_records % len(BAD_RECORDS)]
                    producer.send_raw(settings.events_topic, b"user-bad", bad)
                    stats.bad_records += 1
                    continue
                producer.send_event(simulator.next_event(time.time_ns() // 1_000_000))
                stats.events += 1
            producer.poll(0)
            stats.seconds = time.monotonic() - started
            time.sleep(0.002)
        producer.flush()
        stats.seconds = time.monotonic() - started
    return stats
