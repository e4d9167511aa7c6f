"""What an outside fault probe broke, held against a real broker and real worker processes: records of a
megabyte, restarts on the worker's own disk, events keyed or placed wrongly, the web server's exposure, and
erasure that must stay erasure."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from streamrec.partitioner import partition_of
from streamrec.serde import AvroCodec, avro_long
from streamrec.streams.client import EventProducer
from streamrec.streams.process import WorkerProcess
from tests.conftest import wait_for
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration


def user() -> str:
    return f"fault-{uuid.uuid4().hex[:10]}"


def now_ms() -> int:
    return int(time.time() * 1000)


def item_ids(cluster: Cluster, n: int) -> list[str]:
    return [i.item_id for i in cluster.catalog if i.in_stock][:n]


def click_record(u: str, item: str, **override: object) -> dict:
    return {"event_id": uuid.uuid4().hex, "user_id": u, "timestamp": now_ms(), "item_id": item, **override}


def letters(cluster: Cluster, where: str) -> list[dict]:
    """Dead letters whose key, detail or coordinates mention ``where`` (a user id or a marker)."""
    found = []
    for d in list(cluster.output.dead_letters):
        key = d["key"] or b""
        if where.encode() in key[:200] or where in d["detail"]:
            found.append(d)
    return found


def test_records_of_a_megabyte_are_dead_lettered_and_the_worker_keeps_going(cluster: Cluster) -> None:
    u = user()
    codec = AvroCodec()
    item = item_ids(cluster, 1)[0]
    megabyte = 1_000_000
    noise = os.urandom(megabyte)
    huge_user = "h" * megabyte
    bad: dict[str, tuple[bytes, bytes]] = {
        "random bytes": (u.encode(), noise),
        "an item id": (u.encode(), codec.encode("ClickEvent", click_record(u, "i" * megabyte))),
        "a query": (
            u.encode(),
            codec.encode(
                "SearchEvent",
                {"event_id": "q1", "user_id": u, "timestamp": now_ms(), "query": "q" * megabyte},
            ),
        ),
        "a user id": (huge_user.encode(), codec.encode("ClickEvent", click_record(huge_user, item))),
    }
    # fields over their limits in records of ordinary size; an int beyond 32 bits
    long_item = codec.encode("ClickEvent", click_record(u, "i" * 5000))
    purchase = {**click_record(u, item), "price": 1.0, "quantity": 1, "currency": None}
    quantity_body = codec.encode("PurchaseEvent", purchase)
    assert quantity_body.endswith(avro_long(1) + b"\x00\x00")  # quantity, no currency, no context
    over_int = quantity_body[:-3] + avro_long(2**31) + b"\x00\x00"
    blank = codec.encode("ClickEvent", click_record("   ", item))
    control = codec.encode("ClickEvent", click_record(u, item + "\x00"))
    with EventProducer(cluster.settings, config={"message.max.bytes": 5 * megabyte}) as producer:
        for key, value in bad.values():
            producer.send_raw(cluster.settings.events_topic, key, value)
        for value in (long_item, over_int, control):
            producer.send_raw(cluster.settings.events_topic, u, value)
        producer.send_raw(cluster.settings.events_topic, "   ", blank)
        # the control topics' agents too (faust's path)
        producer.send_raw(cluster.settings.catalog_topic, u, noise)
        producer.send_raw(cluster.settings.model_updates_topic, u, noise)
    after = cluster.producer.click(u, item)
    items_before = cluster.workers[0].health()["catalog_items"]
    fresh = f"sku-{u}"
    cluster.producer.upsert_item(item_id=fresh, title="Fresh Item", category="toys/games", price=1.0)
    cluster.producer.flush()

    cluster.output.wait_for_cause(u, after, timeout_s=60)
    worker = cluster.workers[0]
    assert worker.alive() and worker.health()["stage_alive"]
    state = worker.state(u)
    assert state is not None and state["clicks"] == 1, "only the valid event is applied"

    limit = cluster.settings.max_record_bytes
    events = cluster.settings.events_topic

    def from_events() -> list[dict]:
        return [d for d in letters(cluster, u) if d["source_topic"] == events]

    mine = wait_for(lambda: len(from_events()) >= 6 and from_events(), 30, what="dead letters")
    too_large = [d for d in mine if d["reason"] == "too_large"]
    assert len(too_large) == 3, [d["reason"] for d in mine]
    for d in too_large:
        assert d["value_size"] is not None and d["value_size"] >= megabyte
        assert 0 < len(d["value"]) < limit and "cut to its first" in d["detail"]
    # Each is the first bytes of one of the originals, and gives that original's size.
    copies = sorted(
        name
        for d in too_large
        for name, (key, value) in bad.items()
        if key == u.encode() and value.startswith(d["value"]) and d["value_size"] == len(value)
    )
    assert copies == ["a query", "an item id", "random bytes"], copies
    huge = wait_for(
        lambda: [d for d in cluster.output.dead_letters if d["key_size"] == megabyte], 30, what="cut key"
    )
    huge_key, huge_value = bad["a user id"]
    assert huge[0]["reason"] == "too_large" and huge_key.startswith(huge[0]["key"])
    assert huge_value.startswith(huge[0]["value"]) and huge[0]["value_size"] == len(huge_value)
    small = sorted((d["reason"], d["value"]) for d in mine if d["reason"] != "too_large")
    originals = [("invalid_record", long_item), ("invalid_record", control), ("undecodable", over_int)]
    assert small == sorted(originals), "each with its original bytes"
    assert all(d["key"] == u.encode() and d["value_size"] is None for d in mine if d["reason"] != "too_large")
    assert any("5000 bytes long" in d["detail"] for d in mine)
    assert any("control character" in d["detail"] for d in mine)
    blanks = wait_for(
        lambda: [d for d in cluster.output.dead_letters if d["key"] == b"   "], 30, what="blank user"
    )
    assert blanks[0]["reason"] == "invalid_record" and blanks[0]["value"] == blank
    agents = wait_for(
        lambda: (
            [d for d in mine_now(cluster, u) if d["source_topic"] != cluster.settings.events_topic]
            if len([d for d in mine_now(cluster, u) if d["source_topic"] != cluster.settings.events_topic])
            >= 2
            else None
        ),
        30,
        what="dead letters from the catalogue and model-update agents",
    )
    assert {d["source_topic"] for d in agents} == {
        cluster.settings.catalog_topic,
        cluster.settings.model_updates_topic,
    }
    assert all(d["reason"] == "undecodable" and d["value_size"] == megabyte for d in agents)
    assert all(noise.startswith(d["value"]) and 0 < len(d["value"]) < limit for d in agents)
    worker.wait_catalog(items_before + 1, timeout_s=30)  # the agent goes on after the bad record


def mine_now(cluster: Cluster, u: str) -> list[dict]:
    return [d for d in list(cluster.output.dead_letters) if (d["key"] or b"")[:200] == u.encode()]


def test_events_keyed_otherwise_than_by_their_user_are_dead_lettered(cluster: Cluster) -> None:
    settings = cluster.settings
    codec = AvroCodec()
    item = item_ids(cluster, 1)[0]
    u = user()
    home = partition_of(u.encode(), settings.partitions)
    elsewhere = (home + 1) % settings.partitions
    deletion = {"event_id": "d1", "user_id": u, "timestamp": now_ms(), "requested_by": None}
    misplaced = [  # (reason, key, value, partition)
        ("wrong_key", None, codec.encode("ClickEvent", click_record(u, item)), None),
        ("wrong_key", b"someone-else", codec.encode("ClickEvent", click_record(u, item)), None),
        ("wrong_partition", u.encode(), codec.encode("ClickEvent", click_record(u, item)), elsewhere),
        ("wrong_partition", u.encode(), codec.encode("UserDeletion", deletion), elsewhere),
    ]
    with EventProducer(settings) as producer:
        for _, key, value, partition in misplaced:
            producer.send_raw(settings.events_topic, key, value, partition=partition)
    # Many users keyed by the client (librdkafka's murmur2_random): none is refused as misplaced.
    users = [user() for _ in range(200)]
    last = {v: cluster.producer.click(v, item) for v in users}
    valid = cluster.producer.click(u, item)
    cluster.producer.flush()

    cluster.output.wait_for_cause(u, valid)
    for v in users:
        cluster.output.wait_for_cause(v, last[v])
    mine = wait_for(lambda: len(letters(cluster, u)) >= 4 and letters(cluster, u), 30, what="dead letters")
    got = sorted((d["reason"], d["key"] or b"", d["value"]) for d in mine)
    assert got == sorted((reason, key or b"", value) for reason, key, value, _ in misplaced), "original bytes"
    assert all(d["partition"] == elsewhere for d in mine if d["reason"] == "wrong_partition")
    state = cluster.workers[0].state(u)
    assert state is not None and state["clicks"] == 1, "only the event on the user's own partition counts"
    assert not [
        d for d in cluster.output.dead_letters if d["reason"] == "wrong_partition" and d["key"] != u.encode()
    ]


def _listening(port: int) -> list[str]:
    """The local addresses that sockets listening on ``port`` are bound to (/proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_web_server_listens_where_set_serves_only_its_routes_and_user_data_with_a_key(
    cluster: Cluster,
) -> None:
    worker = cluster.workers[0]
    u = user()
    event = cluster.producer.click(u, item_ids(cluster, 1)[0])
    cluster.producer.flush()
    cluster.output.wait_for_cause(u, event)

    addresses = _listening(worker.web_port)
    assert addresses and set(addresses) == {"0100007F"}, f"bound to {addresses}, not 127.0.0.1 alone"
    base = f"http://127.0.0.1:{worker.web_port}"
    for path in ("/", "/router/", "/table/catalog/", "/table/models/", "/graph/", "/stats/"):
        assert _status(base + path) == 404, path
    assert _status(base + "/health") == 200 and _status(base + "/metrics") == 200
    state = f"{base}/users/{u}/state"
    assert _status(state) == 401
    assert _status(state, {"X-API-Key": "not-the-key"}) == 401
    assert _status(state, {"Authorization": f"Bearer {worker.api_key}x"}) == 401
    assert _status(state, {"Authorization": f"Bearer {worker.api_key}"}) == 200
    assert _status(state, {"X-API-Key": worker.api_key}) == 200


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _changelog(settings: object, partition: int) -> list[tuple[bytes | None, bytes | None]]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,  # type: ignore[attr-defined]
            "group.id": "test-changelog",
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(settings.state_changelog_topic, partition, 0)])  # type: ignore[attr-defined]
    records = []
    while True:
        msg = consumer.poll(5)
        assert msg is not None, "changelog read timed out"
        if msg.error() is not None:
            assert msg.error().code() == KafkaError._PARTITION_EOF
            break
        records.append((msg.key(), msg.value()))
    consumer.close()
    return records


