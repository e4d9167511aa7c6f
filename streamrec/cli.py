"""The `streamrec` command line: broker, topics, worker, simulate, train, eval, demo, recs tail, replay."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer
from rich.console import Console

from streamrec.settings import Settings

app = typer.Typer(help="Streaming, event-driven recommendations on Kafka.", no_args_is_help=True)
topics_app = typer.Typer(help="Create and inspect streamrec's topics.", no_args_is_help=True)
recs_app = typer.Typer(help="Read the recommendations output topic.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(recs_app, name="recs")
console = Console()


def settings_from_env(**overrides: object) -> Settings:
    """Settings from STREAMREC_* variables, with command-line options (when given) taking precedence."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def broker(port: int = typer.Option(9092, help="Loopback port to listen on.")) -> None:
    """Run the embedded Tansu broker in the foreground (in-memory: a restart starts empty)."""
    from streamrec.streams.broker import EmbeddedBroker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmbeddedBroker(port=port) as b:
        console.print(f"[green]broker ready[/] at {b.bootstrap} (Ctrl-C stops it)")
        try:
            while not stop.wait(0.5):
                if b.process is None or b.process.poll() is not None:
                    raise typer.Exit(1)
        except KeyboardInterrupt:
            pass


@topics_app.command("create")
def topics_create(bootstrap: str = typer.Option(None, help="Overrides STREAMREC_BOOTSTRAP_SERVERS.")) -> None:
    """Create streamrec's topics (those missing) with the configured partition count."""
    from streamrec.streams.topics import create_topics

    settings = settings_from_env(bootstrap_servers=bootstrap)
    created = create_topics(settings)
    console.print(f"created {len(created)} topic(s): {', '.join(created) or '-'}")


@recs_app.command("tail")
def recs_tail(
    from_beginning: bool = typer.Option(False, "--from-beginning", help="Read the topic from its start."),
    user: str = typer.Option(None, "--user", help="Only this user's recommendations."),
    limit: int = typer.Option(None, "--limit", min=1, help="Stop after this many recommendations."),
    idle_timeout: float = typer.Option(None, help="Stop after this many seconds without one."),
    topic: str = typer.Option(None, help="Another recommendations topic, e.g. the shadow topic."),
    bootstrap: str = typer.Option(None, help="Overrides STREAMREC_BOOTSTRAP_SERVERS."),
) -> None:
    """Print recommendations as they are published: user, items with scores and reasons, latency."""
    from rich.table import Table

    from streamrec.streams.client import RecommendationConsumer

    settings = settings_from_env(bootstrap_servers=bootstrap)
    shown = 0
    with RecommendationConsumer(settings, from_beginning=from_beginning, topic=topic) as consumer:
        try:
            for rec in consumer.iterate(idle_timeout_s=idle_timeout):
                if user is not None and rec.user_id != user:
                    continue
                latency_ms = rec.publish_time - rec.event_time
                table = Table(
                    title=f"[bold]{rec.user_id}[/]  model {rec.model_version}  index {rec.index_version}  "
                    f"{rec.mode}  latency {latency_ms} ms  (event {rec.cause_event_id})",
                    title_justify="left",
                    show_edge=False,
                )
                table.add_column("#", justify="right")
                table.add_column("item")
                table.add_column("score", justify="right")
                table.add_column("why")
                for rank, item in enumerate(rec.items, 1):
                    table.add_row(str(rank), item.item_id, f"{item.score:.3f}", item.explanation)
                console.print(table)
                shown += 1
                if limit is not None and shown >= limit:
                    break
        except KeyboardInterrupt:
            pass
    if consumer.skipped:
        console.print(f"[yellow]skipped {consumer.skipped} undecodable record(s)[/]")


@app.command()
def worker(
    data_dir: Path = typer.Option(None, help="State directory of this worker (STREAMREC_DATA_DIR)."),
    web_port: int = typer.Option(None, help="Web server port (STREAMREC_WEB_PORT)."),
) -> None:
    """Run one worker: the batched event stage plus faust agents for catalogue, models and triggers.

    It reads the events topic and, partition for partition, the backfill topic (see `streamrec replay`).
    """
    from streamrec.streams.app import run_worker

    run_worker(settings_from_env(data_dir=data_dir, web_port=web_port))


