"""`streamrec worker` as a child process, as ops run it; the demo, replay, benchmarks and tests use it."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

from streamrec.settings import Settings
from streamrec.streams.broker import free_port


class WorkerNotReady(RuntimeError):
    pass


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process these settings (secrets included; unset ones left out)."""
    env = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"STREAMREC_{name.upper()}"] = str(value)
    return env


class WorkerProcess:
    """One worker process with its own data dir and web port; its output goes to `log_path`."""

    def __init__(
        self,
        settings: Settings,
        data_dir: Path,
        name: str,
        log_path: Path | None = None,
    ) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.name = name
        self.web_port = free_port()
        self.log_path = log_path or data_dir.parent / f"{name}.log"
        self.api_key = secrets.token_urlsafe(24)  # this handle's own key for the user-data routes
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> WorkerProcess:
        """Start ``streamrec worker`` with every one of this object's settings (its own data dir, web port,
        name and API key on top) and the environment's variables other than streamrec's."""
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")},
            **settings_env(self.settings),
            "STREAMREC_DATA_DIR": str(self.data_dir),
            "STREAMREC_WEB_PORT": str(self.web_port),
            "STREAMREC_WEB_ENABLED": "true",
            "STREAMREC_WORKER_ID": self.name,
            "STREAMREC_API_KEYS": ",".join([self.api_key, *self.settings.api_key_list()]),
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamrec.cli", "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the parent's terminal is the parent's to handle
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def get(self, path: str) -> dict | None:
        """GET a JSON page of the worker's web server (with this handle's API key); None while it is not
        answering."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.web_port}{path}", headers={"X-API-Key": self.api_key}
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read()) if exc.code == 404 else None
        except (OSError, ValueError):
            return None

    def health(self) -> dict:
        return self.get("/health") or {}

    def metrics_text(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/metrics", timeout=2) as response:
                return response.read().decode()
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_until(self, condition: str, check: Callable[[dict], bool], timeout_s: float = 120) -> None:
        """Poll `check(health)` until true; fail early, with the log's tail, if the process exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise WorkerNotReady(f"{self.name} exited before {condition}:\n{self.log_tail()}")
            if check(self.health()):
                return
            if time.monotonic() > deadline:
                raise WorkerNotReady(f"{self.name}: no {condition} in {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def wait_ready(self, timeout_s: float = 120) -> None:
        self.wait_until("readiness", lambda h: bool(h.get("ready")), timeout_s)

    def wait_catalog(self, items: int, timeout_s: float = 120) -> None:
        self.wait_until(f"catalogue of {items}", lambda h: h.get("catalog_items", 0) >= items, timeout_s)

    def state(self, user_id: str) -> dict | None:
        found = self.get(f"/users/{user_id}/state")
        return found if found and found.get("found") else None

    def kill(self) -> None:
        """kill -9: no flush, no commit, no leaving the group."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait()

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM and wait: the worker finishes its batch, commits and leaves the group."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
