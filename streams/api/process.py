"""`streamrec api` as a child process, as operators run it: for tests and the API benchmark."""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from streamrec.settings import Settings
from streamrec.streams.broker import free_port
from streamrec.streams.process import ChildProcess


class ApiNotReady(RuntimeError):
    pass


class ApiProcess(ChildProcess):
    """One API replica with its own view directory, port and API key; its output goes to ``log_path``."""

    command = "api"

    def __init__(self, settings: Settings, data_dir: Path, log_path: Path | None = None) -> None:
        super().__init__(settings, data_dir.name, log_path or data_dir.parent / f"{data_dir.name}.log")
        self.data_dir = data_dir
        self.port = free_port()
        self.api_key = secrets.token_urlsafe(24)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProcess:
        self._spawn(
            {
                "STREAMREC_API_DATA_DIR": str(self.data_dir),
                "STREAMREC_API_PORT": str(self.port),
                "STREAMREC_API_HOST": "127.0.0.1",
                "STREAMREC_API_KEYS": ",".join([self.api_key, *self.settings.api_key_list()]),
            }
        )
        return self

    def request(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, decoded JSON or text) of a GET; status 0 while the server does not answer."""
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        except OSError:
            return 0, None
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode()

    def user(self, user_id: str, what: str = "recommendations") -> tuple[int, Any]:
        """GET /users/{id}/{what} with this replica's key."""
        quoted = urllib.parse.quote(user_id, safe="")
        return self.request(f"/users/{quoted}/{what}", {"X-API-Key": self.api_key})

    def wait_ready(self, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise ApiNotReady(f"streamrec api exited before it was ready:\n{self.log_tail()}")
            status, body = self.request("/health/ready")
            if status == 200:
                return body
            if time.monotonic() > deadline:
                raise ApiNotReady(
                    f"streamrec api not ready in {timeout_s:.0f} s ({body}):\n{self.log_tail()}"
                )
            time.sleep(0.1)
