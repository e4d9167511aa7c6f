"""`streamrec status`: one terminal view of a running deployment.

What it reads: each worker's /health (partitions, model version, readiness) and /metrics twice,
``interval_s`` apart (events/s, the p99 of event-to-recommendation latency over that interval, dead letters
by reason, consumer lag, state size); Kafka (every consumer group's committed offsets against the high
watermarks, the records held on the dead-letter topic, the newest model update and fine-tuning trigger);
and each API replica's /health/ready. ``collect`` gathers a plain dict (``--json`` prints it); ``render``
draws it with rich.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group, RenderableType
from rich.table import Table

from streamrec.serde import Codec, DecodeError
from streamrec.settings import Settings
from streamrec.streams.ops.lag import TP, LagProbe
from streamrec.streams.reading import consume_arrived
from streamrec.streams.schema_store import make_codec

LATENCY = "streamrec_event_to_recommendation_seconds"

Samples = list[tuple[str, dict[str, str], float]]  # (sample name, labels, value)


# --- reading metrics (pure) ---------------------------------------------------------------------------


def parse_metrics(text: str) -> Samples:
    return [
        (s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples
    ]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items()))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for n, labels, value in samples:
        if n == name and label in labels:
            found[labels[label]] = found.get(labels[label], 0.0) + value
    return found


def buckets(samples: Samples, histogram: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets, (upper bound, count), in order of bound."""
    found = by_label(samples, f"{histogram}_bucket", "le")
    return sorted((float(le), count) for le, count in found.items())


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative buckets as Prometheus's ``histogram_quantile`` estimates it: linear
    within the bucket that holds it; the highest finite bound when it falls in the +Inf bucket. None when
    the histogram is empty."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def interval_buckets(before: Samples, after: Samples, histogram: str) -> list[tuple[float, float]]:
    """The buckets of what was observed between two samples (a worker that restarted: what it has now)."""
    old = dict(buckets(before, histogram))
    new = buckets(after, histogram)
    diff = [(le, count - old.get(le, 0.0)) for le, count in new]
    return new if any(c < 0 for _, c in diff) else diff


def worker_summary(
    url: str, health: Mapping[str, Any] | None, before: Samples, after: Samples, seconds: float
) -> dict[str, Any]:
    """One worker's line of the status, from its /health and two samples of its /metrics."""
    if health is None:
        return {"url": url, "up": False}
    events = total(after, "streamrec_events_total")
    rate = (events - total(before, "streamrec_events_total")) / seconds if seconds > 0 and before else None
    p99 = histogram_quantile(0.99, interval_buckets(before, after, LATENCY) if before else [])
    return {
        "url": url,
        "up": True,
        "worker_id": health.get("worker_id"),
        "ready": bool(health.get("ready")) and bool(health.get("stage_alive")),
        "partitions": health.get("partitions", []),
        "model_version": health.get("model_version"),
        "events_total": int(events),
        "events_per_s": None if rate is None else round(max(rate, 0.0), 1),
        "latency_p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "consumer_lag": int(total(after, "streamrec_consumer_lag")),
        "state_bytes": int(total(after, "streamrec_state_bytes")),
        "dead_letters": {
            k: int(v) for k, v in by_label(after, "streamrec_dead_letters_total", "reason").items()
        },
    }


def trainer_state(last_trigger: Mapping[str, Any] | None, last_update: Mapping[str, Any] | None) -> str:
    """What the topics say of fine-tuning: waiting for a trigger, or triggered and not promoted since."""
    if last_trigger is None:
        return "no fine-tuning trigger yet"
    if last_update is None or last_trigger["created_at"] > last_update["promoted_at"]:
        return f"triggered ({last_trigger['reason']}); no model promoted since"
    return "idle: the last trigger was followed by a promotion"


# --- collecting (I/O) -------------------------------------------------------------------------------


