"""Pseudonymised user ids: the keyed hash the producer client sends in place of a raw user id, so raw ids
never enter Kafka. Any backend computes the same (docs/privacy.md, "Pseudonyms at the edge", test vector):

    "p-" + the first 32 lowercase hex digits of HMAC-SHA256(key: UTF-8 of the key, message: UTF-8 of the id)

The raw id is hashed exactly as given (no trimming, no case folding). 128 bits of the HMAC keep collisions out
of reach (below one in 10^20 for a billion users); without the key, nobody can test a guessed id against it.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "p-"
HEX_DIGITS = 32


def pseudonym(key: bytes, user_id: str) -> str:
    """The pseudonym of ``user_id`` under ``key``."""
    digest = hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:HEX_DIGITS]