def test_an_erased_user_leaves_nothing_local_and_old_events_never_bring_them_back(cluster: Cluster) -> None:
    settings = cluster.settings
    worker = cluster.workers[0]
    u = user()
    items = item_ids(cluster, 4)
    first_at = now_ms() - 60_000
    first = cluster.producer.click(u, items[0], timestamp=first_at)
    last = ""
    for item in items[1:3]:
        last = cluster.producer.click(u, item)
    cluster.producer.flush()
    cluster.output.wait_for_cause(u, last)
    assert worker.state(u) is not None

    cluster.producer.delete_user(u)
    cluster.producer.flush()
    wait_for(lambda: worker.state(u) is None, 30, what="the erasure")
    # RocksDB's write-ahead log, tables and manifest keep nothing of the user once the batch is settled.
    wait_for(
        lambda: not _files_holding(worker.data_dir, u.encode()), 30, what="local files to forget the user"
    )

    # A retrying backend, and a replay of history into the backfill topic: refused, and the dead letters
    # carry neither the key nor the value.
    cluster.producer.click(u, items[0], event_id=first, timestamp=first_at)
    cluster.producer.click(u, items[3], timestamp=first_at + 1)
    replayed = cluster.producer.click(u, items[3], timestamp=first_at + 2)
    cluster.producer.flush()
    erased = wait_for(
        lambda: [d for d in cluster.output.dead_letters if d["reason"] == "erased_user"] or None,
        30,
        what="erased_user dead letters",
    )
    assert all(d["key"] is None and d["value"] is None for d in erased)
    assert worker.state(u) is None, "old events do not resurrect the user"
    assert not [r for r in cluster.output.for_user(u) if r.cause_event_id == replayed]

    # The same user id later is a new user; old events stay refused for them too (their state is cached).
    back = cluster.producer.click(u, items[1])
    cluster.producer.flush()
    cluster.output.wait_for_cause(u, back)
    cluster.producer.click(u, items[2], timestamp=first_at + 3)
    again = cluster.producer.click(u, items[3])
    cluster.producer.flush()
    cluster.output.wait_for_cause(u, again)
    state = worker.state(u)
    assert (
        state is not None
        and state["clicks"] == 2
        and first_at + 3 not in [h["timestamp"] for h in state["history"]]
    )

    # The changelog: a tombstone for the user, and a marker whose key does not carry the user id.
    records = _changelog(settings, partition_of(u.encode(), settings.partitions))
    keys = [k for k, _ in records]
    assert (u.encode(), None) in records
    markers = [k for k in keys if k is not None and k.startswith(b"\x00erased:")]
    assert markers and all(u.encode() not in k for k in markers)


