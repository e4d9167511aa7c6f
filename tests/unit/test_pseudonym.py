"""Pseudonyms at the edge: the documented keyed hash (a test vector any language can check), and a producer
client with a pseudonym key that never lets a raw user id reach Kafka, in a record or in its key."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrec.partitioner import partition_of
from streamrec.pseudonym import pseudonym
from streamrec.records import Event, EventKind
from streamrec.settings import Settings
from streamrec.streams.broker import free_port
from streamrec.streams.client import EventProducer, InvalidRecordError
from streamrec.streams.replay import KafkaSink, content_id, event_from_row, pseudonymous_content_id
from streamrec.validation import id_problem

# The test vector of docs/privacy.md and docs/contracts.md (also checked there by test_docs_give_the_vector).
VECTOR_KEY = "streamrec-pseudonym-test-vector-key-2026"
VECTOR = {
    "alice@example.com": "p-7e32fe801e674c207cf5b13085a5c813",
    "user-42": "p-927e5824d3bcfffb013a7f0930d89a88",
    "Zoë": "p-4b26be7da01f7ababff3e899acfe1e09",
}
ROOT = Path(__file__).resolve().parents[2]


def test_the_documented_test_vector() -> None:
    for raw, expected in VECTOR.items():
        assert pseudonym(VECTOR_KEY.encode(), raw) == expected


def test_docs_give_the_vector() -> None:
    for doc in ("docs/privacy.md", "docs/contracts.md"):
        text = (ROOT / doc).read_text()
        assert VECTOR_KEY in text, doc
        for raw, expected in VECTOR.items():
            assert raw in text and expected in text, (doc, raw)


keys = st.binary(min_size=32, max_size=64)
ids = st.text(min_size=1, max_size=64)


@given(keys, ids)
def test_a_pseudonym_is_the_hmac_prefix_and_a_valid_id(key: bytes, raw: str) -> None:
    made = pseudonym(key, raw)
    assert made == "p-" + hmac.new(key, raw.encode(), hashlib.sha256).hexdigest()[:32]
    assert re.fullmatch(r"p-[0-9a-f]{32}", made)
    assert id_problem("user_id", made, 34) is None  # accepted wherever ids are, at the smallest allowed limit
    assert pseudonym(key, raw) == made  # stable: the same user always lands on the same partition


@given(keys, st.lists(ids, min_size=2, max_size=20, unique=True))
def test_distinct_ids_get_distinct_pseudonyms(key: bytes, raws: list[str]) -> None:
    assert len({pseudonym(key, raw) for raw in raws}) == len(raws)


@given(st.lists(keys, min_size=2, max_size=5, unique=True), ids)
def test_another_key_gives_another_pseudonym(key_list: list[bytes], raw: str) -> None:
    assert len({pseudonym(key, raw) for key in key_list}) == len(key_list)


PSEUDONYM_KEY = "0123456789abcdef0123456789abcdef"  # 32 bytes: the shortest accepted


def key_settings(**changes: Any) -> Settings:
    return Settings(bootstrap_servers=f"127.0.0.1:{free_port()}", pseudonym_key=PSEUDONYM_KEY, **changes)


@pytest.fixture
def sent() -> list[tuple[str, bytes | None, bytes | None]]:
    return []


def recording(producer: EventProducer, sent: list[tuple[str, bytes | None, bytes | None]]) -> EventProducer:
    """Nothing listens on the producer's port: what it would send is recorded instead."""
    producer._produce = lambda topic, key, value, **_: sent.append((topic, key, value))  # type: ignore[method-assign]
    producer._ensure_published = lambda schema: None  # type: ignore[method-assign]
    return producer


@pytest.fixture
def keyed(sent: list[tuple[str, bytes | None, bytes | None]]) -> Iterator[EventProducer]:
    producer = recording(EventProducer(key_settings()), sent)
    yield producer
    producer._producer.close()


def decoded(producer: EventProducer, value: bytes | None) -> dict[str, Any]:
    assert value is not None
    return producer.codec.decode(value)[1]


