"""The worker's partitioner check matches Kafka's default partitioner for keyed records: the Java client's
test vectors here, librdkafka's murmur2_random on a real broker in tests/integration/test_worker_faults.py."""

from __future__ import annotations

import pytest

from streamrec.partitioner import murmur2, partition_of


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_is_kafkas(key: bytes, expected: int) -> None:
    """org.apache.kafka.common.utils.UtilsTest.testMurmur2, as signed 32-bit values."""
    signed = murmur2(key) - (1 << 32) if murmur2(key) >= 1 << 31 else murmur2(key)
    assert signed == expected


def test_partitions_are_the_positive_hash_modulo_the_count() -> None:
    assert partition_of(b"21", 4) == (-973932308 & 0x7FFFFFFF) % 4
    assert {partition_of(f"user-{n}".encode(), 4) for n in range(100)} == {0, 1, 2, 3}
