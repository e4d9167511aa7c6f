"""`streamrec trainer` as a child process, as ops run it; the integration tests and the demo use it."""

from __future__ import annotations

import json
from pathlib import Path

from streamrec.settings import Settings
from streamrec.streams.broker import free_port
from streamrec.streams.process import ChildProcess, fetch_text


class TrainerProcess(ChildProcess):
    """One trainer process; its run summaries (stdout, one JSON line per run) go to ``out_path``, its log
    lines to ``log_path``."""

    command = "trainer"

    def __init__(self, settings: Settings, root: Path, name: str = "trainer") -> None:
        super().__init__(settings, name, root / f"{name}.log")
        self.metrics_port = free_port()
        self.out_path = root / f"{name}.jsonl"

    def start(self) -> TrainerProcess:
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self._spawn({"STREAMREC_TRAINER_METRICS_PORT": str(self.metrics_port)}, stdout_path=self.out_path)
        return self

    def runs(self) -> list[dict]:
        """The summaries of the runs finished so far."""
        try:
            lines = self.out_path.read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.startswith("{")]

    def metrics_text(self) -> str:
        return fetch_text(f"http://127.0.0.1:{self.metrics_port}/metrics")
