"""The DeadLetter record: why an input record was refused, where it was, and its original bytes.

Every reason code a worker writes is in ``REASONS`` (docs/contracts.md lists them for backends).
"""

from __future__ import annotations

import time
from typing import Any

from streamrec.validation import Rejection

REASONS: dict[str, str] = {
    "undecodable": "not Avro single-object or registry framing, a truncated or corrupt body, bytes left "
    "over, or an integer outside its Avro type",
    "unknown_schema": "a writer schema fingerprint that is neither bundled nor on the schemas topic, or a "
    "record type that does not belong on this topic",
    "incompatible_schema": "a writer schema that cannot be resolved into the worker's (a field missing "
    "without a default, a type that does not promote)",
    "invalid_record": "a value outside the rules: a blank id, an id or query over its length limit, a "
    "control character in an id, a negative or non-finite price, a quantity under 1",
    "unknown_item": "a click or purchase of an item the catalogue does not hold",
    "absurd_timestamp": "a time further ahead than the clock skew allows, or older than the age limit "
    "(seconds or microseconds instead of milliseconds)",
    "too_large": "a record over STREAMREC_MAX_EVENT_BYTES, refused before decoding",
    "wrong_key": "an event whose Kafka key is missing or is not its user_id in UTF-8",
    "wrong_partition": "an event on another partition than Kafka's default partitioner (murmur2) puts its "
    "key on: one user's events must all reach the worker that holds that user's state",
    "unloadable_model": "a ModelUpdate on the model-updates topic whose model this worker cannot load (no "
    "model directory at its path, another version's files, unreadable weights); it is not passed on to the "
    "other workers and the model served so far stays",
    "rate_limited": "a live event beyond its user's rate limit (STREAMREC_USER_RATE_LIMIT events per second "
    "after a burst of STREAMREC_USER_RATE_BURST, by the events' timestamps); the user's other events apply",
    "erased_user": "an event of a user erased by a later UserDeletion, timed no later than the erasure "
    "(redelivered, retried or replayed); its key and value are left out of the dead letter",
}

DETAIL_CHARS = 2000
# Room in a dead letter for everything but the copied key and value (coordinates, reason, detail, worker).
DEAD_LETTER_OVERHEAD = 16_384
KEY_COPY_BYTES = 1024  # of a key that has to be cut: a user id is far shorter


def dead_letter(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    rejection: Rejection,
    worker_id: str,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """A DeadLetter record. With ``max_bytes`` (the largest record the worker may produce), a key and value
    that would not fit are cut to their first bytes, and ``key_size`` / ``value_size`` give their sizes."""
    key_size = value_size = None
    if max_bytes is not None:
        # The key is sent twice: in the record and as the dead letter's own Kafka key.
        budget = max_bytes - DEAD_LETTER_OVERHEAD
        key_len, value_len = len(key or b""), len(value or b"")
        if 2 * key_len + value_len > budget:
            if key is not None and key_len > KEY_COPY_BYTES:
                key, key_size = key[:KEY_COPY_BYTES], key_len
            room = budget - 2 * len(key or b"")
            if value is not None and value_len > room:
                value, value_size = value[:room], value_len
    detail = rejection.detail
    if key_size is not None or value_size is not None:
        cut = [
            f"{what} cut to its first {len(part or b'')} of {size} bytes"
            for what, part, size in (("key", key, key_size), ("value", value, value_size))
            if size is not None
        ]
        detail = f"{detail} ({'; '.join(cut)})"
    return {
        "source_topic": topic,
        "partition": partition,
        "offset": offset,
        "key": key,
        "value": value,
        "reason": rejection.reason,
        "detail": detail[:DETAIL_CHARS],
        "failed_at": time.time_ns() // 1_000_000,
        "worker_id": worker_id,
        "key_size": key_size,
        "value_size": value_size,
    }
