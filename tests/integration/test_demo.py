"""`streamrec demo` as a new user first sees it: the whole run's output reads as a product's, with no raw
librdkafka log line and no traceback, and it ends with its JSON line of totals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

RAW_LIBRDKAFKA = re.compile(r"%\d\|\d+\.\d+\|")  # %3|1796528413.552|FAIL|rdkafka#producer-1| ...


def test_a_short_demo_prints_no_client_noise_and_ends_with_its_totals(
    model_registry: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env["STREAMREC_MODEL_REGISTRY"] = str(model_registry)  # the session's trained sample model: no training
    done = subprocess.run(
        [sys.executable, "-m", "streamrec.cli", "demo", "--seconds", "5", "--rate", "200", "--users", "200"],
        cwd=tmp_path,  # the demo's files go to ./var/demo
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert not RAW_LIBRDKAFKA.search(output), output
    assert "Traceback (most recent call last)" not in output, output
    totals = json.loads(done.stdout.strip().splitlines()[-1])
    assert totals["events"] > 0 and totals["recommendations"] > 0, output