def test_catalogue_upserts_and_model_updates_are_validated_by_the_worker(cluster: Cluster) -> None:
    """Records that decode but are refused: catalogue items against the rules, and a record of another type
    on the model-updates topic. Each is dead-lettered with its original bytes, and changes nothing."""
    settings = cluster.settings
    codec = AvroCodec()
    worker = cluster.workers[0]
    before = worker.health()
    bad = {"item_id": "sku-negative", "title": "Negative", "category": None, "price": -10.0, "in_stock": True,
           "description": None, "updated_at": now_ms()}  # fmt: skip
    blank = {**bad, "item_id": "sku-blank-title", "title": "  ", "price": 5.0}
    sent = {
        (settings.catalog_topic, "sku-negative"): codec.encode("CatalogItem", bad),
        (settings.catalog_topic, "sku-blank-title"): codec.encode("CatalogItem", blank),
        # a well-formed catalogue record, where a promoted model's update belongs
        (settings.model_updates_topic, "not-a-model"): codec.encode("CatalogItem", {**bad, "price": 1.0}),
    }
    with EventProducer(settings) as producer:
        for (topic, key), value in sent.items():
            producer.send_raw(topic, key, value)

    def refused() -> dict[tuple[str, str], dict]:
        return {
            (d["source_topic"], (d["key"] or b"").decode()): d
            for d in list(cluster.output.dead_letters)
            if d["source_topic"] != settings.events_topic
        }

    wait_for(lambda: set(sent) <= set(refused()), 30, what="catalogue and model-update dead letters")
    got = refused()
    for (topic, key), value in sent.items():
        reason = "invalid_record" if topic == settings.catalog_topic else "unknown_schema"
        assert (got[(topic, key)]["reason"], got[(topic, key)]["value"]) == (reason, value), key
    health = worker.health()
    assert (health["catalog_items"], health["model_version"]) == (
        before["catalog_items"],
        before["model_version"],
    )


