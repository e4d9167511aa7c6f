"""`streamrec worker` as a child process, as ops run it; the demo, replay, benchmarks and tests use it."""

from __future__ import annotations

import contextlib
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

from streamrec.settings import SECRET_FILES, Settings
from streamrec.streams.broker import free_port


class WorkerNotReady(RuntimeError):
    pass


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process these settings (secrets included; unset ones left out)."""
    env = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None or name in SECRET_FILES.values():  # the secret read from it is passed itself
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"STREAMREC_{name.upper()}"] = str(value)
    return env


class ChildProcess:
    """A `streamrec` command in a child process of its own session, its output in ``log_path``: what the
    worker, trainer and API handles share (start, alive, kill -9, SIGTERM and wait, the log's tail)."""

    command = ""  # the streamrec subcommand

    def __init__(self, settings: Settings, name: str, log_path: Path) -> None:
        self.settings = settings
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _spawn(self, env: dict[str, str], stdout_path: Path | None = None) -> None:
        """Start the command with these settings' environment, ``env`` on top, and the environment's own
        variables other than streamrec's. Its stdout goes to ``stdout_path`` if given, else to the log."""
        full = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")},
            **settings_env(self.settings),
            **env,
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as files:
            log = files.enter_context(self.log_path.open("ab"))
            out = files.enter_context(stdout_path.open("ab")) if stdout_path is not None else log
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamrec.cli", self.command],
                env=full,
                stdout=out,
                stderr=log if out is not log else subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the parent's terminal is the parent's to handle
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9: no flush, no commit, no leaving the group; work in progress is lost."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait()

    def stop(self, timeout_s: float = 20) -> int | None:
        """SIGTERM and wait (kill -9 after ``timeout_s``); the exit code, None if it never started."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def fetch_text(url: str) -> str:
    """A plain-text page (such as /metrics); empty while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return ""


class WorkerProcess(ChildProcess):
    """One worker process with its own data dir and web port; its output goes to `log_path`."""

    command = "worker"

    def __init__(
        self,
        settings: Settings,
        data_dir: Path,
        name: str,
        log_path: Path | None = None,
    ) -> None:
        super().__init__(settings, name, log_path or data_dir.parent / f"{name}.log")
        self.data_dir = data_dir
        self.web_port = free_port()
        self.api_key = secrets.token_urlsafe(24)  # this handle's own key for the user-data routes

    def start(self) -> WorkerProcess:
        """Start ``streamrec worker`` with every one of this object's settings (its own data dir, web port,
        name and API key on top) and the environment's variables other than streamrec's."""
        self._spawn(
            {
                "STREAMREC_DATA_DIR": str(self.data_dir),
                "STREAMREC_WEB_PORT": str(self.web_port),
                "STREAMREC_WEB_ENABLED": "true",
                "STREAMREC_WORKER_ID": self.name,
                "STREAMREC_API_KEYS": ",".join([self.api_key, *self.settings.api_key_list()]),
            }
        )
        return self

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
        return fetch_text(f"http://127.0.0.1:{self.web_port}/metrics")

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
