"""A delivery that fails on a real broker: the event stage's batch is consumed again from the broker and
applied once. (tests/integration/test_event_stage_pipeline.py holds the same rules with stand-in clients,
fast, batch by batch.)

The fault is the broker refusing the stage's writes while everything else keeps working, which is what a
broker whose partitions lost their leader, or whose disk is full, does. Stopping the embedded broker
instead would show little: Tansu keeps everything in memory, so a restarted one is empty, and the batch,
its offsets and the group are gone with it. Here a proxy stands in front of the broker (the broker
advertises the proxy's address, so every client's connection passes through it) and, while told to, closes
any connection on which the stage's producer sends a Produce request, before the broker sees it. The
stage's consumer, the group and the test's own producer go on as before.

The stage's producers are idempotent, as in production. Once a delivery of an idempotent producer has timed
out, librdkafka bumps the producer's epoch (KIP-360) and Tansu answers every later Produce with
PRODUCER_FENCED (Apache Kafka accepts the bump): the stage must then replace its producers, or it never
delivers again on this broker.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from streamrec.catalog import Catalog
from streamrec.records import CatalogItem
from streamrec.serde import AvroCodec
from streamrec.settings import Settings
from streamrec.streams import event_stage
from streamrec.streams.broker import free_port, tansu_binary
from streamrec.streams.client import EventProducer
from streamrec.streams.event_stage import EventStage
from streamrec.streams.reading import ReadToEnd
from streamrec.streams.topics import create_topics
from tests.conftest import wait_for
from tests.integration.test_event_stage_pipeline import Echo  # recommends each user's newest item

pytestmark = pytest.mark.integration

PRODUCE = 0  # the Kafka protocol's api key of a Produce request
STAGE = "stage-under-test"  # the stage's client.id (its worker id)
DELIVERY_TIMEOUT_MS = 1500  # librdkafka's message.timeout.ms for the stage (its default is five minutes)
ITEMS = [f"sku-{n}" for n in range(6)]


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class WriteCutter:
    """A TCP proxy in front of the broker that can refuse one client's writes. It reads each request a client
    sends (a 4-byte size, then the header: api key, version, correlation id, client id) and forwards it;
    while ``cut`` is set, a Produce request from ``client_id`` closes that connection instead."""

    def __init__(self, broker_port: int, client_id: str) -> None:
        self.broker_port = broker_port
        self.client_id = client_id.encode()
        self.cut = threading.Event()
        self.refused = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                broker = socket.create_connection(("127.0.0.1", self.broker_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._requests, args=(client, broker), daemon=True).start()
            threading.Thread(target=self._responses, args=(broker, client), daemon=True).start()

    def _requests(self, client: socket.socket, broker: socket.socket) -> None:
        try:
            while True:
                size = _exactly(client, 4)
                request = _exactly(client, int.from_bytes(size, "big"))
                api_key = int.from_bytes(request[0:2], "big")
                id_length = int.from_bytes(request[8:10], "big", signed=True)
                client_id = request[10 : 10 + max(id_length, 0)]
                if self.cut.is_set() and api_key == PRODUCE and client_id == self.client_id:
                    self.refused += 1
                    return
                broker.sendall(size + request)
        except OSError:
            return
        finally:
            _close(client, broker)

    def _responses(self, broker: socket.socket, client: socket.socket) -> None:
        try:
            while data := broker.recv(65536):
                client.sendall(data)
        except OSError:
            return
        finally:
            _close(client, broker)


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


@pytest.fixture
def cutter(tmp_path: Path) -> Iterator[WriteCutter]:
    """The embedded broker, advertising the address of a WriteCutter in front of it."""
    broker_port = free_port()
    proxy = WriteCutter(broker_port, STAGE)
    listen, advertise = f"tcp://127.0.0.1:{broker_port}", f"tcp://127.0.0.1:{proxy.port}"
    with (tmp_path / "broker.log").open("ab") as log:
        broker = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", listen, "--advertised-listener-url", advertise],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{proxy.port}"})
        wait_for(lambda: _answers(admin), 15, interval_s=0.05, what="the broker behind the proxy")
        yield proxy
    finally:
        broker.kill()  # in memory: nothing to keep
        broker.wait(10)
        proxy.close()


def _answers(admin: AdminClient) -> bool:
    try:
        admin.list_topics(timeout=1.0)
        return True
    except Exception:  # not listening yet
        return False


def test_a_batch_whose_delivery_fails_is_consumed_again_from_the_broker_and_applied_once(
    cutter: WriteCutter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        bootstrap_servers=f"127.0.0.1:{cutter.port}",
        data_dir=tmp_path / "stage",
        worker_id=STAGE,
        ranking_process=False,
        web_enabled=False,
    )
    create_topics(settings)
    # The stage's producers time out in seconds instead of minutes.
    changed = {"message.timeout.ms": DELIVERY_TIMEOUT_MS}
    monkeypatch.setattr(event_stage, "Producer", lambda config: Producer(config | changed))
    catalog = Catalog()
    for item in ITEMS:
        catalog.upsert(CatalogItem(item_id=item, title=item))
    applied: list[int] = []  # events applied by each batch, delivered or not
    stage = EventStage(settings, catalog, Echo(), AvroCodec(), on_events=applied.append)
    stop = threading.Event()
    thread = threading.Thread(target=stage.run, args=(stop,), daemon=True)
    thread.start()
    users = [f"shopper-{n}" for n in range(8)]
    producer = EventProducer(settings)
    try:
        wait_for(
            lambda: stage.assignment().get(settings.events_topic) == list(range(settings.partitions)),
            60,
            what="the stage to hold every partition",
        )

        def settled() -> dict[str, list[str | None]]:
            """Each user's history as written locally: what the stage has settled."""
            return {u: [h.item_id for h in s.history] if (s := stage.lookup(u)) else [] for u in users}

        before = {u: [producer.click(u, ITEMS[0]), producer.click(u, ITEMS[1])] for u in users}
        producer.flush()
        wait_for(lambda: settled() == dict.fromkeys(users, ITEMS[:2]), 30, what="the first batch settled")

        # The broker refuses the stage's writes: the next batch is consumed and applied, its changelog and
        # recommendations are not delivered, and it is consumed again from the broker, and again.
        cutter.cut.set()
        during = {u: producer.click(u, ITEMS[2]) for u in users}
        producer.flush()
        done_before = sum(applied)
        wait_for(
            lambda: sum(applied) >= done_before + 2 * len(users) and stage.error is None,
            60,
            what="the batch to be applied, fail and be applied again",
        )
        assert cutter.refused > 0, "the stage's writes reached the proxy and were refused"
        assert settled() == dict.fromkeys(users, ITEMS[:2]), "nothing of an undelivered batch is settled"

        # The broker takes writes again: the batch is consumed once more, delivered and settled, each event
        # applied once, its offsets committed and its recommendations published.
        cutter.cut.clear()
        wait_for(lambda: settled() == dict.fromkeys(users, ITEMS[:3]), 60, what="the batch settled")
        state = {u: stage.lookup(u) for u in users}
        assert all(s is not None and s.clicks == 3 and len(s.seen_event_ids) == 3 for s in state.values())
        assert {u: s.last_event_id for u, s in state.items() if s is not None} == during

        group = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": settings.events_group})
        events = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]

        def committed() -> int:
            return sum(max(tp.offset, 0) for tp in group.committed(events, timeout=5))

        wait_for(lambda: committed() == 3 * len(users), 30, what="every event's offset committed")
        group.close()
        published = recommendation_causes(settings)
        assert dict(published) == during, "each user's newest recommendation: caused by the retried event"
        assert {cause for _, cause in published} == {*during.values(), *(b[-1] for b in before.values())}
    finally:
        stop.set()
        thread.join(30)
        producer.close()
    assert stage.error is None, stage.error


def recommendation_causes(settings: Settings) -> list[tuple[str, str]]:
    """(user, cause event id) of every recommendation on the topic, in order."""
    codec = AvroCodec()
    consumer = Consumer(
        {"bootstrap.servers": settings.bootstrap_servers, "group.id": "reader", "enable.partition.eof": True}
    )
    topic = settings.recommendations_topic
    try:
        starts = dict.fromkeys(range(settings.partitions), 0)
        values = [m.value() for batch in ReadToEnd(consumer, topic, starts, 30.0) for m in batch]
    finally:
        consumer.close()
    records = [codec.decode(v or b"")[1] for v in values]
    return [(r["user_id"], r["cause_event_id"]) for r in records]
