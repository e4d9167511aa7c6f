"""The clients against a real (embedded) broker: partitioning, schema publication, validation, delivery
failures, and reading recommendations back."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from typer.testing import CliRunner

from streamrec.cli import app
from streamrec.records import Recommendation, RecommendedItem
from streamrec.serde import AvroCodec, DecodeError, bundled_schemas, make_schema
from streamrec.settings import Settings
from streamrec.streams.broker import free_port
from streamrec.streams.client import DeliveryError, EventProducer, RecommendationConsumer
from streamrec.streams.schema_store import SchemaTopicResolver
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def java_murmur2(data: bytes) -> int:
    """org.apache.kafka.common.utils.Utils.murmur2, as an unsigned 32-bit value (reference for the test)."""
    m, r, mask = 0x5BD1E995, 24, 0xFFFFFFFF
    h = (0x9747B28C ^ len(data)) & mask
    whole = len(data) // 4
    for i in range(whole):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    tail = data[4 * whole :]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if len(tail) >= 1:
        h ^= tail[0]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


def java_partition(key: bytes, partitions: int) -> int:
    return (java_murmur2(key) & 0x7FFFFFFF) % partitions


def test_the_reference_murmur2_matches_kafkas_own_test_vectors() -> None:
    # From Kafka's UtilsTest (signed ints there).
    for key, expected in [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
    ]:
        assert java_murmur2(key) == expected & 0xFFFFFFFF


def read_all(settings: Settings, topic: str, timeout_s: float = 20.0) -> list[Message]:
    """Every record of a topic, read to partition EOF (ListOffsets is wrong on this broker)."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": "test-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        pending, found = set(partitions), []

        def drained() -> bool:
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error() is None:
                    found.append(msg)
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    pending.discard(msg.partition())
            return not pending

        wait_for(drained, timeout_s, interval_s=0, what=f"the end of {topic}")
        return found
    finally:
        consumer.close()


def test_a_user_lands_on_the_partition_the_java_client_would_choose(settings: Settings) -> None:
    users = [f"user-{i}" for i in range(200)] + ["ü-ñíçødé", "x", "ab", "abc"]
    with EventProducer(settings) as producer:
        for user in users:
            producer.click(user, "item-1")
    records = read_all(settings, settings.events_topic)
    assert len(records) == len(users)
    for msg in records:
        assert msg.partition() == java_partition(msg.key(), settings.partitions), msg.key()
    assert len({m.partition() for m in records}) == settings.partitions


def test_events_decode_into_what_was_sent_and_schemas_are_published_once(settings: Settings) -> None:
    with EventProducer(settings) as producer:
        click = producer.click("u1", "item-1", session_id="s1", context={"device": "mobile"})
        search = producer.search("u1", "rose serum")
        purchase = producer.purchase("u1", "item-1", 12.5, 2, currency="EUR")
        deletion = producer.delete_user("u1", requested_by="privacy-desk")
        producer.click("u2", "item-2")
        producer.upsert_item(item_id="item-1", title="Rose Serum", category="beauty/serum", price=12.5)
    codec = AvroCodec()
    events = [codec.decode(m.value()) for m in read_all(settings, settings.events_topic)]
    by_id = {record["event_id"]: (name, record) for name, record in events}
    assert by_id[click][0] == "ClickEvent" and by_id[click][1]["context"]["device"] == "mobile"
    assert by_id[search][1]["query"] == "rose serum"
    assert by_id[purchase][1]["price"] == 12.5 and by_id[purchase][1]["quantity"] == 2
    assert by_id[purchase][1]["currency"] == "EUR"
    assert by_id[deletion][0] == "UserDeletion" and by_id[deletion][1]["requested_by"] == "privacy-desk"
    (item,) = read_all(settings, settings.catalog_topic)
    assert item.key() == b"item-1" and codec.decode(item.value())[1]["title"] == "Rose Serum"
    published = read_all(settings, settings.schemas_topic)
    names = sorted(make_schema(json.loads(m.value())).name for m in published)
    assert names == ["CatalogItem", "ClickEvent", "PurchaseEvent", "SearchEvent", "UserDeletion"]
    assert all(m.key() == make_schema(json.loads(m.value())).fingerprint for m in published)


