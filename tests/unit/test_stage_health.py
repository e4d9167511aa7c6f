"""What the event stage's /health says about the broker: lost on a client error, back once librdkafka's
statistics show a broker connection up, even on an idle worker that no record or assignment wakes."""

from __future__ import annotations

import json
from pathlib import Path

from confluent_kafka import KafkaError

from streamrec.catalog import Catalog
from streamrec.serde import AvroCodec
from streamrec.settings import Settings
from streamrec.streams.event_stage import EventStage, broker_up
from tests.unit.test_kafka_security import NoRecommender


def stats(*states: str) -> str:
    """librdkafka's statistics JSON, as much of it as matters: one entry per broker connection."""
    brokers = {
        f"127.0.0.1:{9092 + n}/{n}": {"name": f"b{n}", "nodeid": n, "state": s} for n, s in enumerate(states)
    }
    return json.dumps({"name": "worker-0#consumer-1", "type": "consumer", "brokers": brokers})


def test_broker_up_reads_the_connection_states() -> None:
    assert broker_up(stats("UP"))
    assert broker_up(stats("DOWN", "UP"))
    assert not broker_up(stats("DOWN", "CONNECT", "TRY_CONNECT"))
    assert not broker_up(json.dumps({"brokers": {}}))
    assert not broker_up("not json")


def test_an_idle_worker_says_connected_again_once_a_broker_is_up(tmp_path: Path) -> None:
    stage = EventStage(
        Settings(data_dir=tmp_path, ranking_process=False), Catalog(), NoRecommender(), AvroCodec()
    )
    assert stage.disconnected_since is None
    stage._on_client_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    lost = stage.disconnected_since
    assert lost is not None
    stage._on_client_error(KafkaError(KafkaError._TRANSPORT))
    assert stage.disconnected_since == lost  # since the first loss
    stage._on_client_stats(stats("DOWN"))
    assert stage.disconnected_since == lost
    stage._on_client_stats(stats("UP"))
    assert stage.disconnected_since is None
    # The producers are still replaced at the next assignment: a broker that restarted empty forgot them.
    assert stage._lost_brokers
