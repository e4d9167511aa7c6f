"""Per-user state in RocksDB, one database per partition, backed by a compacted changelog topic.

The Kafka Streams design, kept small: every batch's changed states are produced to the changelog partition of
the same number, and only once they are delivered are they written locally together with the changelog offset
they reached (one write batch). On assignment a partition is restored from that checkpoint to the changelog's
end, so a worker that lost its disk, or a worker that takes over a partition, ends up with exactly the state
the changelog holds. The end is found by reading to partition EOF: the embedded broker's ListOffsets answer is
wrong (see BROKER.md).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from rocksdict import (
    BlockBasedOptions,
    BottommostLevelCompaction,
    Cache,
    CompactOptions,
    DBCompressionType,
    Options,
    Rdict,
    WriteBatch,
)

from streamrec.records import UserState
from streamrec.settings import Settings
from streamrec.state import StateBytes
from streamrec.streams.kafka_security import client_config
from streamrec.streams.reading import ReadError, ReadToEnd

log = logging.getLogger(__name__)

_USER = b"u:"
_ERASED = b"e:"  # + erasure_digest(user_id): when the user was erased (epoch ms, 8 bytes big-endian)
_CHECKPOINT = b"m:changelog-offset"
_PURGED = b"m:purged"  # written after a purge, to roll the manifest over (``purge``)
# The changelog key of an erasure marker: a prefix no user id has (ids have no control characters).
ERASURE_KEY = b"\x00erased:"
# Erasing a batch's users compacts each one's key range; more than this many compact the whole partition.
PURGE_KEYS_SEPARATELY = 64


def purge_keys(db: Rdict, keys: list[bytes], marker: bytes) -> None:
    """Leave nothing of these keys' earlier values in the database's files: the memtable goes to a table file
    (the write-ahead log that held them is then deleted), and the keys' tables are compacted down to the
    bottom level, which drops overwritten values and deletion markers; more than
    ``PURGE_KEYS_SEPARATELY`` keys compact the whole database once. Then ``marker`` is written and flushed:
    a new manifest starts with the files as they were before the change that rolled it over, key ranges
    included, and one more change rolls it past the compacted files now, not at the database's next flush
    (which a quiet partition may not have for a long time)."""
    if not keys:
        return
    db.flush(True)
    options = CompactOptions()
    options.set_bottommost_level_compaction(BottommostLevelCompaction.force())
    if len(keys) > PURGE_KEYS_SEPARATELY:
        db.compact_range(None, None, options)
    else:
        for key in keys:
            db.compact_range(key, key + b"\x00", options)
    db.put(marker, str(len(keys)).encode())
    db.flush(True)


def erasure_digest(user_id: str) -> bytes:
    """What an erasure marker keeps of a user id: a 16-byte hash, so neither RocksDB nor the changelog holds
    the id of a user who asked to be erased, yet their old events can still be recognised and refused."""
    return hashlib.blake2b(user_id.encode(), digest_size=16, person=b"streamrec-erase").digest()


def erasure_value(erased_at: int) -> bytes:
    return erased_at.to_bytes(8, "big", signed=True)


def erased_at_of(value: bytes | None) -> int:
    """The time in an erasure marker's value; 0 for none."""
    return int.from_bytes(value, "big", signed=True) if value else 0


class StoreError(RuntimeError):
    pass


