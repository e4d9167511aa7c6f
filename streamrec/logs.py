"""Log lines as text or as JSON objects (STREAMREC_LOG_FORMAT), with the process's context in every line.

A JSON line carries time, level, logger and message; the fields set with ``set_log_context`` (a worker sets
its id and the model version it serves, the API its service name); and ``partition`` and ``topic`` where the
line is about one (``log.info(..., extra={"partition": p})``). Log collectors (Loki, Elasticsearch, Cloud
Logging) index those fields without parsing the message.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

import orjson

# Attributes a log call may attach with ``extra=`` that a JSON line shows as fields of their own.
RECORD_FIELDS = ("partition", "topic")

_context: dict[str, Any] = {}
_context_lock = threading.Lock()


def set_log_context(**fields: Any) -> None:
    """Fields every later line of this process carries (None removes one): e.g. ``model_version`` after a
    model swap."""
    global _context
    with _context_lock:
        merged = {**_context, **fields}
        _context = {k: v for k, v in merged.items() if v is not None}  # replaced whole: readers need no lock


def log_context() -> dict[str, Any]:
    return dict(_context)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``{"time", "level", "logger", "message", ...context, partition?, topic?,
    exception?}``. The time is UTC with milliseconds (RFC 3339)."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, Any] = {
            "time": when.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_context,
        }
        for name in RECORD_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


TEXT_FORMAT = "%(levelname)-8s %(message)s"


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``STREAMREC_LOG_FORMAT``: ``json`` or ``text``."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
