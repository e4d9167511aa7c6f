"""Reading a topic without waiting for a batch to fill, and reading partitions to their ends."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition


def consume_arrived(consumer: Consumer, max_messages: int, timeout_s: float) -> list[Message]:
    """The records that have arrived, up to ``max_messages``, waiting up to ``timeout_s`` only while none has.
    ``Consumer.consume(n, timeout)`` returns once it has n records or the timeout (in 200 ms steps since
    confluent-kafka 2.13) has passed: on a topic slower than n per step, each record would wait for it, and a
    read to a topic's end would wait out the timeout for its last, short batch."""
    arrived: list[Message] = consumer.consume(num_messages=max_messages, timeout=0)
    if arrived:
        return arrived
    first: list[Message] = consumer.consume(num_messages=1, timeout=timeout_s)
    if first and max_messages > 1:
        first += consumer.consume(num_messages=max_messages - 1, timeout=0)
    return first


class ReadError(RuntimeError):
    """A partition being read to its end reported an error, or gave neither a record nor its end in time."""


class ReadToEnd:
    """Reads partitions of one topic from the given offsets to their ends; iterating yields the records of
    each fetch as they arrive (a list per fetch, never empty).

    A partition is done when the client reports its end, so the consumer needs ``enable.partition.eof``: the
    embedded broker's ListOffsets answer under-reports a partition's end (../shared/BROKER.md). A reader that
    wants no more of a partition calls ``finish``: the partition is paused, and its records, later in the
    same batch too, are not ``pending`` (a partition's end counts once its batch has been read).

    ``timeout_s`` bounds how long the read may go without progress, not its length: when neither a record
    nor a partition's end arrives for that long, iterating raises ReadError, and so it does on any error
    librdkafka does not retry by itself. No reader waits forever on a broker that went away, and a long
    changelog or replay that keeps moving is never cut short.
    """

    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        starts: Mapping[int, int],
        timeout_s: float,
        max_messages: int = 1000,
        poll_s: float = 0.5,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.starts = dict(starts)
        self.pending = set(self.starts)
        self.timeout_s = timeout_s
        self.max_messages = max_messages
        self.poll_s = min(poll_s, timeout_s)

    def finish(self, partition: int) -> None:
        """Read no more of ``partition``."""
        if partition in self.pending:
            self.pending.discard(partition)
            self.consumer.pause([TopicPartition(self.topic, partition)])

    def __iter__(self) -> Iterator[list[Message]]:
        if not self.pending:
            return
        # Assigning again, even at the same offsets, makes the client report each partition's end anew.
        self.consumer.assign([TopicPartition(self.topic, p, o) for p, o in self.starts.items()])
        progress_at = time.monotonic()
        while self.pending:
            arrived = consume_arrived(self.consumer, self.max_messages, self.poll_s)
            records, ended = [], []
            for msg in arrived:
                err = msg.error()
                partition = msg.partition()
                if err is None:
                    if partition in self.pending:
                        records.append(msg)
                elif err.code() == KafkaError._PARTITION_EOF:
                    ended.append(partition)
                elif not err.retriable():
                    raise ReadError(f"reading {self.topic}[{partition}]: {err.str()}")
            now = time.monotonic()
            if records or ended:
                progress_at = now
            elif now - progress_at > self.timeout_s:
                raise ReadError(
                    f"{self.topic}: partitions {sorted(self.pending)} gave neither a record nor their end "
                    f"within {self.timeout_s:.0f} s"
                )
            if records:
                yield records  # its partitions are all still pending: a reader checks ``pending`` as it goes
            self.pending.difference_update(ended)
