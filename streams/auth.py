"""API keys for the routes that return user data: a key from the settings, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

HEADER = "X-API-Key"


class ApiKeys:
    """The keys that may read user data. Without any, user-data routes are closed (403), not open."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def allows(self, presented: str | None) -> bool:
        if presented is None:
            return False
        given = presented.encode()
        # Every key is compared (no early exit): the time taken tells nothing of which one nearly matched.
        matches = [hmac.compare_digest(given, key) for key in self._keys]
        return any(matches)

    def refuse(self, headers: Mapping[str, str]) -> tuple[int, str] | None:
        """(status, message) when a request with these headers may not read user data; None when it may."""
        if not self._keys:
            return 403, "user data is not served: no API key is configured (STREAMREC_API_KEYS)"
        if not self.allows(presented_key(headers)):
            return 401, f"an API key is required: `Authorization: Bearer KEY` or `{HEADER}: KEY`"
        return None


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents, from ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    direct = headers.get(HEADER)
    if direct:
        return direct.strip()
    authorization = headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None
