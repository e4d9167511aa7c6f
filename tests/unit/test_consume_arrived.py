"""A recommendation consumer reads a record as soon as it is there: ``consume_arrived`` never waits for a
batch to fill. ``Consumer.consume(n, timeout)`` waits until it has n records or the timeout has passed, so
on a topic slower than n per timeout every record would wait (the demo's latency p50 was ~200 ms from it)."""

from __future__ import annotations

from collections import deque
from typing import Any

from streamrec.streams.client import consume_arrived


class Topic:
    """A consumer on a topic where records arrive in bursts: ``consume`` behaves as librdkafka's does, and
    counts the seconds it would have blocked while fewer than the records asked for were there."""

    def __init__(self, present: list[str], later: list[list[str]]) -> None:
        self.present: deque[str] = deque(present)
        self.later = deque(later)
        self.blocked_s = 0.0

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        if len(self.present) < num_messages and timeout > 0:
            if self.later:
                self.present.extend(self.later.popleft())  # the next burst arrives while it waits
            if len(self.present) < num_messages:
                self.blocked_s += timeout  # and waits the rest out for a full batch
        return [self.present.popleft() for _ in range(min(num_messages, len(self.present)))]


def test_records_already_there_are_taken_without_waiting() -> None:
    topic = Topic(["r1", "r2"], [["r3"]])
    assert consume_arrived(topic, 500, 1.0) == ["r1", "r2"]
    assert topic.blocked_s == 0


def test_with_nothing_there_it_waits_for_the_first_record_only() -> None:
    topic = Topic([], [["r1", "r2"], ["r3"]])
    assert consume_arrived(topic, 500, 1.0) == ["r1", "r2"]
    assert topic.blocked_s == 0
    assert consume_arrived(topic, 500, 1.0) == ["r3"]
    assert consume_arrived(topic, 500, 1.0) == []
    assert topic.blocked_s == 1.0  # only an empty topic waits out the timeout


def test_at_most_the_records_asked_for() -> None:
    topic = Topic([f"r{i}" for i in range(5)], [])
    assert consume_arrived(topic, 3, 1.0) == ["r0", "r1", "r2"]
    assert consume_arrived(topic, 1, 1.0) == ["r3"]