def test_prepare_publishes_the_event_schemas_before_any_event_and_only_once(settings: Settings) -> None:
    with EventProducer(settings) as producer:
        producer.prepare()
        names = sorted(
            make_schema(json.loads(m.value())).name for m in read_all(settings, settings.schemas_topic)
        )
        assert names == ["ClickEvent", "PurchaseEvent", "SearchEvent", "UserDeletion"]
        assert read_all(settings, settings.events_topic) == []
        producer.click("u1", "item-1")
        producer.prepare()
    assert len(read_all(settings, settings.schemas_topic)) == 4


def test_an_evolved_producer_registers_its_schema_and_another_reader_decodes_it(settings: Settings) -> None:
    bundled = bundled_schemas()
    definition = copy.deepcopy(bundled["ClickEvent"].definition)
    definition["fields"].append({"name": "campaign", "type": ["null", "string"], "default": None})
    evolved = make_schema(definition)
    record: dict[str, Any] = {
        "event_id": uuid.uuid4().hex,
        "user_id": "u1",
        "timestamp": 1_780_000_000_000,
        "item_id": "item-1",
        "campaign": "spring",
    }
    with EventProducer(settings, codec=AvroCodec({**bundled, "ClickEvent": evolved})) as producer:
        producer.send("ClickEvent", record, key="u1")

    (msg,) = read_all(settings, settings.events_topic)
    with pytest.raises(DecodeError, match="unknown_schema"):
        AvroCodec().decode(msg.value())  # a reader without the resolver cannot know the new version
    resolver = SchemaTopicResolver(settings)
    try:
        name, decoded = AvroCodec(resolver=resolver).decode(msg.value())
        assert name == "ClickEvent" and decoded == {k: v for k, v in record.items() if k != "campaign"} | {
            "session_id": None,
            "context": None,
        }
        assert resolver.reads == 1
        # Garbage with made-up fingerprints re-reads the topic at most once each per interval.
        for _ in range(50):
            assert resolver(b"\x00" * 8) is None
        assert resolver.reads == 2
    finally:
        resolver.close()


def test_a_schema_published_after_the_first_read_is_found(settings: Settings) -> None:
    resolver = SchemaTopicResolver(settings)
    try:
        resolver.refresh()
        assert resolver.known() == {}
        definition = copy.deepcopy(bundled_schemas()["SearchEvent"].definition)
        definition["fields"].append({"name": "results", "type": "int", "default": 0})
        newer = make_schema(definition)
        # Apache avro for Python fingerprints schemas with logical types differently: published under its own
        # key, the schema is found under both.
        alias = bytes(range(8))
        with EventProducer(settings) as producer:
            producer.send_raw(settings.schemas_topic, b"not-a-fingerprint", b"{not json")  # ignored
            producer.send_raw(settings.schemas_topic, alias, newer.json.encode())
            producer.send_raw(settings.schemas_topic, newer.fingerprint, b"{}")  # unreadable: ignored
        assert resolver(newer.fingerprint) == newer.json
        assert resolver(alias) == newer.json
    finally:
        resolver.close()


def test_invalid_records_raise_before_sending_and_never_reach_the_topic(settings: Settings) -> None:
    with EventProducer(settings) as producer:
        for bad in (
            lambda: producer.click("", "item-1"),
            lambda: producer.purchase("u1", "item-1", float("nan")),
            lambda: producer.purchase("u1", "item-1", 5.0, quantity=0),
            lambda: producer.search("u1", "shoes", timestamp=1_700_000_000),  # seconds
            lambda: producer.send("ClickEvent", {"user_id": "u1"}, key="u1"),
        ):
            with pytest.raises(ValueError):
                bad()
        good = producer.click("u1", "item-1")
    assert [
        AvroCodec().decode(m.value())[1]["event_id"] for m in read_all(settings, settings.events_topic)
    ] == [good]


def test_a_record_for_a_partition_that_does_not_exist_fails_at_flush(settings: Settings) -> None:
    producer = EventProducer(settings, config={"message.timeout.ms": 3000})
    producer.send_raw(settings.events_topic, b"u1", b"value", partition=settings.partitions + 5)
    with pytest.raises(DeliveryError) as raised:
        producer.flush(15)
    assert raised.value.failures and raised.value.failures[0].topic == settings.events_topic
    producer.flush(5)  # failures are reported once


