"""Abuse, against a real broker and worker process: a user over the rate limit has the excess dead-lettered as
``rate_limited`` and the rest applied; a bot clicking faster than a person is flagged in its state and the
worker's metrics; the trainer's window, read from the same topics, leaves the flagged user out and refuses
the same events the worker did; a person beside them is untouched."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from streamrec.serde import AvroCodec
from streamrec.streams.trainer.window import read_window
from tests.conftest import wait_for
from tests.integration.conftest import running_cluster
from tests.reliability.test_fuzz import metric_sum

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]  # the shared model may train in setup

FLOOD = 150  # clicks sent as fast as the client goes: far over 50 per second after a burst of 20
BOT = 40  # clicks each a few milliseconds after the last by their timestamps: a streak of 10 flags the user


def test_a_flood_is_rate_limited_a_bot_is_flagged_and_the_trainer_leaves_both_as_the_worker_did(
    model_registry: Path, tmp_path: Path
) -> None:
    with running_cluster(
        model_registry,
        tmp_path,
        user_rate_limit=50.0,
        user_rate_burst=20,
        bot_fast_streak=10,
        bot_min_gap_ms=250,
    ) as cluster:
        settings, worker, producer = cluster.settings, cluster.workers[0], cluster.producer
        items = [i.item_id for i in cluster.catalog if i.in_stock][:20]
        now = int(time.time() * 1000)
        for n in range(10):  # a person: a click a minute
            producer.click("person", items[n % 5], timestamp=now - 60_000 * (10 - n))
        producer.flush()
        for n in range(FLOOD):
            producer.click("flooder", items[n % 20], timestamp=now - 1_000 * (FLOOD - n))
        for n in range(BOT):
            producer.click("bot", items[0], timestamp=now - 5 * (BOT - n))
        producer.flush()
        last = producer.click("person", items[6])
        producer.flush()
        cluster.output.wait_for_cause("person", last, timeout_s=60)

        def limited(user: str = "flooder") -> list[dict]:
            return [
                d
                for d in list(cluster.output.dead_letters)
                if d["reason"] == "rate_limited" and d["key"] == user.encode()
            ]

        def flood_outcome() -> tuple[dict, list[dict]] | None:
            state, refused = worker.state("flooder") or {}, limited()
            return (state, refused) if state.get("clicks", 0) + len(refused) >= FLOOD else None

        # Their timestamps are a second apart, but the clicks arrived at once: over the rate after the burst.
        flooder, refused = wait_for(flood_outcome, 30, what="the flood's outcome")
        assert len(refused) + flooder["clicks"] == FLOOD
        assert FLOOD - len(refused) >= settings.user_rate_burst and len(refused) >= FLOOD // 2
        assert "over 50 events per second" in refused[0]["detail"]
        assert flooder["flagged"] is None, "a second apart by their timestamps: not inhumanly fast"

        # The bot's clicks arrived at once too: some over the rate; those applied flag it.
        state = wait_for(
            lambda: (s := worker.state("bot")) and s["clicks"] + len(limited("bot")) == BOT and s,
            30,
            what="the bot's clicks",
        )
        assert state["flagged"] == "inhuman_speed" and state["fast_streak"] >= 10
        person_state = worker.state("person")
        assert person_state is not None and person_state["clicks"] == 11 and person_state["flagged"] is None
        metrics = worker.metrics_text()
        assert metric_sum(metrics, 'streamrec_flagged_users_total{reason="inhuman_speed"}') == 1
        over = metric_sum(metrics, 'streamrec_dead_letters_total{reason="rate_limited"}')
        assert over == len(refused) + len(limited("bot"))

        # The trainer reads the same topics and judges them as the worker did, from the records' own times.
        window, _ = read_window(settings.model_copy(update={"trainer_window_events": 100_000}), AvroCodec())
        users = [e.user_id for e in window.events]
        assert "bot" not in users and users.count("person") == 11
        assert users.count("flooder") == flooder["clicks"]
        d = window.description
        assert d["rate_limited"] == len(refused) and d["flagged_users"] == {"inhuman_speed": 1}
        assert d["flagged_events_left_out"] == BOT
