"""Real worker processes against a real broker: a trained sample model, worker control, output readers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from streamrec.records import Recommendation
from streamrec.sample import sample_catalog
from streamrec.serde import AvroCodec
from streamrec.settings import Settings
from streamrec.streams.broker import EmbeddedBroker
from streamrec.streams.client import EventProducer
from streamrec.streams.demo import train_sample_registry
from streamrec.streams.process import WorkerProcess
from streamrec.streams.simulate import publish_catalog
from streamrec.streams.topics import create_topics
from tests.conftest import wait_for


@pytest.fixture(scope="session")
def model_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny encoder trained on sample shoppers and promoted, shared by every worker test."""
    return train_sample_registry(tmp_path_factory.mktemp("models"))


def comparable_state(state: dict | None) -> dict | None:
    """A worker's ``/users/{id}/state`` answer less ``rate_tat``: the rate limit's clock runs on when the
    records reached Kafka, which differs between live traffic and a replay of the same events, and which a
    reference built from the events alone cannot know. Everything else follows from the events."""
    return None if state is None else {k: v for k, v in state.items() if k != "rate_tat"}


class OutputReader:
    """Collects everything published on the recommendations and dead-letter topics, in a thread."""

    def __init__(self, settings: Settings, topic: str | None = None) -> None:
        self.settings = settings
        self.topic = topic or settings.recommendations_topic
        self.codec = AvroCodec()
        self.recommendations: list[Recommendation] = []
        self.dead_letters: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.bootstrap_servers,
                "group.id": "test-reader",
                "enable.auto.commit": False,
            }
        )
        n = self.settings.partitions
        consumer.assign(
            [TopicPartition(t, p, 0) for t in (self.topic, self.settings.dead_letter_topic) for p in range(n)]
        )
        while not self._stop.is_set():
            for msg in consumer.consume(500, 0.1):
                if msg.error() or msg.value() is None:
                    continue
                name, record = self.codec.decode(msg.value())
                if name == "DeadLetter":
                    self.dead_letters.append(record)
                else:
                    self.recommendations.append(Recommendation.from_avro(record))
        consumer.close()

    def for_user(self, user_id: str) -> list[Recommendation]:
        return [r for r in list(self.recommendations) if r.user_id == user_id]

    def wait_for_cause(self, user_id: str, event_id: str, timeout_s: float = 30) -> Recommendation:
        return wait_for(
            lambda: next((r for r in self.for_user(user_id) if r.cause_event_id == event_id), None),
            timeout_s,
            what=f"a recommendation for {user_id} caused by {event_id}",
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Cluster:
    def __init__(self, settings: Settings, root: Path) -> None:
        self.settings = settings
        self.root = root
        self.catalog = sample_catalog()
        self.by_id = {i.item_id: i for i in self.catalog}
        self.workers: list[WorkerProcess] = []
        self.producer = EventProducer(settings)
        self.output = OutputReader(settings)

    def worker(self, name: str = "worker-0") -> WorkerProcess:
        w = WorkerProcess(self.settings, self.root / name, name).start()
        self.workers.append(w)
        return w


@contextmanager
def running_cluster(model_registry: Path, root: Path, **settings_overrides: Any) -> Iterator[Cluster]:
    """A broker with streamrec's topics, the sample catalogue published, and one running worker with these
    settings."""
    with EmbeddedBroker(log_path=root / "broker.log") as broker:
        settings = Settings(
            bootstrap_servers=broker.bootstrap,
            model_registry=model_registry,
            data_dir=root,
            **settings_overrides,
        )
        create_topics(settings)
        c = Cluster(settings, root)
        publish_catalog(c.producer, c.catalog)
        w = c.worker()
        w.wait_ready()
        w.wait_catalog(len(c.catalog), timeout_s=60)
        try:
            yield c
        finally:
            c.output.close()
            c.producer.close()
            for worker in c.workers:
                worker.stop()


@pytest.fixture(scope="module")
def cluster(model_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A broker with streamrec's topics, the sample catalogue published, and one running worker."""
    with running_cluster(model_registry, tmp_path_factory.mktemp("cluster")) as c:
        yield c