# A restart (55 s) runs in `make test-reliability` with the other faults: `make test` keeps to 15 minutes.
@pytest.mark.reliability
def test_a_restarted_worker_has_its_catalogue_model_and_erasures_before_it_takes_events(
    cluster: Cluster, tmp_path: Path
) -> None:
    from streamrec.models.registry import current, read_metadata

    settings = cluster.settings
    served = current(settings.model_registry)
    assert served is not None
    candidate = tmp_path / "candidate"
    shutil.copytree(served, candidate)
    metadata = read_metadata(candidate)
    metadata["version"] = "restart-v2"
    (candidate / "metadata.json").write_text(json.dumps(metadata))
    update = {
        "model_version": "restart-v2",
        "path": str(candidate),
        "parent_version": served.name,
        "metrics": {},
        "promoted_at": now_ms(),
    }
    worker = cluster.workers[0]
    catalogue = worker.health()["catalog_items"]
    cluster.producer.send("ModelUpdate", update, key="current", topic=settings.model_updates_topic)
    erased = user()
    items = item_ids(cluster, 3)
    old_at = now_ms() - 30_000
    cluster.producer.click(erased, items[0], timestamp=old_at)
    cluster.producer.delete_user(erased)
    cluster.producer.flush()
    wait_for(lambda: worker.health().get("model_version") == "restart-v2", 60, what="the model swap")

    def refused() -> int:
        return len([d for d in cluster.output.dead_letters if d["reason"] == "erased_user"])

    def restart(how: str, lose_disk: bool = False) -> WorkerProcess:
        old = cluster.workers.pop()
        old.stop() if how == "stop" else old.kill()
        if lose_disk:
            shutil.rmtree(old.data_dir)
        new = cluster.worker(old.name)
        new.wait_ready()
        return new

    # On its own disk (the defect); a restart on an empty disk recovers the tables from their changelogs, as
    # test_worker.py's kill -9 test shows, and the erasure markers from the state changelog, as
    # test_state_store.py's restore test shows.
    for how, lose_disk in (("stop", False), ("kill", False)):
        worker = restart(how, lose_disk)
        health = worker.health()
        assert health["catalog_items"] == catalogue, f"after {how}: {health['catalog_items']} of {catalogue}"
        assert health["model_version"] == "restart-v2", f"after {how}"
        u = user()
        last = ""
        for item in items:
            last = cluster.producer.click(u, item)
        refused_before = refused()
        resurrect = cluster.producer.click(erased, items[1], timestamp=old_at + 1)
        cluster.producer.flush()
        rec = cluster.output.wait_for_cause(u, last, timeout_s=60)
        assert rec.model_version == "restart-v2"
        state = worker.state(u)
        assert state is not None and state["clicks"] == 3, f"after {how}: every click applied"
        assert not [d for d in letters(cluster, u) if d["reason"] == "unknown_item"]
        wait_for(
            lambda before=refused_before: refused() > before,
            30,
            what=f"the erased user's old event refused after {how}",
        )
        assert worker.state(erased) is None
        assert not [r for r in cluster.output.for_user(erased) if r.cause_event_id == resurrect]
