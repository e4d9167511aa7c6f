"""Reading a topic without waiting for a batch to fill."""

from __future__ import annotations

from confluent_kafka import Consumer, Message


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
