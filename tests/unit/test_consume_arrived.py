"""A recommendation consumer reads a record as soon as it is there: ``consume_arrived`` never waits for a
batch to fill, and on the embedded broker its fetches are not held for librdkafka's default wait.
``Consumer.consume(n, timeout)`` waits until it has n records or the timeout has passed, so on a topic
slower than n per timeout every record would wait (the demo's latency p50 was ~200 ms from it)."""

from __future__ import annotations

from collections import deque
from typing import Any

from streamrec.settings import Settings
from streamrec.streams.client import EMBEDDED_FETCH_WAIT_MS, reader_config
from streamrec.streams.reading import consume_arrived


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


def test_a_reader_on_the_embedded_broker_fetches_with_a_short_wait_and_on_kafka_with_librdkafkas() -> None:
    embedded = Settings(bootstrap_servers="127.0.0.1:1", embedded_broker=True)
    kafka = Settings(bootstrap_servers="kafka:9092", embedded_broker=False)
    # the embedded broker holds an empty fetch for up to half its wait: librdkafka's 500 ms would be ~135 ms
    # on every recommendation's way to a consumer
    assert reader_config(embedded, None, from_beginning=False)["fetch.wait.max.ms"] == EMBEDDED_FETCH_WAIT_MS
    assert EMBEDDED_FETCH_WAIT_MS <= 20
    assert "fetch.wait.max.ms" not in reader_config(kafka, None, from_beginning=False)  # answered on arrival
    tail = reader_config(embedded, None, from_beginning=True)
    assert (tail["auto.offset.reset"], tail["enable.auto.commit"]) == ("earliest", False)  # never commits
    member = reader_config(kafka, "billing", from_beginning=False)
    assert (member["group.id"], member["auto.offset.reset"]) == ("billing", "latest")
    assert member["session.timeout.ms"] == kafka.session_timeout_ms
