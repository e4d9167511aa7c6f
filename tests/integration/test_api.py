"""`streamrec api` and `streamrec status` against a real broker and a real worker: what a web backend and an
operator see, erasure included, and a replica that restarts or loses its view."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamrec.streams.api.process import ApiProcess
from streamrec.streams.process import settings_env
from tests.conftest import wait_for
from tests.integration.conftest import Cluster, running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(model_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One worker that measures its lag every second and logs JSON lines."""
    root = tmp_path_factory.mktemp("api-cluster")
    with running_cluster(model_registry, root, lag_check_s=1.0, log_format="json", log_level="info") as c:
        yield c


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[ApiProcess]:
    replica = ApiProcess(cluster.settings, cluster.root / "api-0").start()
    replica.wait_ready()
    yield replica
    replica.stop()


def user() -> str:
    return f"api-{uuid.uuid4().hex[:10]}"


def shop(cluster: Cluster, u: str) -> tuple[str, list[str]]:
    """A search, two clicks and a purchase in one category; returns the last event's id and the items."""
    items = [i.item_id for i in cluster.catalog if i.category == "beauty/skin care" and i.in_stock][:3]
    cluster.producer.search(u, "hydrating serum")
    cluster.producer.click(u, items[0])
    cluster.producer.click(u, items[1])
    last = cluster.producer.purchase(u, items[2], price=19.9)
    cluster.producer.flush()
    return last, items


def newest(api: ApiProcess, u: str, cause: str) -> dict:
    """The API's recommendation for ``u`` once it reflects the event ``cause``."""
    return wait_for(
        lambda: (found := api.user(u))[0] == 200 and found[1]["cause_event_id"] == cause and found[1],
        30,
        what=f"the API's recommendation for {u} caused by {cause}",
    )


def test_the_api_serves_the_newest_recommendation_and_a_profile_and_forgets_an_erased_user(
    cluster: Cluster, api: ApiProcess
) -> None:
    u = user()
    last, items = shop(cluster, u)
    published = cluster.output.wait_for_cause(u, last)
    rec = newest(api, u, last)
    assert [i["item_id"] for i in rec["items"]] == [i.item_id for i in published.items]
    assert rec["model_version"] == cluster.workers[0].health()["model_version"]
    assert rec["age_ms"] >= 0 and rec["publish_time"] == published.publish_time
    assert all(i["reason"] and i["explanation"] for i in rec["items"])

    status, profile = wait_for(
        lambda: (
            (found := api.user(u, "profile"))[0] == 200 and found[1]["totals"]["purchases"] == 1 and found
        ),
        30,
        what="the profile",
    )
    assert profile["top_categories"][0] == {"category": "beauty/skin care", "weight": 1.0}
    assert profile["recent_searches"][0]["query"] == "hydrating serum"
    assert profile["totals"] == {"clicks": 2, "searches": 1, "purchases": 1}
    prices = sorted(p for i in items if (p := cluster.by_id[i].price) is not None)
    assert profile["price_band"]["min"] == prices[0] and profile["price_band"]["max"] == prices[-1]
    assert profile["visits"]["count"] == 1 and profile["purchases"]["count"] == 1

    assert api.request(f"/users/{u}/recommendations")[0] == 401
    assert api.request(f"/users/{u}/profile", {"Authorization": "Bearer wrong"})[0] == 401
    assert api.request(f"/users/{u}/recommendations", {"Authorization": f"Bearer {api.api_key}"})[0] == 200
    assert api.user("nobody-at-all")[0] == 404 and api.user("nobody-at-all", "profile")[0] == 404

    cluster.producer.delete_user(u)
    cluster.producer.flush()
    wait_for(lambda: api.user(u)[0] == 404, 30, what="the erased user's recommendation to go")
    assert api.user(u, "profile")[0] == 404


