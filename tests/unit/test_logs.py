"""JSON log lines (STREAMREC_LOG_FORMAT=json): the process's context and a line's partition as fields."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from streamrec.logs import JsonFormatter, formatter, log_context, set_log_context


@pytest.fixture(autouse=True)
def clean_context() -> Iterator[None]:
    saved = log_context()
    set_log_context(**dict.fromkeys(saved))
    yield
    set_log_context(**dict.fromkeys(log_context()))
    set_log_context(**saved)


def line(message: str, *args: object, exc: bool = False, **extra: object) -> dict:
    record = logging.LogRecord("streamrec.test", logging.WARNING, __file__, 1, message, args, None)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            record.exc_info = sys.exc_info()
    for name, value in extra.items():
        setattr(record, name, value)
    return json.loads(JsonFormatter().format(record))


def test_a_json_line_carries_the_context_and_the_partition_it_is_about() -> None:
    set_log_context(service="worker", worker_id="worker-7", model_version="v1")
    found = line("partition %d restored in %.1f s", 3, 0.25, partition=3, topic="streamrec.events")
    assert found["message"] == "partition 3 restored in 0.2 s"
    assert found["level"] == "warning" and found["logger"] == "streamrec.test"
    assert (found["worker_id"], found["model_version"], found["partition"]) == ("worker-7", "v1", 3)
    assert found["topic"] == "streamrec.events" and found["time"].endswith("Z")

    set_log_context(model_version="v2")  # a swap
    assert line("x")["model_version"] == "v2" and "partition" not in line("x")
    set_log_context(model_version=None)
    assert "model_version" not in line("x")


def test_an_exception_is_one_field_of_the_one_line() -> None:
    found = line("failed", exc=True)
    assert "ValueError: boom" in found["exception"]


def test_the_setting_picks_the_formatter() -> None:
    assert isinstance(formatter("json"), JsonFormatter)
    assert not isinstance(formatter("text"), JsonFormatter)
