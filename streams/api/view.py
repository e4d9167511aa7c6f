"""The API's view: each user's newest recommendation and state, and the catalogue, in one RocksDB.

| key | value |
|---|---|
| ``r:`` user id | the newest recommendation, as the JSON the API answers (its age is added per request) |
| ``s:`` user id | the user's state as the worker's changelog holds it (schemaless Avro of UserState) |
| ``i:`` item id | a catalogue item's title, category, price, stock and ``updated_at``, as JSON |
| ``e:`` digest | when a user was erased (8 bytes); keyed by ``erasure_digest``, never by the id itself |
| ``o:`` topic NUL partition | the next offset of that partition to read |

Each slice of records is written in one write batch together with the offsets it reached: a restarted
replica goes on from where its view stands, and one that lost its directory rebuilds it from the topics.

Erasure. The worker writes a tombstone for an erased user on the state changelog, and then an erasure marker
(the id's digest and the erasure time). The view drops the user's recommendation and state at the tombstone,
and refuses every recommendation caused by an event no later than the erasure, whenever it arrives: the
recommendations topic is read beside the changelog, not in step with it. Until the marker gives the exact
time, the tombstone's own timestamp stands in for it. A tombstone on the recommendations topic (key = user
id, no value) also drops the user's recommendation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from rocksdict import Options, Rdict, WriteBatch

from streamrec.records import CatalogItem
from streamrec.serde import Codec, DecodeError
from streamrec.streams.state_store import (
    ERASURE_KEY,
    erased_at_of,
    erasure_digest,
    erasure_value,
    purge_keys,
)

log = logging.getLogger(__name__)

REC, STATE, ITEM, ERASED, OFFSET = b"r:", b"s:", b"i:", b"e:", b"o:"
PURGED = b"m:purged"  # written after a purge, to roll the manifest over (``View.purge``)


class Record(NamedTuple):
    """One record read from a topic (a confluent-kafka Message's fields)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int  # epoch ms: when its producer wrote it


@dataclass
class ViewBatch:
    """What one slice of records changes (None deletes), written atomically with the offsets it reached."""

    recommendations: dict[str, bytes | None] = field(default_factory=dict)
    states: dict[str, bytes | None] = field(default_factory=dict)
    items: dict[str, bytes | None] = field(default_factory=dict)
    erasures: dict[bytes, int] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    erased: list[str] = field(default_factory=list)  # users whose earlier values are purged from the files
    delays_ms: list[int] = field(default_factory=list)  # of each recommendation: written -> in the view
    skipped: int = 0  # records that could not be decoded (logged)


def _offset_key(topic: str, partition: int) -> bytes:
    return OFFSET + topic.encode() + b"\x00" + str(partition).encode()


class View:
    """The RocksDB database of one API replica. Reads are thread-safe; one writer."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_max_manifest_file_size(1)  # as the worker's: no erased id outlives a compaction (purge)
        self.path = path
        self.db = Rdict(str(path), options)

    def recommendation(self, user_id: str) -> bytes | None:
        return self.db.get(REC + user_id.encode())

    def state(self, user_id: str) -> bytes | None:
        return self.db.get(STATE + user_id.encode())

    def items(self, item_ids: list[str]) -> list[bytes | None]:
        if not item_ids:
            return []
        found = self.db[[ITEM + i.encode() for i in item_ids]]
        assert isinstance(found, list)  # a list of keys reads a list (raw mode: bytes, None where absent)
        return found

    def erased_at(self, digest: bytes) -> int:
        return erased_at_of(self.db.get(ERASED + digest))

    def offsets(self) -> dict[tuple[str, int], int]:
        """The next offset to read of every partition read so far."""
        found = {}
        for key, value in self.db.items(from_key=OFFSET):
            assert isinstance(key, bytes) and isinstance(value, bytes)  # raw mode
            if not key.startswith(OFFSET):
                break
            topic, _, partition = key[len(OFFSET) :].partition(b"\x00")
            found[(topic.decode(), int(partition))] = int(value)
        return found

    def write(self, batch: ViewBatch) -> None:
        writes = WriteBatch(raw_mode=True)
        for prefix, changes in ((REC, batch.recommendations), (STATE, batch.states), (ITEM, batch.items)):
            for name, value in changes.items():
                if value is None:
                    writes.delete(prefix + name.encode())
                else:
                    writes.put(prefix + name.encode(), value)
        for digest, erased_at in batch.erasures.items():
            writes.put(ERASED + digest, erasure_value(erased_at))
        for (topic, partition), offset in batch.offsets.items():
            writes.put(_offset_key(topic, partition), str(offset).encode())
        self.db.write(writes)
        if batch.erased:
            self.purge(batch.erased)

    def purge(self, user_ids: list[str]) -> None:
        """Leave nothing of these users' earlier values in the files, as the worker's state store does."""
        purge_keys(self.db, [prefix + u.encode() for u in user_ids for prefix in (REC, STATE)], PURGED)

    def close(self) -> None:
        self.db.close()


@dataclass(frozen=True)
class ViewTopics:
    recommendations: str
    changelog: str
    catalog: str


def recommendation_json(record: dict[str, Any]) -> bytes:
    """What the API answers for a recommendation, less its age: the fields as the schema names them."""
    return orjson.dumps(record)


def item_json(item: CatalogItem) -> bytes:
    return orjson.dumps(
        {
            "title": item.title,
            "category": item.category,
            "price": item.price,
            "in_stock": item.in_stock,
            "updated_at": item.updated_at,
        }
    )


class ViewUpdater:
    """Turns slices of records from the three topics into ``ViewBatch``es, reading the view where a decision
    needs what it holds (an erasure time, an item's ``updated_at``)."""

    def __init__(self, view: View, codec: Codec, topics: ViewTopics) -> None:
        self.view = view
        self.codec = codec
        self.topics = topics
        # tombstones whose erasure marker has not come yet: digest -> user id (the marker has no id)
        self._awaiting_marker: dict[bytes, str] = {}

    def batch(self, records: list[Record], now_ms: int) -> ViewBatch:
        out = ViewBatch()
        changelog = self.topics.changelog
        # The changelog first: an erasure in this slice governs the recommendations read beside it. The
        # sort is stable, so each partition's records keep their order.
        for record in sorted(records, key=lambda r: r.topic != changelog):
            out.offsets[(record.topic, record.partition)] = record.offset + 1
            if record.key is None:
                continue
            try:
                if record.topic == changelog:
                    self._state(out, record)
                elif record.topic == self.topics.recommendations:
                    self._recommendation(out, record, now_ms)
                elif record.topic == self.topics.catalog:
                    self._item(out, record)
            except (DecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                out.skipped += 1
                log.warning(
                    "skipping %s[%d]@%d: %s",
                    record.topic,
                    record.partition,
                    record.offset,
                    exc,
                    extra={"topic": record.topic, "partition": record.partition},
                )
        return out

    def _erased_at(self, out: ViewBatch, digest: bytes) -> int:
        found = out.erasures.get(digest)
        return found if found is not None else self.view.erased_at(digest)

    def _state(self, out: ViewBatch, record: Record) -> None:
        assert record.key is not None
        if record.key.startswith(ERASURE_KEY):
            digest = record.key[len(ERASURE_KEY) :]
            erased_at = erased_at_of(record.value)
            out.erasures[digest] = erased_at  # exact: replaces the tombstone's stand-in
            user_id = self._awaiting_marker.pop(digest, None)
            if user_id is not None:
                self._drop_if_caused_before(out, user_id, erased_at)
            return
        user_id = record.key.decode()
        if record.value is not None:
            out.states[user_id] = record.value
            return
        digest = erasure_digest(user_id)
        out.states[user_id] = None
        out.recommendations[user_id] = None
        out.erasures[digest] = max(self._erased_at(out, digest), record.timestamp)
        out.erased.append(user_id)
        self._awaiting_marker[digest] = user_id

    def _drop_if_caused_before(self, out: ViewBatch, user_id: str, erased_at: int) -> None:
        """A recommendation taken between a tombstone and its marker, caused before the erasure, goes."""
        if user_id in out.recommendations:
            current = out.recommendations[user_id]
        else:
            current = self.view.recommendation(user_id)
        if current is not None and orjson.loads(current)["event_time"] <= erased_at:
            out.recommendations[user_id] = None

    def _recommendation(self, out: ViewBatch, record: Record, now_ms: int) -> None:
        assert record.key is not None
        if record.value is None:
            out.recommendations[record.key.decode()] = None
            return
        _, rec = self.codec.decode(record.value, accept=("Recommendation",))
        user_id = rec["user_id"]
        if rec["event_time"] <= self._erased_at(out, erasure_digest(user_id)):
            return  # caused by an event no later than the user's erasure
        out.recommendations[user_id] = recommendation_json(rec)
        out.delays_ms.append(now_ms - record.timestamp)

    def _item(self, out: ViewBatch, record: Record) -> None:
        assert record.key is not None
        item_id = record.key.decode()
        if record.value is None:
            out.items[item_id] = None
            return
        _, fields = self.codec.decode(record.value, accept=("CatalogItem",))
        item = CatalogItem.from_avro(fields)
        held = out.items[item_id] if item_id in out.items else self.view.items([item_id])[0]
        if held is not None and item.updated_at and orjson.loads(held)["updated_at"] > item.updated_at:
            return  # the newest updated_at wins, as in the workers' catalogue (0: unknown, arrival decides)
        out.items[item_id] = item_json(item)