def test_no_raw_id_leaves_a_pseudonymising_producer(
    keyed: EventProducer, sent: list[tuple[str, bytes | None, bytes | None]]
) -> None:
    raw = "alice@example.com"
    expected = pseudonym(PSEUDONYM_KEY.encode(), raw)
    assert keyed.pseudonymises and keyed.sent_user_id(raw) == expected
    keyed.click(raw, "sku-1")
    keyed.search(raw, "tent")
    keyed.purchase(raw, "sku-1", 9.5)
    keyed.send_event(
        Event(event_id="e1", user_id=raw, kind=EventKind.CLICK, timestamp=0, item_id="sku-2"), historical=True
    )
    keyed.delete_user(raw)
    assert len(sent) == 5
    for _, key, value in sent:
        assert key == expected.encode()  # so the partition is the pseudonym's, as the worker checks
        assert decoded(keyed, value)["user_id"] == expected
        assert raw.encode() not in (value or b"") and raw.encode() not in (key or b"")
    assert partition_of(expected.encode(), 4) == partition_of(sent[0][1] or b"", 4)


def test_a_raw_id_is_checked_before_it_is_hashed(keyed: EventProducer) -> None:
    for bad in ("", "   ", "a\x00b", "x" * 300):
        with pytest.raises(InvalidRecordError, match="user_id"):
            keyed.click(bad, "sku-1")
        with pytest.raises(InvalidRecordError, match="user_id"):
            keyed.delete_user(bad)


def test_without_a_key_or_when_told_not_to_ids_go_as_given(
    sent: list[tuple[str, bytes | None, bytes | None]],
) -> None:
    plain = recording(EventProducer(Settings(bootstrap_servers=f"127.0.0.1:{free_port()}")), sent)
    told = recording(EventProducer(key_settings(), pseudonymise=False), sent)
    for producer in (plain, told):
        assert not producer.pseudonymises
        producer.click("p-already-a-pseudonym", "sku-1")
        producer._producer.close()
    assert [key for _, key, _ in sent] == [b"p-already-a-pseudonym"] * 2
    with pytest.raises(ValueError, match="STREAMREC_PSEUDONYM_KEY"):
        EventProducer(Settings(), pseudonymise=True)


def test_a_key_is_refused_when_short_or_when_ids_could_not_hold_a_pseudonym(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shorter than 32 bytes"):
        Settings(pseudonym_key="too-short")
    with pytest.raises(ValueError, match="STREAMREC_MAX_ID_BYTES must be at least 34"):
        Settings(pseudonym_key=PSEUDONYM_KEY, max_id_bytes=20)
    (tmp_path / "key").write_text(PSEUDONYM_KEY + "\n")
    from_file = Settings(pseudonym_key_file=tmp_path / "key")
    assert from_file.pseudonym_key is not None and from_file.pseudonym_key.get_secret_value() == PSEUDONYM_KEY


def test_replay_hashes_files_raw_ids_but_not_what_kafka_already_holds(
    monkeypatch: pytest.MonkeyPatch, sent: list[tuple[str, bytes | None, bytes | None]]
) -> None:
    settings = key_settings()
    row = {"user_id": "alice@example.com", "item_id": "sku-1", "timestamp": 1_704_164_645_000}
    event = event_from_row(row)  # no id in the row: one derived from its content
    for raw_ids in (True, False):
        sink = KafkaSink(settings, settings.backfill_topic, raw_ids=raw_ids)
        recording(sink.producer, sent)
        sink.send(event)
        sink.close()
    (_, hashed_key, hashed), (_, kept_key, kept) = sent
    record = decoded(sink.producer, hashed)
    alias = pseudonym(PSEUDONYM_KEY.encode(), "alice@example.com")
    assert hashed_key == alias.encode() and record["user_id"] == alias
    # The derived id is the pseudonym's: one hashed from the raw id would let a guess be tested against it.
    assert record["event_id"] == content_id(alias, EventKind.CLICK, "sku-1", row["timestamp"])
    assert record["event_id"] != event.event_id
    assert kept_key == b"alice@example.com" and decoded(sink.producer, kept)["event_id"] == event.event_id


def test_an_id_the_row_gave_is_kept() -> None:
    given_id = event_from_row({"user": "7", "sku": "p1", "ts": 1_704_164_645, "event_id": "order-1"})
    assert pseudonymous_content_id(given_id, "p-0") is given_id
