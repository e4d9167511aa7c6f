"""Scale out and in under a steady load: one worker, then three, then one of them killed (SIGKILL), then back
to one. Every event is applied exactly once: each user's click count in the last worker's state equals the
clicks sent (a lost event lowers it, one applied twice raises it). benchmarks/reliability.py `scaling`
prints each move's pause."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.reliability import SteadyLoad, applied_clicks, rig, scaling, users_of
from tests.conftest import wait_for

pytestmark = pytest.mark.reliability


def test_one_three_kill_one_back_to_one_under_load_loses_nothing_and_applies_nothing_twice(
    model_registry: Path, tmp_path: Path
) -> None:
    with rig(model_registry, tmp_path) as r:
        users = users_of("shopper", 200)
        load = SteadyLoad(r.producer, users, r.items, rate=100)
        figures = scaling(r, load, hold_s=2.0)
        load.drain()
        assert load.error is None, load.error
        assert [m["move"] for m in figures["moves"]][1:] == [
            "1 -> 3 workers",
            "kill -9 one of 3",
            "stop one of 2 (back to 1)",
        ]
        assert all(m["recommendations"] > 0 for m in figures["moves"]), figures
        last = r.alive()
        assert [w.name for w in last] == ["w0"]
        expected = dict(load.sent)
        assert sum(expected.values()) > 500
        wait_for(lambda: applied_clicks(last[0], users) == expected, 90, what="every event applied once")
