"""`streamrec demo`: the whole pipeline on sample traffic, with live figures, cleaned up at the end.

Embedded broker -> topics -> sample catalogue -> trained sample model -> a worker process -> simulated
shoppers -> recommendations shown as they are published. Ends with one JSON line of totals.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, TopicPartition
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from streamrec.records import Recommendation
from streamrec.sample import sample_catalog
from streamrec.serde import AvroCodec, DecodeError
from streamrec.settings import Settings
from streamrec.streams.broker import EmbeddedBroker
from streamrec.streams.client import EventProducer
from streamrec.streams.kafka_security import client_config, on_embedded_broker
from streamrec.streams.process import WorkerProcess
from streamrec.streams.reading import consume_arrived
from streamrec.streams.simulate import TrafficStats, publish_catalog, simulate
from streamrec.streams.topics import create_topics


@dataclass
class DemoFigures:
    recommendations: int = 0
    dead_letters: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=50_000))
    recent: deque[Recommendation] = field(default_factory=lambda: deque(maxlen=4))

    def summary(self, events: int) -> dict[str, object]:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.array([float("nan")])
        return {
            "events": events,
            "recommendations": self.recommendations,
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 1),
            "dead_letters": self.dead_letters,
        }


def train_sample_registry(root: Path) -> Path:
    """A registry under ``root`` holding the sample model, trained on 60k sample events and promoted: what the
    worker tests and the reliability benchmark serve. Returns the registry's directory."""
    from streamrec.models import registry
    from streamrec.models.train import TrainConfig, train
    from streamrec.sample import write_sample_dataset

    data = write_sample_dataset(root / "data", users=2000, events=60_000, seed=42)
    path = train(
        data,
        registry_dir=root / "registry",
        config=TrainConfig.preset("tiny", max_minutes=10.0),
        progress=False,
    )
    registry.promote(path, root / "registry", force=True)
    return root / "registry"


def ensure_sample_model(settings: Settings, workdir: Path, console: Console) -> Path:
    """Train the sample model once (about a minute on CPU) and reuse it on later runs."""
    from streamrec.models import registry
    from streamrec.models.train import TrainConfig, train
    from streamrec.sample import write_sample_dataset

    current = registry.current(settings.model_registry)
    if current is not None:
        console.print(
            f"model [bold]{current.name}[/] (trained earlier; `rm -r {settings.model_registry}` retrains)"
        )
        return current
    data = write_sample_dataset(workdir / "data", users=2000, events=60_000, seed=settings.seed)
    console.print("training the sample model (transformer encoder + item index) on 60k sample events ...")
    path = train(
        data,
        registry_dir=settings.model_registry,
        config=TrainConfig.preset("tiny", seed=settings.seed),
        progress=console.is_terminal,  # a bar redrawn in place; elsewhere the epoch lines say enough
    )
    registry.promote(path, settings.model_registry, force=True)
    console.print(f"model [bold]{path.name}[/] trained and promoted")
    return path


def follow(settings: Settings, figures: DemoFigures, stop: threading.Event) -> None:
    """Read recommendations and dead letters as they are published (assign(): no group join delay)."""
    codec = AvroCodec()
    consumer = Consumer(
        {
            **client_config(settings),
            "group.id": "streamrec-demo",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,  # the embedded broker holds a fetch for the whole wait
        }
    )
    topics = [
        (settings.recommendations_topic, settings.partitions),
        (settings.dead_letter_topic, settings.partitions),
    ]
    consumer.assign([TopicPartition(t, p, 0) for t, n in topics for p in range(n)])
    try:
        while not stop.is_set():
            for msg in consume_arrived(consumer, 1000, 0.2):
                value = msg.value()
                if msg.error() or value is None:
                    continue
                if msg.topic() == settings.dead_letter_topic:
                    figures.dead_letters += 1
                    continue
                try:
                    _, record = codec.decode(value, accept={"Recommendation"})
                except DecodeError:
                    continue
                rec = Recommendation.from_avro(record)
                figures.recommendations += 1
                figures.latencies_ms.append(time.time() * 1000 - rec.event_time)
                figures.recent.append(rec)
    finally:
        consumer.close()


