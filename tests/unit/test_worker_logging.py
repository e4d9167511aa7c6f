"""The worker's log: a failure its clients retry every 100 ms is reported once a minute, with a count."""

from __future__ import annotations

import logging

from streamrec.streams.app import RepeatedLines


def record(msg: str, *args: object, name: str = "aiokafka.conn") -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_a_repeated_line_is_shown_once_then_with_how_many_were_held_back() -> None:
    repeats = RepeatedLines(interval_s=60.0)
    unable = "Unable connect to node with id %s: %s"
    assert repeats.filter(record(unable, 111, "refused"))
    assert not any(repeats.filter(record(unable, 111, "refused")) for _ in range(500))
    assert repeats.filter(record("Unable to update metadata from %s", [111]))  # another line
    assert repeats.filter(record(unable, 111, "refused", name="aiokafka.other"))  # another logger

    key = ("aiokafka.conn", unable)
    shown_at, held = repeats.seen[key]
    repeats.seen[key] = (shown_at - 61.0, held)  # a minute later
    later = record(unable, 111, "refused")
    assert repeats.filter(later)
    assert (
        later.getMessage()
        == "Unable connect to node with id 111: refused (500 more like it in the last 61 s)"
    )
