"""librdkafka's log lines through Python logging, at the process's log level, instead of raw on stderr.

Every confluent-kafka client streamrec creates takes ``client_logging()`` in its config. librdkafka logs a
broker it cannot reach (yet) as an error and then retries by itself: a worker started beside its broker, or a
broker that restarts, is no fault. Those lines are INFO here; a broker that stays away is reported once by
the caller that waits for it (a metadata timeout, an undelivered record).
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("streamrec.kafka")

# Connection failures librdkafka retries on its own (facility FAIL). A name that does not resolve, a TLS or
# SASL failure is a configuration error and keeps its level.
RETRIED = re.compile(
    r"Connection refused|Connection reset|Disconnected|connection closed|timed out|Broker transport failure"
)
THREAD_PREFIX = re.compile(r"^\[thrd:[^\]]*\]: ")


def client_log_level(level: int, facility: str, message: str) -> int:
    """The Python level of a librdkafka line; ``level`` is confluent-kafka's mapping of its syslog level
    (3 error -> ERROR, 4 warning -> WARNING, 5-6 notice and info -> INFO, 7 debug -> DEBUG)."""
    if facility == "FAIL" and RETRIED.search(message):
        return min(level, logging.INFO)
    return level


class ClientLog:
    """What confluent-kafka takes as a client's ``logger``: it calls ``log(level, "%s [%s] %s", facility,
    client name, message)`` from the client's poll, consume and flush calls."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def log(self, level: int, msg: str, *args: Any) -> None:
        if len(args) != 3:
            self.logger.log(level, msg, *args)
            return
        facility, client, message = (str(a) for a in args)
        level = client_log_level(level, facility, message)
        if self.logger.isEnabledFor(level):
            self.logger.log(level, "kafka client %s: %s", client, THREAD_PREFIX.sub("", message))


CLIENT_LOG = ClientLog(log)


def client_logging() -> dict[str, Any]:
    """The config entry that sends a Producer's, Consumer's or AdminClient's log lines to Python logging."""
    return {"logger": CLIENT_LOG}