def render(figures: DemoFigures, traffic: TrafficStats, seconds: float, titles: dict[str, str]) -> Group:
    """The live figures, and the latest shoppers' top three as a shop shows them: titles, with the reason
    for each; the item ids last."""
    summary = figures.summary(traffic.events)
    stats = Table.grid(padding=(0, 3))
    for _ in range(6):
        stats.add_column()
    rate = traffic.events / traffic.seconds if traffic.seconds else 0.0
    stats.add_row(
        f"[bold]{traffic.events:,}[/] events",
        f"[bold]{rate:,.0f}[/] events/s",
        f"[bold]{figures.recommendations:,}[/] recommendations",
        f"p50 [bold]{summary['latency_ms_p50']}[/] ms",
        f"p99 [bold]{summary['latency_ms_p99']}[/] ms",
        f"[bold]{figures.dead_letters}[/] dead letters",
    )
    recs = Table(show_header=True, header_style="bold", expand=True)
    recs.add_column("shopper", no_wrap=True)
    recs.add_column("recommended", ratio=3)
    recs.add_column("why", ratio=4, style="dim")
    recs.add_column("item", no_wrap=True, style="dim")
    for rec in list(figures.recent)[::-1]:
        top = rec.items[:3]
        for n, item in enumerate(top):
            recs.add_row(
                rec.user_id if n == 0 else "",
                titles.get(item.item_id, item.item_id),
                item.explanation,
                item.item_id,
                end_section=n == len(top) - 1,
            )
    title = f"streamrec demo: {traffic.seconds:.0f}/{seconds:.0f} s"
    return Group(Panel(stats, title=title), recs)


def run_demo(settings: Settings, seconds: float = 60.0, rate: float = 1000.0, users: int = 2000) -> dict:
    console = Console()
    workdir = Path("var/demo")
    settings = settings.model_copy(
        update={
            # a configured registry's promoted model, else the demo's own sample model
            "model_registry": settings.model_registry
            if "model_registry" in settings.model_fields_set
            else workdir / "models",
            "data_dir": workdir / "workers",
        }
    )
    shutil.rmtree(
        settings.data_dir, ignore_errors=True
    )  # the embedded broker starts empty, so must the state
    workdir.mkdir(parents=True, exist_ok=True)
    ensure_sample_model(settings, workdir, console)

    stop = threading.Event()
    figures = DemoFigures()
    traffic = TrafficStats()
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    worker: WorkerProcess | None = None
    threads: list[threading.Thread] = []
    try:
        settings = on_embedded_broker(settings, broker.bootstrap)
        create_topics(settings)
        console.print(f"embedded broker at {broker.bootstrap}; topics created")
        worker = WorkerProcess(settings, settings.data_dir / "worker-0", "worker-0", workdir / "worker-0.log")
        worker.start().wait_ready()
        console.print(
            f"worker ready (health and metrics on http://127.0.0.1:{worker.web_port}/health, /metrics)"
        )
        catalog = sample_catalog()
        titles = {item.item_id: item.title for item in catalog}
        with EventProducer(settings) as producer:
            publish_catalog(producer, catalog)
        worker.wait_catalog(len(catalog))
        console.print(f"{len(catalog)} catalogue items loaded by the worker; simulating {users:,} shoppers")

        def produce() -> None:
            simulate(
                settings,
                users,
                rate,
                seconds,
                bad_every=2000,
                with_catalog=False,
                should_stop=stop.is_set,
                stats=traffic,
            )

        threads = [
            threading.Thread(target=produce, name="traffic", daemon=True),
            threading.Thread(target=follow, args=(settings, figures, stop), name="follow", daemon=True),
        ]
        for t in threads:
            t.start()
        with Live(render(figures, traffic, seconds, titles), console=console, refresh_per_second=4) as live:
            while threads[0].is_alive():
                live.update(render(figures, traffic, seconds, titles))
                time.sleep(0.25)
            settle = time.monotonic() + 10  # let the last recommendations arrive
            last = -1
            while time.monotonic() < settle and figures.recommendations != last:
                last = figures.recommendations
                time.sleep(1.0)
            live.update(render(figures, traffic, seconds, titles))
        if not console.is_terminal:
            console.line()  # rich ends its last render there without a newline, the JSON line would follow it
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
        if worker is not None:
            worker.stop()
        broker.stop()
    summary = figures.summary(traffic.events)
    print(json.dumps(summary))
    return summary
