"""Shared fixtures: a real embedded broker per test, settings pointing at it, polling helpers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from streamrec import native
from streamrec.settings import Settings

T = TypeVar("T")

# The workers the tests start serve the eager encoder: compiling it (``serving_compile``, the default) adds
# 7-22 s to every start. The compiled path has its own tests (test_models_serving), and test_demo runs
# `make demo` with the defaults.
os.environ.setdefault("STREAMREC_SERVING_COMPILE", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pure-python",
        action="store_true",
        help="load streamrec's compiled hot-path modules from their sources (`make test` runs both)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--pure-python"):
        native.use_sources()


def wait_for(
    condition: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.1, what: str = ""
) -> T:
    """Poll until ``condition()`` is truthy or the deadline passes (tests never sleep a fixed time)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or condition}")
        time.sleep(interval_s)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    """A fresh in-memory Tansu broker; yields its bootstrap address."""
    from streamrec.streams.broker import EmbeddedBroker

    with EmbeddedBroker(log_path=tmp_path / "broker.log") as b:
        yield b.bootstrap


@pytest.fixture
def settings(broker: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own broker, data dir and model registry; topics created."""
    from streamrec.streams.topics import create_topics

    s = Settings(
        bootstrap_servers=broker,
        data_dir=tmp_path / "worker",
        model_registry=tmp_path / "models",
        web_enabled=False,
        batch_wait_ms=20,
    )
    create_topics(s)
    return s