def fetch(url: str, timeout_s: float = 2.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:  # /health answers 503 with its body when the stage is down
        return bytes(exc.read())
    except OSError:
        return None


def _json(raw: bytes | None) -> dict[str, Any] | None:
    try:
        found = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _metrics(url: str) -> Samples:
    raw = fetch(f"{url}/metrics")
    return parse_metrics(raw.decode()) if raw is not None else []


def newest_record(probe: LagProbe, codec: Codec, partitions: Iterable[TP]) -> dict[str, Any] | None:
    """The newest decodable record of a (small) control topic: the last one of each partition, by time."""
    ends = probe.ends(partitions)
    starts = [TopicPartition(t, p, high - 1) for (t, p), (low, high) in ends.items() if high > low]
    if not starts:
        return None
    consumer = probe.consumer
    consumer.assign(starts)
    newest: tuple[int, dict[str, Any]] | None = None
    deadline, pending = time.monotonic() + 5.0, {tp.partition for tp in starts}
    try:
        while pending and time.monotonic() < deadline:
            for msg in consume_arrived(consumer, 100, 0.2):
                pending.discard(msg.partition() or 0)
                if msg.error() is not None or msg.value() is None:
                    continue
                try:
                    _, record = codec.decode(msg.value() or b"")
                except DecodeError:
                    continue
                when = msg.timestamp()[1]
                if newest is None or when >= newest[0]:
                    newest = (when, record)
    finally:
        consumer.unassign()
    return newest[1] if newest is not None else None


def kafka_summary(settings: Settings) -> dict[str, Any]:
    """Consumer groups and their lag, the dead-letter topic's records, the trainer's topics."""
    probe = LagProbe(settings)
    try:
        probe.admin.list_topics(timeout=5.0)  # an unreachable broker: one clear error, at once
        groups = []
        for group in probe.groups():
            lags = probe.measure(group)
            per_topic: dict[str, dict[str, int]] = {}
            for lag in lags:
                entry = per_topic.setdefault(lag.topic, {"partitions": 0, "lag": 0})
                entry["partitions"] += 1
                entry["lag"] += lag.lag
            groups.append({"group": group, "lag": sum(x.lag for x in lags), "topics": per_topic})
        held = probe.ends(probe.partitions_of([settings.dead_letter_topic]))
        codec = make_codec(settings)
        trigger = newest_record(probe, codec, probe.partitions_of([settings.triggers_topic]))
        update = newest_record(probe, codec, probe.partitions_of([settings.model_updates_topic]))
        return {
            "groups": groups,
            "dead_letter_records": sum(high - low for low, high in held.values()),
            "trainer": {
                "last_trigger": trigger,
                "last_model_update": update,
                "state": trainer_state(trigger, update),
            },
        }
    finally:
        probe.close()


def collect(settings: Settings, interval_s: float = 2.0) -> dict[str, Any]:
    """Everything `streamrec status` shows, as a JSON-ready dict; Kafka that does not answer is reported as
    an error, not raised."""
    urls = settings.worker_url_list()
    with ThreadPoolExecutor(max(4, len(urls))) as pool:
        healths = list(pool.map(lambda u: _json(fetch(f"{u}/health")), urls))
        before = list(pool.map(_metrics, urls))
        started = time.monotonic()
        try:
            kafka: dict[str, Any] = kafka_summary(settings)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else exc
            why = error.str() if isinstance(error, KafkaError) else str(error)
            kafka = {"error": f"{settings.bootstrap_servers}: {why}"}
        except TimeoutError:
            kafka = {"error": f"{settings.bootstrap_servers}: no answer in time"}
        time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
        after = list(pool.map(_metrics, urls))
        seconds = time.monotonic() - started
        apis = [
            {"url": u, **(_json(fetch(f"{u}/health/ready")) or {"up": False})}
            for u in settings.api_url_list()
        ]
    workers = [
        worker_summary(u, h, b, a, seconds) for u, h, b, a in zip(urls, healths, before, after, strict=True)
    ]
    dead_letters: dict[str, int] = {}
    for w in workers:
        for reason, n in w.get("dead_letters", {}).items():
            dead_letters[reason] = dead_letters.get(reason, 0) + n
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "interval_s": round(seconds, 2),
        "workers": workers,
        "events_per_s": round(sum(w.get("events_per_s") or 0.0 for w in workers), 1),
        "dead_letters_by_reason": dead_letters,
        "kafka": kafka,
        "apis": apis,
    }


