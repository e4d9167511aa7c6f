"""librdkafka's log lines reach Python logging, at the levels a user should see them."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
from confluent_kafka import Producer

from streamrec.settings import Settings
from streamrec.streams.broker import free_port
from streamrec.streams.client import reader_config
from streamrec.streams.event_stage import fetch_config
from streamrec.streams.kafka_logging import CLIENT_LOG, ClientLog, client_log_level, client_logging
from streamrec.streams.kafka_security import client_config

REFUSED = (
    "[thrd:127.0.0.1:44603/bootstrap]: 127.0.0.1:44603/bootstrap: Connect to ipv4#127.0.0.1:44603 failed: "
    "Connection refused (after 0ms in state CONNECT)"
)
CLOSED = (
    "[thrd:127.0.0.1:44603/111]: 127.0.0.1:44603/111: Disconnected: connection closed by peer: receive 0 "
    "after POLLIN (after 15407ms in state UP)"
)
UNRESOLVED = (
    "[thrd:kafka:9092/bootstrap]: kafka:9092/bootstrap: "
    "Failed to resolve 'kafka:9092': Name or service not known"
)


@pytest.mark.parametrize("message", [REFUSED, CLOSED])
def test_a_broker_not_reachable_yet_is_info(message: str) -> None:
    assert client_log_level(logging.ERROR, "FAIL", message) == logging.INFO


def test_other_lines_keep_their_level() -> None:
    assert client_log_level(logging.ERROR, "FAIL", UNRESOLVED) == logging.ERROR
    assert client_log_level(logging.WARNING, "MAXPOLL", "Application maximum poll interval exceeded") == (
        logging.WARNING
    )
    assert client_log_level(logging.DEBUG, "FAIL", REFUSED) == logging.DEBUG


def test_a_line_is_one_readable_record(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.kafka")
    with caplog.at_level(logging.DEBUG, logger="test.kafka"):
        ClientLog(logger).log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", REFUSED)
        ClientLog(logger).log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", UNRESOLVED)
    (refused, unresolved) = caplog.records
    assert refused.levelno == logging.INFO
    assert refused.getMessage() == (
        "kafka client rdkafka#producer-1: 127.0.0.1:44603/bootstrap: Connect to ipv4#127.0.0.1:44603 failed: "
        "Connection refused (after 0ms in state CONNECT)"
    )
    assert unresolved.levelno == logging.ERROR


def test_a_client_without_a_broker_logs_through_python_not_stderr(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{free_port()}", **client_logging()})
    with caplog.at_level(logging.DEBUG, logger="streamrec.kafka"):
        producer.poll(1.0)
        producer.close()
    assert any("Connection refused" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert "%3|" not in capfd.readouterr().err


ROOT = Path(__file__).resolve().parents[2]
KAFKA_CLIENTS = ("Producer", "Consumer", "AdminClient")
CONFIG_HELPERS = ("client_logging()", "client_config(", "fetch_config(", "reader_config(")


def test_every_kafka_client_streamrec_creates_logs_through_python() -> None:
    """Each Producer, Consumer and AdminClient built in streamrec's code takes ``client_logging()``, directly
    or through the config helpers that include it (client_config, and those built on it)."""
    unrouted = []
    for folder in ("streamrec", "streams", "benchmarks"):
        for path in sorted((ROOT / folder).glob("**/*.py")):
            source = path.read_text()
            for node in ast.walk(ast.parse(source)):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                    continue
                call = ast.get_source_segment(source, node) or ""
                if node.func.id in KAFKA_CLIENTS and not any(helper in call for helper in CONFIG_HELPERS):
                    unrouted.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unrouted
    settings = Settings()
    assert fetch_config(settings)["logger"] is CLIENT_LOG
    assert reader_config(settings, None, from_beginning=False)["logger"] is CLIENT_LOG
    assert client_config(settings)["logger"] is CLIENT_LOG
