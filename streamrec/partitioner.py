"""Which partition a key belongs on: Kafka's default partitioner for keyed records, which librdkafka calls
``murmur2_random`` and the Java client, kafkajs and faust use. The worker checks each event against it, so a
user's state never splits across partitions whatever a producer in another language does."""

from __future__ import annotations

from typing import Final

from mypy_extensions import i64

_SEED: Final = 0x9747B28C
_M: Final = 0x5BD1E995
_MASK: Final = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """MurmurHash2 as Kafka computes it (``org.apache.kafka.common.utils.Utils.murmur2``), as an unsigned
    32-bit value. Native 64-bit integers when compiled: every product of two 32-bit values fits."""
    length: i64 = len(data)
    h: i64 = (_SEED ^ length) & _MASK
    end: i64 = length - length % 4
    i: i64 = 0
    while i < end:
        k: i64 = i64(data[i]) | (i64(data[i + 1]) << 8) | (i64(data[i + 2]) << 16) | (i64(data[i + 3]) << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
        i += 4
    extra: i64 = length - end
    if extra == 3:
        h ^= i64(data[end + 2]) << 16
    if extra >= 2:
        h ^= i64(data[end + 1]) << 8
    if extra >= 1:
        h ^= i64(data[end])
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return int(h)


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of a keyed record among ``partitions``: the positive 31 bits of murmur2, modulo."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