class PartitionStore:
    """One partition's users. Keys are user ids, values the encoded UserState."""

    def __init__(self, path: Path, memtable_mb: int = 8, block_cache: Cache | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        # Every state write lands in the memtable first: RocksDB's 64 MB default, per partition, is memory
        # that grows with the events processed until the first flush.
        options.set_write_buffer_size(memtable_mb * 1024 * 1024)
        options.set_max_write_buffer_number(2)
        # zstd (level 3) instead of RocksDB's default Snappy: 1,117 -> 957 bytes per full state on disk
        # (docs/performance.md, round 16), for the CPU of compressing what flushes and compactions write.
        options.set_compression_type(DBCompressionType.zstd())
        table = BlockBasedOptions()
        if block_cache is not None:
            table.set_block_cache(block_cache)
        # A bloom filter per table file (10 bits a key, ~1% false positives): a new shopper's state and most
        # erasure markers are absent keys, which without it are looked for in every level's blocks. A
        # million shoppers: the state phase 107-110 -> 93 ms per 4,000-event batch (performance round 22).
        table.set_bloom_filter(10, False)
        options.set_block_based_table_factory(table)
        # The MANIFEST names the first and last key of every table file: rolled over at every change, it
        # never keeps an erased user's id once the tables that held it are compacted away (``purge``).
        options.set_max_manifest_file_size(1)
        self.path = path
        self.db = Rdict(str(path), options)

    @property
    def checkpoint(self) -> int | None:
        """The changelog offset of the last change held locally; None when nothing was restored yet."""
        raw = self.db.get(_CHECKPOINT)
        return int(raw) if raw is not None else None

    def get_many(self, user_ids: list[str]) -> list[bytes | None]:
        return self.read(user_ids, [])[0]

    def read(self, user_ids: list[str], erasures_of: list[str]) -> tuple[list[bytes | None], list[int]]:
        """The states of ``user_ids`` (None where absent) and when each of ``erasures_of`` was last erased
        (0: never), in one read."""
        if not user_ids and not erasures_of:
            return [], []
        keys: list[str | int | float | bytes | bool] = [_USER + u.encode() for u in user_ids]
        keys += [_ERASED + erasure_digest(u) for u in erasures_of]
        values = self.db[keys]
        assert isinstance(values, list)  # a list of keys reads a list (raw mode: bytes, None where absent)
        return values[: len(user_ids)], [erased_at_of(v) for v in values[len(user_ids) :]]

    def write(
        self,
        changes: dict[str, bytes | None],
        checkpoint: int | None,
        erasures: dict[bytes, int] | None = None,
    ) -> None:
        """Apply changes (None deletes the user), erasure markers (by ``erasure_digest``) and move the
        checkpoint, atomically."""
        batch = WriteBatch(raw_mode=True)
        for user_id, value in changes.items():
            key = _USER + user_id.encode()
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        for digest, erased_at in (erasures or {}).items():
            batch.put(_ERASED + digest, erasure_value(erased_at))
        if checkpoint is not None:
            batch.put(_CHECKPOINT, str(checkpoint).encode())
        self.db.write(batch)

    def purge(self, user_ids: list[str]) -> None:
        """Leave nothing of these users' earlier states in the partition's files (``purge_keys``)."""
        purge_keys(self.db, [_USER + user_id.encode() for user_id in user_ids], _PURGED)

    def close(self) -> None:
        self.db.close()


# A cached state: the state, its bytes, and when the user was last erased (0: never).
CachedState = tuple[UserState, StateBytes, int]


# What a cached state costs in memory, per byte of its encoding: a UserState, its history entries, strings and
# ints, and the StateBytes beside them took 9-13x the encoded size (tracemalloc, 5- to 3,000-event states
# of 0.2-3.6 KB; a test holds the estimate to the measurement).
CACHE_BYTES_PER_ENCODED_BYTE = 12


class StateCache:
    """Decoded states of recently active users (LRU) with their encoded parts, so an active user's state is
    neither read from RocksDB and decoded nor encoded in full again every micro-batch. It runs at most the
    delivery pipeline's depth of batches ahead of RocksDB: the stage puts a batch's states once it is
    published, before its delivery is settled, and drops everything when a delivery fails (states are
    updated in place) or partitions move.

    Bounded by users and by estimated memory (``CACHE_BYTES_PER_ENCODED_BYTE`` times the encoded size that
    ``put`` is given), whichever is reached first: long histories cannot take more than ``max_bytes``."""

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0  # estimated memory of the states held
        self._states: OrderedDict[tuple[int, str], tuple[CachedState, int]] = OrderedDict()

    def get(self, partition: int, user_id: str) -> CachedState | None:
        found = self._states.get((partition, user_id))
        return None if found is None else found[0]

    def drop(self, partition: int, user_id: str) -> None:
        old = self._states.pop((partition, user_id), None)
        if old is not None:
            self.bytes -= old[1]

    def put(self, partition: int, user_id: str, cached: CachedState, encoded_size: int) -> None:
        """Hold a state, ``encoded_size`` bytes long when encoded, as the most recently active."""
        key = (partition, user_id)
        self.drop(partition, user_id)
        if self.capacity <= 0:
            return
        cost = encoded_size * CACHE_BYTES_PER_ENCODED_BYTE
        self._states[key] = (cached, cost)
        self.bytes += cost
        while len(self._states) > self.capacity or (
            self.max_bytes is not None and self.bytes > self.max_bytes
        ):
            self.bytes -= self._states.popitem(last=False)[1][1]

    def clear(self) -> None:
        self._states.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._states)


