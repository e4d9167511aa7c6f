"""``ReadToEnd``, the one loop that reads partitions to their ends (state restore, schema store, shadow,
replay, bench): done at each partition's end-of-partition report, a reader may finish a partition early,
and a read that stops moving fails after its timeout instead of waiting forever."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError, TopicPartition

from streamrec.streams import reading
from streamrec.streams.reading import ReadError, ReadToEnd


@dataclass
class Msg:
    _partition: int
    _offset: int
    _error: KafkaError | None = None

    def error(self) -> KafkaError | None:
        return self._error

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


def end(partition: int) -> Msg:
    return Msg(partition, -1, KafkaError(KafkaError._PARTITION_EOF))


class Consumer:
    """Hands out the scripted fetches in order, then nothing; records what was assigned and paused."""

    def __init__(self, fetches: list[list[Msg]]) -> None:
        self.fetches = deque(fetches)
        self.assigned: list[TopicPartition] = []
        self.paused: list[int] = []

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = partitions

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused += [tp.partition for tp in partitions]

    def consume(self, num_messages: int, timeout: float) -> list[Msg]:
        return self.fetches.popleft() if self.fetches else []


def offsets(batches: list[list[Msg]]) -> list[tuple[int, int]]:
    return [(m.partition(), m.offset()) for batch in batches for m in batch]


def test_each_partition_is_read_from_its_start_until_its_end_is_reported() -> None:
    consumer = Consumer([[Msg(0, 5), Msg(1, 0)], [end(1), Msg(0, 6)], [end(0)], [Msg(0, 7)]])
    got = list(ReadToEnd(consumer, "t", {0: 5, 1: 0}, timeout_s=1.0))  # type: ignore[arg-type]
    assert offsets(got) == [(0, 5), (1, 0), (0, 6)]  # nothing after both ends
    assert [(tp.topic, tp.partition, tp.offset) for tp in consumer.assigned] == [("t", 0, 5), ("t", 1, 0)]


def test_records_that_arrive_with_their_partitions_end_are_read_as_pending() -> None:
    consumer = Consumer([[Msg(0, 0), Msg(1, 0), end(1), Msg(0, 1), end(0)]])
    reader = ReadToEnd(consumer, "t", {0: 0, 1: 0}, timeout_s=1.0)  # type: ignore[arg-type]
    seen = []
    for batch in reader:
        seen += [(m.partition(), m.offset()) for m in batch if m.partition() in reader.pending]
    assert seen == [(0, 0), (1, 0), (0, 1)] and reader.pending == set()


def test_a_partition_the_reader_finishes_is_paused_and_its_later_records_dropped() -> None:
    consumer = Consumer([[Msg(0, 0), Msg(1, 0)], [Msg(0, 1), Msg(1, 1)], [end(1)]])
    reader = ReadToEnd(consumer, "t", {0: 0, 1: 0}, timeout_s=1.0)  # type: ignore[arg-type]
    seen = []
    for batch in reader:
        seen += [(m.partition(), m.offset()) for m in batch]
        reader.finish(0)
    assert seen == [(0, 0), (1, 0), (1, 1)] and consumer.paused == [0]


def test_nothing_to_read_assigns_nothing() -> None:
    consumer = Consumer([[Msg(0, 0)]])
    assert list(ReadToEnd(consumer, "t", {}, timeout_s=1.0)) == []  # type: ignore[arg-type]
    assert consumer.assigned == []


def test_a_read_without_progress_fails_after_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 1000, 10))  # every look at the clock is 10 s later
    monkeypatch.setattr(reading, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    consumer = Consumer([[Msg(0, 0)], [], [Msg(0, 1)], [], [], [], []])
    reader = ReadToEnd(consumer, "t", {0: 0}, timeout_s=25.0)  # type: ignore[arg-type]
    got = []
    with pytest.raises(ReadError, match=r"partitions \[0\] gave neither a record nor their end within 25 s"):
        for batch in reader:
            got += batch
    assert offsets([got]) == [(0, 0), (0, 1)], "each record restarts the timeout"


def test_an_error_other_than_a_partitions_end_fails_the_read_unless_the_client_retries_it() -> None:
    retried = Msg(-1, -1, KafkaError(KafkaError._TRANSPORT, retriable=True))
    consumer = Consumer([[retried, Msg(0, 0)], [end(0)]])
    assert offsets(list(ReadToEnd(consumer, "t", {0: 0}, timeout_s=1.0))) == [(0, 0)]  # type: ignore[arg-type]
    fatal = Msg(0, -1, KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
    with pytest.raises(ReadError, match=r"reading t\[0\]"):
        list(ReadToEnd(Consumer([[fatal]]), "t", {0: 0}, timeout_s=1.0))  # type: ignore[arg-type]
