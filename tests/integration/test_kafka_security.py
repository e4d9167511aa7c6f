"""streamrec's clients over TLS against a real broker. The embedded broker (Tansu 0.6.0) has no working
TLS listener (``--cert`` and ``--key`` are refused together, and either alone leaves it plaintext) and no way
to create SASL users while it requires them, so a TLS terminator stands in front of it here, as a load
balancer would, with a certificate authority made for the test and client certificates required (mutual
TLS). Every kind of client connects through ``client_config(settings)``, faust's through
``faust_credentials(settings)`` (aiokafka); a client without TLS, without a certificate, or trusting another
CA is refused."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streamrec.sample import sample_catalog
from streamrec.serde import AvroCodec
from streamrec.settings import Settings
from streamrec.streams.broker import free_port, tansu_binary
from streamrec.streams.client import EventProducer, RecommendationConsumer
from streamrec.streams.kafka_security import client_config, faust_credentials
from streamrec.streams.ops.lag import LagProbe
from streamrec.streams.process import WorkerProcess
from streamrec.streams.shadow import values_to_end
from streamrec.streams.simulate import publish_catalog
from streamrec.streams.topics import check_broker, create_topics
from tests.conftest import wait_for
from tests.pki import Pki, make_pki

pytestmark = pytest.mark.integration


class TlsTerminator:
    """Accepts TLS on its own port (the broker's certificate; a client certificate from the CA required) and
    passes the bytes on to the broker's plaintext port. asyncio in a thread: one TLS object per connection,
    never read and written from two threads at once."""

    def __init__(self, broker_port: int, pki: Pki) -> None:
        self.broker_port = broker_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        self.context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        try:
            broker_in, broker_out = await asyncio.open_connection("127.0.0.1", self.broker_port)
        except OSError:
            client_out.close()
            return
        await asyncio.gather(self._pipe(client_in, broker_out), self._pipe(broker_in, client_out))

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                sink.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_broker(pki: Pki, tmp_path: Path) -> Iterator[str]:
    """The embedded broker behind a TLS terminator, advertising the terminator's address: every client
    connection, the first and those to the partitions' leader, is TLS."""
    broker_port = free_port()
    terminator = TlsTerminator(broker_port, pki)
    listen, advertise = f"tcp://127.0.0.1:{broker_port}", f"tcp://127.0.0.1:{terminator.port}"
    command = [tansu_binary(), "broker", "--listener-url", listen, "--advertised-listener-url", advertise]
    with (tmp_path / "broker.log").open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"127.0.0.1:{terminator.port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        terminator.close()


@pytest.fixture
def settings(tls_broker: str, pki: Pki, tmp_path: Path) -> Settings:
    """SSL with mutual TLS: the client certificate's key encrypted, its password a setting."""
    settings = Settings(
        bootstrap_servers=tls_broker,
        security_protocol="SSL",
        ssl_ca_location=pki.ca,
        ssl_certificate_location=pki.client_cert,
        ssl_key_location=pki.client_key,
        ssl_key_password=pki.client_key_password,
        data_dir=tmp_path / "worker",
    )
    wait_for(lambda: answers(client_config(settings)), 15.0, 0.05, "the broker through TLS")
    return settings


def answers(config: dict) -> bool:
    try:
        AdminClient(config).list_topics(timeout=1.0)
        return True
    except KafkaException:
        return False


def test_the_clients_work_over_tls(settings: Settings) -> None:
    """Topics created (admin client), a click and its schema sent (producer client), read back to the end
    (a consumer, as replay, shadow and the trainer read), consumer groups listed (the lag probe)."""
    started = time.monotonic()
    create_topics(settings)
    check_broker(settings)
    with EventProducer(settings) as producer:
        event_id = producer.click("u-tls", "sku-1")
    values = [v for v in values_to_end(settings, settings.events_topic) if v is not None]
    assert [AvroCodec().decode(v)[1]["event_id"] for v in values] == [event_id]
    probe = LagProbe(settings)
    try:
        assert isinstance(probe.groups(), list)
    finally:
        probe.close()
    assert time.monotonic() - started < 60


def test_a_client_without_tls_or_a_certificate_or_trusting_another_ca_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    assert answers(client_config(settings))
    assert not answers({"bootstrap.servers": settings.bootstrap_servers})
    no_certificate = {"ssl_certificate_location": None, "ssl_key_location": None, "ssl_key_password": None}
    assert not answers(client_config(settings.model_copy(update=no_certificate)))
    stranger = make_pki(tmp_path / "other-ca")
    assert not answers(client_config(settings.model_copy(update={"ssl_ca_location": stranger.ca})))
    with pytest.raises(KafkaException):
        check_broker(settings.model_copy(update={"ssl_ca_location": stranger.ca}), timeout_s=1)


def test_faust_credentials_connect_aiokafka_over_tls(settings: Settings) -> None:
    """What faust hands aiokafka for ``broker_credentials``: a producer that delivers over the TLS listener,
    and a consumer that reads it back."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    create_topics(settings)
    auth = credentials_to_aiokafka_auth(faust_credentials(settings))
    topic = settings.model_updates_topic

    async def round_trip() -> bytes | None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, **auth)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"over-tls", key=b"current")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest", **auth
        )
        await consumer.start()
        try:
            message = await asyncio.wait_for(consumer.getone(), timeout=30)
            return message.value
        finally:
            await consumer.stop()

    assert asyncio.run(round_trip()) == b"over-tls"


@pytest.mark.reliability  # a whole worker behind the TLS terminator, 20 s: `make test-reliability`
def test_a_worker_runs_over_tls(settings: Settings, model_registry: Path, tmp_path: Path) -> None:
    """A whole worker on the TLS listener: its faust app (the catalogue agent and table, fed here) and its
    event stage (a click in, its recommendation out, read back over TLS)."""
    settings = settings.model_copy(update={"model_registry": model_registry})
    create_topics(settings)
    catalog = sample_catalog()
    with EventProducer(settings) as producer:
        publish_catalog(producer, catalog)
    worker = WorkerProcess(settings, tmp_path / "worker-0", "worker-0").start()
    try:
        worker.wait_ready(timeout_s=90)
        worker.wait_catalog(len(catalog), timeout_s=90)  # read by faust, over TLS
        with EventProducer(settings) as producer:
            event_id = producer.click("u-tls", catalog[0].item_id)
        with RecommendationConsumer(settings, from_beginning=True) as reader:
            found = wait_for(
                lambda: next((r for r in reader.iterate(1.0) if r.cause_event_id == event_id), None),
                60.0,
                what="the click's recommendation",
            )
        assert found.user_id == "u-tls" and found.items
    finally:
        worker.stop()