def test_an_unreachable_broker_surfaces_as_delivery_error() -> None:
    settings = Settings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    producer = EventProducer(settings, config={"message.timeout.ms": 1000, "log_level": 0})
    producer.send_raw(settings.events_topic, b"u1", b"value")
    with pytest.raises(DeliveryError) as raised:
        producer.flush(15)
    assert len(raised.value.failures) == 1 and raised.value.failures[0].key == b"u1"
    with pytest.raises(DeliveryError):  # the schema must be acknowledged before the first event
        producer.click("u1", "item-1")


def recommendation(user: str, n: int = 3, publish_time: int = 1_780_000_000_250) -> Recommendation:
    items = [
        RecommendedItem(f"item-{i}", 1.0 - i / 8, "similar_to_recent", f"Because you viewed item-{i + 9}")
        for i in range(n)
    ]  # scores in eighths: exact in Avro's 32-bit float
    return Recommendation(user, items, "m-1", "ix-1", uuid.uuid4().hex, 1_780_000_000_000, publish_time)


def publish_recommendations(settings: Settings, recs: list[Recommendation], garbage: int = 0) -> None:
    with EventProducer(settings) as producer:
        for rec in recs:
            producer.send(
                "Recommendation", rec.to_avro(), key=rec.user_id, topic=settings.recommendations_topic
            )
        for _ in range(garbage):
            producer.send_raw(settings.recommendations_topic, b"u-bad", b"\xc3\x01garbage")


def test_the_consumer_yields_typed_recommendations_and_skips_garbage(settings: Settings) -> None:
    recs = [recommendation(f"u{i}") for i in range(20)]
    publish_recommendations(settings, recs, garbage=2)
    with RecommendationConsumer(settings, from_beginning=True) as consumer:
        got = list(consumer.iterate(idle_timeout_s=3.0))
        assert consumer.skipped == 2
    assert sorted(got, key=lambda r: r.cause_event_id) == sorted(recs, key=lambda r: r.cause_event_id)


def test_a_tail_from_the_end_sees_only_new_recommendations(settings: Settings) -> None:
    publish_recommendations(settings, [recommendation(f"old-{i}") for i in range(30)])
    with RecommendationConsumer(settings) as consumer:
        assert consumer.poll(1.0) is None
        new = [recommendation(f"new-{i}") for i in range(5)]
        publish_recommendations(settings, new)
        got: list[Recommendation] = []
        wait_for(lambda: got.extend(consumer.iterate(idle_timeout_s=0.5)) or len(got) >= 5, 20)
    assert sorted(r.user_id for r in got) == sorted(r.user_id for r in new)


def test_a_group_consumer_reads_and_commits(settings: Settings) -> None:
    recs = [recommendation(f"u{i}") for i in range(10)]
    publish_recommendations(settings, recs)
    group = f"g-{uuid.uuid4().hex[:8]}"
    with RecommendationConsumer(settings, group_id=group, from_beginning=True) as consumer:
        got: list[Recommendation] = []
        wait_for(lambda: got.extend(consumer.iterate(idle_timeout_s=1.0)) or len(got) >= 10, 30)
    assert {r.user_id for r in got} == {r.user_id for r in recs}


def test_registry_framing_end_to_end_with_the_in_process_registry(settings: Settings) -> None:
    registry = settings.model_copy(update={"schema_registry_url": f"mock://{uuid.uuid4().hex}"})
    recs = [recommendation(f"u{i}") for i in range(3)]
    publish_recommendations(registry, recs)
    raw = read_all(settings, settings.recommendations_topic)
    assert all(m.value()[:1] == b"\x00" for m in raw)
    assert read_all(settings, settings.schemas_topic) == []  # the registry holds the schemas instead
    with RecommendationConsumer(registry, from_beginning=True) as consumer:
        got = list(consumer.iterate(idle_timeout_s=2.0))
    assert sorted(r.user_id for r in got) == ["u0", "u1", "u2"]


def test_recs_tail_prints_recommendations(settings: Settings) -> None:
    publish_recommendations(
        settings, [recommendation("alice", publish_time=1_780_000_000_042), recommendation("bob")]
    )
    result = CliRunner().invoke(
        app,
        [
            "recs",
            "tail",
            "--from-beginning",
            "--user",
            "alice",
            "--limit",
            "1",
            "--idle-timeout",
            "10",
            "--bootstrap",
            settings.bootstrap_servers,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "alice" in result.output and "bob" not in result.output
    assert "latency 42 ms" in result.output and "Because you viewed item-9" in result.output