class StateStore:
    """The partitions this worker currently owns, restored from and written through to the changelog."""

    def __init__(self, settings: Settings) -> None:
        """Under ``STREAMREC_DATA_DIR``/state, with the changelog topic, memtable and block cache of the
        settings, restored through a client that connects as all of streamrec's do."""
        self.settings = settings
        self.data_dir = settings.data_dir
        self.memtable_mb = settings.state_memtable_mb
        self.block_cache = Cache(settings.state_block_cache_mb * 1024 * 1024)  # one for all partitions
        self.changelog_topic = settings.state_changelog_topic
        self.partitions: dict[int, PartitionStore] = {}
        self.restored_records = 0

    def _path(self, partition: int) -> Path:
        return self.data_dir / "state" / f"p{partition}"

    def assign(self, partitions: Iterable[int]) -> None:
        """Open and restore each newly assigned partition before any of its events is processed."""
        new = [p for p in partitions if p not in self.partitions]
        for partition in new:
            self.partitions[partition] = PartitionStore(
                self._path(partition), self.memtable_mb, self.block_cache
            )
        if new:
            self._restore(new)

    def revoke(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            store = self.partitions.pop(partition, None)
            if store is not None:
                store.close()

    def close(self) -> None:
        self.revoke(list(self.partitions))

    def get_many(self, partition: int, user_ids: list[str]) -> list[bytes | None]:
        return self.partitions[partition].get_many(user_ids)

    def read(
        self, partition: int, user_ids: list[str], erasures_of: list[str]
    ) -> tuple[list[bytes | None], list[int]]:
        return self.partitions[partition].read(user_ids, erasures_of)

    def write(
        self,
        partition: int,
        changes: dict[str, bytes | None],
        checkpoint: int | None,
        erasures: dict[bytes, int] | None = None,
    ) -> None:
        self.partitions[partition].write(changes, checkpoint, erasures)

    def purge(self, partition: int, user_ids: list[str]) -> None:
        self.partitions[partition].purge(user_ids)

    def _restore(self, partitions: list[int], timeout_s: float = 60.0) -> None:
        """Read each partition's changelog from after its checkpoint to its end into RocksDB; a read that
        makes no progress for ``timeout_s`` fails (StoreError)."""
        started = time.monotonic()
        consumer = Consumer(
            {
                **client_config(self.settings),
                "group.id": "streamrec-restore",  # required by the client; assign() never joins it
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "fetch.max.bytes": 16 * 1024 * 1024,
            }
        )
        try:
            starts = {}
            for p in partitions:
                checkpoint = self.partitions[p].checkpoint
                starts[p] = (
                    OFFSET_BEGINNING if checkpoint is None else self._resume_at(consumer, p, checkpoint)
                )
            batches: dict[int, dict[str, bytes | None]] = {p: {} for p in partitions}
            markers: dict[int, dict[bytes, int]] = {p: {} for p in partitions}
            erased: dict[int, set[str]] = {p: set() for p in partitions}  # purged once restored
            last_offset: dict[int, int] = {}
            changelog = ReadToEnd(consumer, self.changelog_topic, starts, timeout_s, max_messages=10_000)
            for records in changelog:
                for msg in records:
                    key = msg.key()
                    if key is None:
                        continue
                    partition, offset = msg.partition(), msg.offset()
                    assert partition is not None and offset is not None  # set on every fetched record
                    value = msg.value()
                    if key.startswith(ERASURE_KEY):
                        markers[partition][key[len(ERASURE_KEY) :]] = erased_at_of(value)
                    else:
                        user_id = key.decode()
                        batches[partition][user_id] = value
                        if value is None:
                            erased[partition].add(user_id)
                    last_offset[partition] = offset
                    self.restored_records += 1
                for p, changes in batches.items():
                    if len(changes) + len(markers[p]) >= 5_000:
                        self.partitions[p].write(changes, last_offset[p], markers[p])
                        batches[p], markers[p] = {}, {}
            for p, changes in batches.items():
                if p in last_offset:
                    self.partitions[p].write(changes, last_offset[p], markers[p])
                self.partitions[p].purge(sorted(erased[p]))
        except ReadError as exc:
            raise StoreError(f"changelog restore of partitions {partitions}: {exc}") from exc
        finally:
            consumer.close()
        log.info("restored partitions %s in %.2fs", partitions, time.monotonic() - started)

    def _resume_at(self, consumer: Consumer, partition: int, checkpoint: int) -> int:
        """Where a partition's restore starts: after its checkpoint, or at the changelog's end if that is
        before it. A changelog that ends before the checkpoint lost records (an embedded broker restarted
        empty, a topic deleted and created again): the local state is newer, and the records written
        after the loss start there. The embedded broker, which never answers a fetch past a partition's end
        with OFFSET_OUT_OF_RANGE, would keep a read from the checkpoint waiting for records forever. Its
        end offset is under-reported by up to one batch (BROKER.md): a few records are read again, which
        changes nothing."""
        try:
            _, end = consumer.get_watermark_offsets(TopicPartition(self.changelog_topic, partition), 10.0)
        except KafkaException as exc:
            log.warning(
                "changelog end of partition %d unknown (%s): restoring from the checkpoint", partition, exc
            )
            return checkpoint + 1
        if end < checkpoint + 1:
            log.info(
                "changelog partition %d ends at %d, before the checkpoint %d", partition, end, checkpoint
            )
        return min(checkpoint + 1, max(end, 0))
