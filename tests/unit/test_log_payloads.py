"""Logs never show what users sent: the event stage's lines at info level and above name no user, item,
query or record bytes, for valid events and for every kind of rejected record; nor do the producer client's
lines about records it could not deliver (their keys are user ids)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError

from streamrec.catalog import Catalog
from streamrec.partitioner import partition_of
from streamrec.records import CatalogItem, RankedBatch, RecommendedItem, UserState
from streamrec.serde import AvroCodec
from streamrec.settings import Settings
from streamrec.streams.broker import free_port
from streamrec.streams.client import DeliveryError, EventProducer
from streamrec.streams.event_stage import EventStage
from streamrec.streams.state_store import PartitionStore

MARK = "Zq7payload"  # in every user id, item id, query and raw byte string the stage is given
PARTITIONS = 4


class Record:
    """A consumed message, as the stage reads it."""

    def __init__(self, topic: str, partition: int, offset: int, value: bytes, key: bytes | None) -> None:
        self._where = (topic, partition, offset)
        self._value, self._key = value, key

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def timestamp(self) -> tuple[int, int]:
        return (1, int(time.time() * 1000))

    def headers(self) -> None:
        return None


class InstantProducer:
    """Acknowledges every record on the next poll."""

    def __init__(self) -> None:
        self.reports: list[tuple[Callable[..., None], Record]] = []

    def produce(self, topic: str, value: bytes | None, key: bytes, partition: int, on_delivery: Any) -> None:
        self.reports.append((on_delivery, Record(topic, max(partition, 0), 0, value or b"", key)))

    def poll(self, timeout: float = 0) -> int:
        reports, self.reports = self.reports, []
        for callback, record in reports:
            callback(None, record)
        return len(reports)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0


class NoCommits:
    def commit(self, offsets: Any, asynchronous: bool) -> None:
        pass


class FirstItem:
    model_version = index_version = "log-test"

    def upsert_items(self, items: list[CatalogItem]) -> None:
        pass

    def rank(self, users: list[UserState], k: int) -> RankedBatch:
        return RankedBatch.of([[RecommendedItem(f"{MARK}-item-1", 1.0, "popular", "Popular")] for _ in users])

    def prepare(self, users: list[UserState], k: int) -> Callable[[], RankedBatch]:
        ranked = self.rank(users, k)
        return lambda: ranked


def batch(settings: Settings, codec: AvroCodec) -> list[Record]:
    """Valid clicks and searches, and one record of each way to be rejected, all carrying MARK."""
    now = int(time.time() * 1000)
    topic = settings.events_topic
    records: list[Record] = []

    def add(value: bytes, key: bytes | None, partition: int | None = None) -> None:
        p = partition_of(key, PARTITIONS) if partition is None and key is not None else (partition or 0)
        records.append(Record(topic, p, len(records), value, key))

    def click(user: str, item: str, **changes: Any) -> bytes:
        fields = {"event_id": uuid.uuid4().hex, "user_id": user, "timestamp": now, "item_id": item}
        return codec.encode("ClickEvent", fields | changes)

    user = f"{MARK}-user"
    add(click(user, f"{MARK}-item-1"), user.encode())
    search = {"event_id": uuid.uuid4().hex, "user_id": user, "timestamp": now, "query": f"{MARK} tent"}
    add(codec.encode("SearchEvent", search), user.encode())
    add(click(user, f"{MARK}-not-in-the-catalogue"), user.encode())  # unknown_item
    add(click(user, f"{MARK}-item-1", timestamp=now * 1000), user.encode())  # absurd_timestamp
    add(click(f"{MARK}-other", f"{MARK}-item-1"), user.encode())  # wrong_key
    add(click(user, f"{MARK}-item-1"), user.encode(), partition=(partition_of(user.encode(), 4) + 1) % 4)
    add(f"{MARK} not avro".encode(), user.encode())  # undecodable
    add(click(user, f"{MARK}-item-1")[:-3], user.encode())  # truncated
    add(b"\xc3\x01" + b"\x00" * 8 + MARK.encode(), user.encode())  # unknown_schema
    add(click(user, f"{MARK}-item-1", session_id=f"{MARK}\x00"), user.encode())  # invalid_record
    add(click(user, f"{MARK}-item-1") + MARK.encode() * 40_000, user.encode())  # too_large
    add(codec.encode("UserDeletion", {"event_id": "d1", "user_id": user, "timestamp": now}), user.encode())
    return records


def test_the_event_stage_logs_no_payload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=tmp_path, delivery_pipeline_depth=0, ranking_process=False)
    catalog = Catalog()
    catalog.upsert(CatalogItem(f"{MARK}-item-1", f"{MARK} title"))
    codec = AvroCodec()
    stage = EventStage(settings, catalog, FirstItem(), codec)
    stage._producer, stage._consumer = InstantProducer(), NoCommits()  # type: ignore[assignment]
    for p in range(PARTITIONS):
        stage.store.partitions[p] = PartitionStore(tmp_path / f"p{p}")
    stage._partition_count = PARTITIONS
    with caplog.at_level(logging.DEBUG):
        outcome = stage.process(batch(settings, codec))  # type: ignore[arg-type]
    assert outcome.events >= 2 and outcome.dead_letters >= 9 and outcome.deleted_users == 1  # all paths taken
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert not [r.getMessage() for r in shown if MARK in r.getMessage()]


def test_an_undelivered_record_is_logged_and_raised_without_its_key(caplog: pytest.LogCaptureFixture) -> None:
    producer = EventProducer(Settings(bootstrap_servers=f"127.0.0.1:{free_port()}"))
    failed = SimpleNamespace(
        topic=lambda: "streamrec.events",
        partition=lambda: 0,
        key=lambda: f"{MARK}-user".encode(),
        value=lambda: f"{MARK}-payload".encode(),
    )
    error = KafkaError(KafkaError._MSG_TIMED_OUT)
    with caplog.at_level(logging.DEBUG):
        producer._on_delivery(error, failed)  # type: ignore[arg-type]
    with pytest.raises(DeliveryError) as raised:
        producer.flush(0)
    producer.close(0)
    assert raised.value.failures[0].key == f"{MARK}-user".encode()  # the caller still has it
    assert raised.value.failures[0].value == f"{MARK}-payload".encode()  # and can send it again
    assert "streamrec.events[0]" in str(raised.value) and MARK not in str(raised.value)
    assert caplog.records and not [r for r in caplog.records if MARK in r.getMessage()]