@app.command()
def simulate(
    users: int = typer.Option(1000, help="Simulated shoppers."),
    rate: float = typer.Option(500.0, help="Events per second."),
    seconds: float = typer.Option(60.0, help="How long to send."),
    catalog: bool = typer.Option(True, help="Publish the sample catalogue first."),
    bad_every: int = typer.Option(0, help="Every N-th record is malformed (shows the dead-letter path)."),
) -> None:
    """Send sample traffic (catalogue, clicks, searches, purchases) to the configured broker."""
    from streamrec.streams.simulate import simulate as run

    settings = settings_from_env()
    stats = run(settings, users=users, rate=rate, seconds=seconds, bad_every=bad_every, with_catalog=catalog)
    console.print(f"sent {stats.events:,} events and {stats.bad_records} bad records in {stats.seconds:.1f}s")


@app.command()
def demo(
    seconds: float = typer.Option(60.0, help="How long to simulate traffic."),
    rate: float = typer.Option(1000.0, help="Events per second."),
    users: int = typer.Option(2000, help="Simulated shoppers."),
) -> None:
    """Run the whole pipeline on the embedded broker with sample traffic; prints a JSON summary at the end."""
    from streamrec.streams.demo import run_demo

    run_demo(settings_from_env(), seconds=seconds, rate=rate, users=users)


@app.command("train")
def train_cmd(
    data: Path = typer.Option(..., help="Dataset dir or file (shared/data or events+catalog)."),
    out: Path = typer.Option(None, help="Model directory to write; default: a new version in the registry."),
    registry: Path = typer.Option(None, help="Model registry (STREAMREC_MODEL_REGISTRY)."),
    preset: str = typer.Option("full", help="tiny (seconds, demo/tests) | small | full."),
    epochs: int = typer.Option(None, help="Most epochs (early stopping may stop sooner)."),
    max_minutes: float = typer.Option(None, help="Training time limit."),
    seed: int = typer.Option(None, help="Random seed (STREAMREC_SEED)."),
    device: str = typer.Option(None, help="auto | cpu | cuda (STREAMREC_DEVICE)."),
    promote: bool = typer.Option(False, "--promote", help="Make it CURRENT if it beats the current model."),
) -> None:
    """Train the sequence encoder (leave-one-out, early stopping); writes a versioned model directory."""
    import json

    from streamrec.models import registry as model_registry
    from streamrec.models.train import TrainConfig, train

    settings = settings_from_env(model_registry=registry, seed=seed, device=device)
    config = TrainConfig.preset(
        preset, epochs=epochs, max_minutes=max_minutes, seed=settings.seed, device=settings.device
    )
    path = train(data, out, config, registry_dir=None if out else settings.model_registry)
    promoted = model_registry.promote(path, settings.model_registry) if promote else False
    meta = model_registry.read_metadata(path)
    summary = {"model_dir": str(path), "version": meta["version"], "promoted": promoted}
    summary |= {"metrics": meta["metrics"], "seconds": meta["training_seconds"]}
    console.print_json(json.dumps(summary))


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., help="Dataset dir or file (shared/data or events+catalog)."),
    model: Path = typer.Option(None, help="Model directory; default: the registry's current model, if any."),
    filter_seen: bool = typer.Option(False, "--filter-seen", help="Exclude seen items from the ranking."),
    baselines: str = typer.Option("popular,itemknn", help="Comma-separated baselines (popular, itemknn)."),
    split: str = typer.Option("test", help="test | valid."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object only."),
) -> None:
    """Leave-one-out evaluation with full ranking: HR@10/20, NDCG@10/20, coverage, users evaluated."""
    import json

    from streamrec.models import registry as model_registry
    from streamrec.models.evaluate import evaluate

    model_dir = model or model_registry.current(settings_from_env().model_registry)
    names = [b for b in baselines.split(",") if b]
    result = evaluate(data, model_dir, baselines=names, filter_seen=filter_seen, split=split)
    if as_json:
        print(json.dumps(result))
    else:
        console.print_json(json.dumps(result))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
