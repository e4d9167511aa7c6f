"""Which partition a key belongs on: Kafka's default partitioner for keyed records, which librdkafka calls
``murmur2_random`` and the Java client, kafkajs and faust use. The worker checks each event against it, so a
user's state never splits across partitions whatever a producer in another language does."""

from __future__ import annotations

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """MurmurHash2 as Kafka computes it (``org.apache.kafka.common.utils.Utils.murmur2``), as an unsigned
    32-bit value."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    end = length - length % 4
    for i in range(0, end, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    extra = length - end
    if extra == 3:
        h ^= data[end + 2] << 16
    if extra >= 2:
        h ^= data[end + 1] << 8
    if extra >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of a keyed record among ``partitions``: the positive 31 bits of murmur2, modulo."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
