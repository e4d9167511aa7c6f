"""Consumer lag: each partition's committed offset against its high watermark.

The high watermark is taken from a fetch, not from ListOffsets. The embedded broker answers ListOffsets
"latest" with the first offset of the partition's last batch + 1 (../shared/BROKER.md; measured: 1 for a
partition of 250 records written in one batch), which would hide nearly all of a lag. A fetch response carries
the true high watermark, and librdkafka caches it: ``high_watermarks`` starts reading one record before the
listed end (at or before the true end on either broker), reads to partition EOF and returns the cached value.
On Apache Kafka that reads one record per partition; on the embedded broker at most one batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from streamrec.settings import Settings
from streamrec.streams.kafka_security import client_config
from streamrec.streams.reading import consume_arrived

TP = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # the group's committed offset; None where it has committed nothing
    start: int  # the partition's first offset still held (low watermark)
    end: int  # the high watermark: the offset the next record will get

    @property
    def lag(self) -> int:
        """Records the group has not committed yet; without a commit, every record held (a new group reads
        from the start with ``auto.offset.reset=earliest``, as the event stage does)."""
        done = self.committed if self.committed is not None else self.start
        return max(0, self.end - max(done, self.start))


def lags(
    group: str, committed: Mapping[TP, int | None], ends: Mapping[TP, tuple[int, int]]
) -> list[PartitionLag]:
    """The lag of each partition in ``ends`` ((low, high) watermarks), sorted by topic and partition."""
    return [
        PartitionLag(group, topic, partition, committed.get((topic, partition)), low, high)
        for (topic, partition), (low, high) in sorted(ends.items())
    ]


def high_watermarks(
    consumer: Consumer, partitions: Iterable[TP], timeout_s: float = 10.0
) -> dict[TP, tuple[int, int]]:
    """(low, high) watermarks of each partition, the high one as a fetch reports it (see the module's doc).

    ``consumer`` is used with ``assign()`` and needs ``enable.partition.eof``; its assignment is replaced."""
    wanted = sorted(set(partitions))
    if not wanted:
        return {}
    listed = {tp: consumer.get_watermark_offsets(TopicPartition(*tp), timeout=timeout_s) for tp in wanted}
    consumer.assign([TopicPartition(t, p, max(low, high - 1)) for (t, p), (low, high) in listed.items()])
    pending = set(wanted)
    deadline = time.monotonic() + timeout_s
    try:
        while pending and time.monotonic() < deadline:
            for msg in consume_arrived(consumer, 10_000, 0.2):
                err = msg.error()
                # A record tells as much as the end: the fetch that brought it set the cached watermark.
                if err is None or err.code() == KafkaError._PARTITION_EOF:
                    pending.discard((msg.topic() or "", msg.partition() or 0))
        found = {}
        for tp in wanted:
            low, high = consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
            listed_low, listed_high = listed[tp]
            # no fetch answered (deadline): what ListOffsets said, a lower bound of the end
            found[tp] = (
                (listed_low, listed_high) if high < 0 else (max(low, listed_low), max(high, listed_high))
            )
        return found
    finally:
        consumer.unassign()


def committed_offsets(
    admin: AdminClient, group: str, partitions: Iterable[TP] | None = None, timeout_s: float = 10.0
) -> dict[TP, int]:
    """The group's committed offsets: of ``partitions``, or of every partition it has committed."""
    asked = [TopicPartition(t, p) for t, p in partitions] if partitions is not None else None
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, asked)])
    result = futures[group].result(timeout=timeout_s)
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions if tp.offset >= 0}


def group_names(admin: AdminClient, timeout_s: float = 10.0) -> list[str]:
    listed = admin.list_consumer_groups().result(timeout=timeout_s)
    return sorted(g.group_id for g in listed.valid)


class LagProbe:
    """An admin client and a group-less consumer kept for repeated measurements (a worker's /metrics every
    ``STREAMREC_LAG_CHECK_S``, `streamrec status --watch`). Not thread-safe: one caller at a time."""

    def __init__(self, settings: Settings, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self.admin = AdminClient(client_config(settings))
        self.consumer = Consumer(
            {
                **client_config(settings),
                "group.id": "streamrec-lag-probe",  # required by the client; assign() never joins it
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 20,  # an empty fetch is held for half of it on the embedded broker
                "client.id": "streamrec-lag-probe",
            }
        )

    def groups(self) -> list[str]:
        return group_names(self.admin, self.timeout_s)

    def ends(self, partitions: Iterable[TP]) -> dict[TP, tuple[int, int]]:
        return high_watermarks(self.consumer, partitions, self.timeout_s)

    def measure(self, group: str, partitions: Iterable[TP] | None = None) -> list[PartitionLag]:
        """The lag of ``group`` on ``partitions`` (default: every partition of the topics it has committed
        offsets on, those it has not committed on yet included)."""
        asked = list(partitions) if partitions is not None else None
        committed = committed_offsets(self.admin, group, asked, self.timeout_s)
        if asked is None:
            asked = self.partitions_of({topic for topic, _ in committed})
        return lags(group, committed, self.ends(asked))

    def partitions_of(self, topics: Iterable[str]) -> list[TP]:
        metadata = self.consumer.list_topics(timeout=self.timeout_s).topics
        return [
            (topic, p)
            for topic in sorted(set(topics))
            if (found := metadata.get(topic)) is not None and found.error is None
            for p in sorted(found.partitions)
        ]

    def close(self) -> None:
        self.consumer.close()
