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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
