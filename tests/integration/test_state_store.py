"""The RocksDB store restores exactly what its changelog holds (real broker, real RocksDB)."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Producer

from streamrec.settings import Settings
from streamrec.streams.state_store import ERASURE_KEY, StateStore, erasure_digest, erasure_value

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
    store = StateStore(settings.model_copy(update={"data_dir": tmp_path / "a"}))
    store.assign([0, 1])
    users = [f"user-{n}" for n in range(3000)]
    for round_ in range(3):
        for p in (0, 1):
            write_through(store, producer, settings, p, {u: f"{u}:{round_}".encode() for u in users[p::2]})
    write_through(store, producer, settings, 0, {users[0]: None})  # an erased user
    expected = {p: snapshot(store, p, users) for p in (0, 1)}
    assert expected[0][users[0]] is None and expected[0][users[2]] == b"user-2:2"

    # A second worker with an empty disk takes over: it must restore everything from the changelog.
    other = StateStore(settings.model_copy(update={"data_dir": tmp_path / "b"}))
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


def test_an_erased_user_is_restored_as_a_marker_and_no_file_keeps_their_id(
    settings: Settings, tmp_path: Path
) -> None:
    """A worker that held a user's state and catches up with the changelog's tail, where the user was erased
    meanwhile (a restart after kill -9), ends with the marker and no trace of the id in its files."""
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    source = StateStore(settings.model_copy(update={"data_dir": tmp_path / "a"}))
    source.assign([0])
    erased = "erased-user-0042"
    others = {f"user-{n}": f"state of user-{n}".encode() for n in range(3000)}
    write_through(source, producer, settings, 0, {erased: f"state of {erased}".encode(), **others})

    restarted = StateStore(settings.model_copy(update={"data_dir": tmp_path / "b"}))
    restarted.assign([0])
    assert restarted.get_many(0, [erased]) == [f"state of {erased}".encode()]
    restarted.revoke([0])  # down for a while: the user is erased meanwhile
    write_through(source, producer, settings, 0, {erased: None})
    marker = ERASURE_KEY + erasure_digest(erased)
    producer.produce(settings.state_changelog_topic, key=marker, value=erasure_value(1234), partition=0)
    assert producer.flush(10) == 0
    source.close()

    restarted.assign([0])
    states, erased_at = restarted.read(0, [erased, "user-7"], [erased, "user-7"])
    assert states == [None, b"state of user-7"] and erased_at == [1234, 0]
    files = [p for p in (tmp_path / "b").rglob("*") if p.is_file()]
    assert files and not [p.name for p in files if erased.encode() in p.read_bytes()]
    restarted.close()
