"""The broker stopped under load and a new one started on its port: the worker and the producer client
reconnect by themselves, the producer reports what it could not deliver (never drops it), the worker's
health says when it has no broker, and every event the new broker acknowledged is applied exactly once.

The embedded broker keeps nothing: the new one is empty, and is given streamrec's topics as the first one
was (`streamrec topics create`). Events it held that no worker had read yet are gone with it, so the load
pauses until the worker has applied everything before the broker goes; from then on it sends throughout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.reliability import SteadyLoad, applied_clicks, rig, users_of
from streamrec.streams.broker import EmbeddedBroker
from streamrec.streams.topics import create_topics
from tests.conftest import wait_for

pytestmark = pytest.mark.reliability

DELIVERY_TIMEOUT_MS = 3000  # the producer client's, shorter than the outage: some records must time out


def test_a_broker_restart_under_load_is_ridden_out_and_every_acknowledged_event_is_applied_once(
    model_registry: Path, tmp_path: Path
) -> None:
    with rig(model_registry, tmp_path, producer_delivery_timeout_ms=DELIVERY_TIMEOUT_MS) as r:
        worker = r.worker("w0")
        worker.wait_ready()
        worker.wait_catalog(len(r.catalog), timeout_s=60)
        pid = worker.pid
        before, during, after = users_of("before", 20), users_of("during", 20), users_of("after", 20)
        # 60 clicks/s over 20 users: 333 ms apart per user, slower than the bot detector's 250 ms
        load = SteadyLoad(r.producer, before, r.items, rate=60).start()
        wait_for(lambda: load.total >= 200, 30, what="events before the outage")
        load.drain()
        wait_for(
            lambda: applied_clicks(worker, before) == load.sent, 60, what="every event before the outage"
        )
        assert worker.health()["broker_connected"] is True

        port = r.broker.port
        r.broker.stop()
        load.users = during
        load.set_rate(60)
        down = wait_for(
            lambda: (h := worker.health()).get("broker_connected") is False and h,
            30,
            what="/health to say the broker is gone",
        )
        assert down["stage_alive"] and down["disconnected_since"] is not None
        # Longer than the producer's delivery timeout: records sent at the start of it are reported.
        wait_for(lambda: load.reported > 0, 30, what="the producer to report records it could not deliver")

        r.broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker-2.log").start()
        create_topics(r.settings)
        wait_for(lambda: worker.health().get("broker_connected") is True, 60, what="/health to say connected")
        load.users = after
        wait_for(lambda: sum(load.sent[u] for u in after) >= 300, 30, what="events after the restart")
        load.drain()
        assert load.error is None, load.error

        everyone = during + after
        expected = {u: load.sent[u] for u in everyone}
        wait_for(
            lambda: applied_clicks(worker, everyone) == expected, 90, what="every acknowledged event applied"
        )
        assert applied_clicks(worker, before) == {u: load.sent[u] for u in before}, "local state kept"
        assert worker.alive() and worker.pid == pid, "the worker was never restarted"
        health = worker.health()
        assert health["stage_alive"] and health["broker_connected"] and health["disconnected_since"] is None
        assert sorted(health["assignment"][r.settings.events_topic]) == list(range(r.settings.partitions))
