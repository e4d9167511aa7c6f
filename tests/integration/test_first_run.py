"""A backend developer's first run with no dataset: a worker without a model says which command gives it one,
and that command promotes a model in the registry the worker reads (README "Quickstart: a backend that
sends events")."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamrec.cli import app
from streamrec.models import registry
from streamrec.settings import Settings
from streamrec.streams.process import WorkerProcess

pytestmark = pytest.mark.integration


def test_a_worker_without_a_model_names_the_command_and_that_command_gives_it_one(
    settings: Settings, tmp_path: Path
) -> None:
    empty = settings.model_copy(update={"model_registry": tmp_path / "models"})
    worker = WorkerProcess(empty, tmp_path / "worker", "no-model").start()
    deadline = time.monotonic() + 60
    while worker.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not worker.alive(), "a worker with nothing to serve stops"
    assert worker.process is not None and worker.process.returncode != 0
    log = worker.log_tail()
    assert "streamrec models sample" in log and "Traceback" not in log, log

    result = CliRunner().invoke(app, ["models", "sample", "--registry", str(empty.model_registry)])
    assert result.exit_code == 0, result.output
    served = registry.current(empty.model_registry)
    assert served is not None
    config = json.loads((served / "config.json").read_text())
    assert config["encoder"]["text_embedder"] == "minilm"  # a shop's own items are recommended by their text
    # (a worker serving the registry's current model is what every other worker test starts)
