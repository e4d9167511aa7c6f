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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
