"""`streamrec trainer` as a child process, as ops run it; the integration tests and the demo use it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from streamrec.settings import Settings
from streamrec.streams.broker import free_port
from streamrec.streams.process import settings_env


class TrainerProcess:
    """One trainer process; its run summaries (stdout, one JSON line per run) go to ``out_path``, its log
    lines to ``log_path``."""

    def __init__(self, settings: Settings, root: Path, name: str = "trainer") -> None:
        self.settings = settings
        self.name = name
        self.metrics_port = free_port()
        self.out_path = root / f"{name}.jsonl"
        self.log_path = root / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> TrainerProcess:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")},
            **settings_env(self.settings),
            "STREAMREC_TRAINER_METRICS_PORT": str(self.metrics_port),
        }
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        with self.out_path.open("ab") as out, self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamrec.cli", "trainer"],
                env=env,
                stdout=out,
                stderr=log,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def runs(self) -> list[dict]:
        """The summaries of the runs finished so far."""
        try:
            lines = self.out_path.read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.startswith("{")]

    def metrics_text(self) -> str:
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9: a run in progress is lost, its triggers are not committed."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait()

    def stop(self, timeout_s: float = 20) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
