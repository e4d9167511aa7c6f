"""Keeps the API's view up to date: reads the recommendations, state changelog and catalogue topics.

Every replica reads every partition (``assign()``, no consumer group): each holds the whole view, so any
replica answers for any user, and replicas come and go without a rebalance. Reading starts where the view's
own offsets say, or at each partition's beginning for a new view. A replica is ready once every partition
has been read to its end once (partition EOF: the embedded broker's ListOffsets answer cannot be trusted).

``poll`` takes only what the client has already fetched (librdkafka fetches in its own threads), so the
caller, the API's event loop, is never blocked by the network.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from streamrec.serde import Codec
from streamrec.settings import Settings
from streamrec.streams.api.metrics import ApiMetrics
from streamrec.streams.api.view import Record, View, ViewTopics, ViewUpdater
from streamrec.streams.client import EMBEDDED_FETCH_WAIT_MS, TopicNotReadable
from streamrec.streams.kafka_security import client_config

log = logging.getLogger(__name__)


def view_topics(settings: Settings) -> ViewTopics:
    return ViewTopics(settings.recommendations_topic, settings.state_changelog_topic, settings.catalog_topic)


class ViewFollower:
    def __init__(self, settings: Settings, view: View, codec: Codec, metrics: ApiMetrics) -> None:
        self.settings = settings
        self.view = view
        self.metrics = metrics
        self.topics = view_topics(settings)
        self.updater = ViewUpdater(view, codec, self.topics)
        config: dict[str, object] = {
            "group.id": "streamrec-api",  # required by the client; assign() never joins it
            "client.id": "streamrec-api",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "queued.max.messages.kbytes": 16_384,
        }
        if settings.embedded_broker:
            config["fetch.wait.max.ms"] = EMBEDDED_FETCH_WAIT_MS  # it holds an empty fetch for half the wait
        self.consumer = Consumer(client_config(settings) | config)
        self.partitions: list[tuple[str, int]] = []
        self.not_caught_up: set[tuple[str, int]] = set()
        self.started = time.monotonic()
        self.caught_up_s: float | None = None  # seconds from start to the end of every partition
        self.records = 0

    def start(self, timeout_s: float = 10.0) -> None:
        """Assign every partition of the three topics, from the view's offsets; TopicNotReadable when a topic
        is missing (`streamrec topics create` makes them)."""
        metadata = self.consumer.list_topics(timeout=timeout_s).topics
        offsets = self.view.offsets()
        assignment = []
        for topic in (self.topics.recommendations, self.topics.changelog, self.topics.catalog):
            found = metadata.get(topic)
            if found is None or found.error is not None or not found.partitions:
                raise TopicNotReadable(f"topic {topic} is not readable: run `streamrec topics create`")
            for p in sorted(found.partitions):
                self.partitions.append((topic, p))
                assignment.append(TopicPartition(topic, p, offsets.get((topic, p), OFFSET_BEGINNING)))
        self.not_caught_up = set(self.partitions)
        self.consumer.assign(assignment)
        log.info("following %d partitions from %d stored offsets", len(assignment), len(offsets))

    @property
    def ready(self) -> bool:
        return not self.not_caught_up

    def poll(self, max_records: int) -> int:
        """Apply what has arrived, up to ``max_records``; returns how many records were taken."""
        msgs = self.consumer.consume(num_messages=max_records, timeout=0)
        if not msgs:
            return 0
        records = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                records.append(
                    Record(
                        msg.topic(),  # type: ignore[arg-type]  # set on every fetched record
                        msg.partition(),  # type: ignore[arg-type]
                        msg.offset(),  # type: ignore[arg-type]
                        msg.key(),
                        msg.value(),
                        msg.timestamp()[1],
                    )
                )
            elif err.code() == KafkaError._PARTITION_EOF:
                self._reached_end((msg.topic() or "", msg.partition() or 0))
            else:
                log.warning("reading %s: %s", msg.topic(), err.str())
        if records:
            batch = self.updater.batch(records, int(time.time() * 1000))
            self.view.write(batch)
            self.records += len(records)
            self.metrics.applied(records, batch, delays=self.ready)  # a restore's records are history
        return len(msgs)

    def _reached_end(self, partition: tuple[str, int]) -> None:
        if partition in self.not_caught_up:
            self.not_caught_up.discard(partition)
            if not self.not_caught_up:
                self.caught_up_s = time.monotonic() - self.started
                self.metrics.ready.set(1)
                log.info(
                    "view caught up with %d partitions in %.1f s", len(self.partitions), self.caught_up_s
                )

    def lag(self) -> dict[str, int]:
        """Records not yet in the view, by topic: each partition's high watermark as the last fetch reported
        it, less the position read to (a lower bound until a partition's first fetch)."""
        behind: dict[str, int] = {}
        tps = [TopicPartition(t, p) for t, p in self.partitions]
        for tp in self.consumer.position(tps) if tps else []:
            _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            ahead = high - tp.offset if high >= 0 and tp.offset >= 0 else 0
            behind[tp.topic] = behind.get(tp.topic, 0) + max(0, ahead)
        return behind

    def close(self) -> None:
        self.consumer.close()