def test_a_replica_restarted_or_without_its_view_answers_as_before(cluster: Cluster, api: ApiProcess) -> None:
    kept, erased = user(), user()
    kept_last, _ = shop(cluster, kept)
    erased_last, _ = shop(cluster, erased)
    before = newest(api, kept, kept_last)
    newest(api, erased, erased_last)
    cluster.producer.delete_user(erased)
    cluster.producer.flush()
    wait_for(lambda: api.user(erased)[0] == 404, 30, what="the erasure")

    # Another replica, with an empty directory: everything from the topics, the erasure included (the
    # erased user's recommendations are still on the topic, and are read again).
    fresh = ApiProcess(cluster.settings, cluster.root / "api-fresh").start()
    try:
        assert fresh.wait_ready()["records"] > 0
        assert {k: v for k, v in fresh.user(kept)[1].items() if k != "age_ms"} == {
            k: v for k, v in before.items() if k != "age_ms"
        }
        assert fresh.user(erased)[0] == 404 and fresh.user(erased, "profile")[0] == 404
        assert fresh.user(kept, "profile")[0] == 200
    finally:
        assert fresh.stop() == 0, fresh.log_tail()

    # The same replica restarted on its own directory goes on from its offsets.
    again = ApiProcess(cluster.settings, cluster.root / "api-fresh").start()
    try:
        assert again.wait_ready()["records"] < 50, "a restart reads only what is new"
        assert again.user(kept)[1]["cause_event_id"] == kept_last
        assert again.user(erased)[0] == 404
    finally:
        again.stop()
    log_lines = [json.loads(line) for line in again.log_tail(100_000).splitlines() if line.startswith("{")]
    assert any(line.get("service") == "api" for line in log_lines), again.log_tail()


def test_status_shows_the_workers_partitions_lag_dead_letters_and_model(
    cluster: Cluster, api: ApiProcess
) -> None:
    worker = cluster.workers[0]
    cluster.producer.send_raw(cluster.settings.events_topic, b"junk-user", b"not avro")
    shop(cluster, user())
    wait_for(
        lambda: (
            'reason="undecodable"' in worker.metrics_text()
            and "streamrec_consumer_lag{" in worker.metrics_text()
        ),
        30,
        what="a dead letter and a lag measurement in the worker's metrics",
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")},
        **settings_env(cluster.settings),
        "STREAMREC_WORKER_URLS": f"http://127.0.0.1:{worker.web_port}",
        "STREAMREC_API_URLS": api.url,
        "STREAMREC_LOG_FORMAT": "text",
    }
    command = [sys.executable, "-m", "streamrec.cli", "status", "--interval", "1"]
    found = json.loads(subprocess.run([*command, "--json"], env=env, capture_output=True, check=True).stdout)
    (shown,) = found["workers"]
    health = worker.health()
    assert shown["up"] and shown["ready"] and shown["worker_id"] == worker.name
    assert shown["partitions"] == list(range(cluster.settings.partitions))
    assert shown["model_version"] == health["model_version"] and shown["events_total"] > 0
    assert found["dead_letters_by_reason"]["undecodable"] >= 1
    groups = {g["group"]: g for g in found["kafka"]["groups"]}
    events = groups[cluster.settings.events_group]["topics"][cluster.settings.events_topic]
    assert events["partitions"] == cluster.settings.partitions and events["lag"] >= 0
    assert found["kafka"]["dead_letter_records"] >= 1
    assert found["kafka"]["trainer"]["state"] == "no fine-tuning trigger yet"
    assert found["apis"][0]["ready"] is True

    table = subprocess.run(command, env=env | {"COLUMNS": "200"}, capture_output=True, check=True, text=True)
    for expected in (worker.name, "consumer lag", cluster.settings.events_group, "undecodable", "trainer"):
        assert expected in table.stdout, table.stdout

    # The worker's JSON log lines name it and the model it serves.
    lines = [json.loads(line) for line in worker.log_tail(200_000).splitlines() if line.startswith("{")]
    assert lines and all(line["worker_id"] == worker.name for line in lines)
    assert any(line.get("model_version") == health["model_version"] for line in lines)
