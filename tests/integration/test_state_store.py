"""The RocksDB store restores exactly what its changelog holds (real broker, real RocksDB)."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Producer

from streamrec.settings import Settings
from streamrec.streams.state_store import StateStore

pytestmark = pytest.mark.integration


def write_through(store: StateStore, producer: Producer, settings: Settings, p: int, changes: dict) -> None:
    """What the event stage does: changelog first, local write with the delivered offset after."""
    offsets: list[int] = []
    for user, value in changes.items():
        producer.produce(
            settings.state_changelog_topic,
            key=user.encode(),
            value=value,
            partition=p,
            on_delivery=lambda err, msg: offsets.append(msg.offset()),
        )
    assert producer.flush(10) == 0
    store.write(p, changes, max(offsets))


def snapshot(store: StateStore, p: int, users: list[str]) -> dict[str, bytes | None]:
    return dict(zip(users, store.get_many(p, users), strict=True))


def test_lost_disk_and_lagging_checkpoint_both_restore_exactly(settings: Settings, tmp_path: Path) -> None:
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    store = StateStore(tmp_path / "a", settings.state_changelog_topic, settings.bootstrap_servers)
    store.assign([0, 1])
    users = [f"user-{n}" for n in range(3000)]
    for round_ in range(3):
        for p in (0, 1):
            write_through(store, producer, settings, p, {u: f"{u}:{round_}".encode() for u in users[p::2]})
    write_through(store, producer, settings, 0, {users[0]: None})  # an erased user
    expected = {p: snapshot(store, p, users) for p in (0, 1)}
    assert expected[0][users[0]] is None and expected[0][users[2]] == b"user-2:2"

    # A second worker with an empty disk takes over: it must restore everything from the changelog.
    other = StateStore(tmp_path / "b", settings.state_changelog_topic, settings.bootstrap_servers)
    other.assign([0, 1])
    assert {p: snapshot(other, p, users) for p in (0, 1)} == expected
    assert other.restored_records == 3 * 3000 + 1

    # The first worker gets partition 0 back after the other one wrote more: it catches up the tail only.
    store.revoke([0])
    write_through(other, producer, settings, 0, {users[2]: b"changed elsewhere"})
    before = store.restored_records
    store.assign([0])
    assert store.restored_records - before == 1
    assert store.get_many(0, [users[2]]) == [b"changed elsewhere"]
    store.close()
    other.close()
