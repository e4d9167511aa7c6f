"""What a worker measures about itself every ``STREAMREC_LAG_CHECK_S`` for /metrics: the consumer lag of the
partitions it reads, and the bytes of its state on disk. Blocking calls: the worker runs ``sample`` in an
executor."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from streamrec.settings import Settings
from streamrec.streams.metrics import WorkerMetrics
from streamrec.streams.ops.lag import LagProbe, PartitionLag

log = logging.getLogger(__name__)


def directory_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist); files deleted meanwhile are skipped."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # RocksDB deletes compacted files as it goes
                continue
    return total


class WorkerSampler:
    def __init__(self, settings: Settings, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._probe: LagProbe | None = None

    def sample(self, assignment: Mapping[str, list[int]]) -> list[PartitionLag]:
        """Measure and set the gauges; returns the lag of each partition read. A measurement that fails is
        logged and leaves the gauges as they were: it runs in a faust timer, where an exception would end
        the worker."""
        found: list[PartitionLag] = []
        try:
            found = self._lags(assignment)
            self.metrics.state_bytes.set(directory_bytes(self.settings.data_dir / "state"))
        except Exception as exc:
            log.warning("consumer lag or state size not measured: %s", exc)
        return found

    def _lags(self, assignment: Mapping[str, list[int]]) -> list[PartitionLag]:
        partitions = [(topic, p) for topic, ps in assignment.items() for p in ps]
        found = []
        if partitions:  # none while the group assigns them
            if self._probe is None:
                self._probe = LagProbe(self.settings)
            found = self._probe.measure(self.settings.events_group, partitions)
        self.metrics.consumer_lag.clear()  # partitions revoked since the last sample go
        for lag in found:
            self.metrics.consumer_lag.labels(lag.topic, str(lag.partition)).set(lag.lag)
        return found

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