# --- drawing (pure) ----------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _when(ms: int | None) -> str:
    return "-" if not ms else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _or_dash(value: object) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int | float) else str(value)


def render(status: Mapping[str, Any]) -> RenderableType:
    kafka = status.get("kafka", {})
    trainer = kafka.get("trainer", {})
    promoted = (trainer.get("last_model_update") or {}).get("model_version")
    rate = f"{status['events_per_s']:,} events/s over {status['interval_s']} s"
    workers = Table(title=f"workers  ({rate}, {status['time']})", title_justify="left")
    numbers = ("events/s", "p99 ms", "lag", "state size")
    for name in ("worker", "state", "partitions", "model", *numbers):
        workers.add_column(name, justify="right" if name in numbers else "left")
    for w in status["workers"]:
        if not w["up"]:
            workers.add_row(w["url"], "[red]down[/]", *["-"] * 6)
            continue
        model = w["model_version"] or "-"
        if promoted is not None and model != promoted:
            model = f"[yellow]{model}[/] (promoted: {promoted})"
        workers.add_row(
            str(w["worker_id"]),
            "[green]ready[/]" if w["ready"] else "[yellow]not ready[/]",
            ",".join(str(p) for p in w["partitions"]) or "-",
            model,
            _or_dash(w["events_per_s"]),
            _or_dash(w["latency_p99_ms"]),
            _or_dash(w["consumer_lag"]),
            _size(w["state_bytes"]),
        )
    parts: list[RenderableType] = [workers]
    if "error" in kafka:
        parts.append(f"[red]Kafka: {kafka['error']}[/]")
    else:
        groups = Table(title="consumer lag by group", title_justify="left")
        for name in ("group", "topic", "partitions", "lag"):
            groups.add_column(name, justify="right" if name in ("partitions", "lag") else "left")
        for g in kafka["groups"]:
            for topic, t in sorted(g["topics"].items()):
                groups.add_row(g["group"], topic, str(t["partitions"]), f"{t['lag']:,}")
        parts.append(groups)
    dead = Table(
        title="dead letters (since the workers started)",
        caption=f"{kafka.get('dead_letter_records', '-'):,} held on the topic"
        if "dead_letter_records" in kafka
        else None,
        title_justify="left",
    )
    dead.add_column("reason")
    dead.add_column("records", justify="right")
    for reason, n in sorted(status["dead_letters_by_reason"].items(), key=lambda kv: -kv[1]):
        dead.add_row(reason, f"{n:,}")
    parts.append(dead)
    if trainer:
        trigger, update = trainer.get("last_trigger"), trainer.get("last_model_update")
        train = Table(title="trainer", title_justify="left", show_header=False)
        train.add_column("what")
        train.add_column("value")
        train.add_row("state", trainer["state"])
        if trigger is not None:
            train.add_row(
                "last trigger",
                f"{trigger['reason']} at {_when(trigger['created_at'])} by {trigger['worker_id']} "
                f"(model {trigger['model_version']})",
            )
        if update is not None:
            train.add_row("last promotion", f"{update['model_version']} at {_when(update['promoted_at'])}")
        parts.append(train)
    if status.get("apis"):
        apis = Table(title="API replicas", title_justify="left")
        for name in ("url", "state", "records behind"):
            apis.add_column(name)
        for a in status["apis"]:
            state = (
                "[red]down[/]" if a.get("up") is False else "[green]ready[/]" if a.get("ready") else "reading"
            )
            apis.add_row(a["url"], state, _or_dash(sum(a.get("lag", {}).values()) if "lag" in a else None))
        parts.append(apis)
    return Group(*parts)
