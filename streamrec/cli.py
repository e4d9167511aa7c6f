"""The `streamrec` command line: broker, topics, worker, simulate, train, eval, demo, recs tail, replay,
trainer, the model registry's commands (models sample, list, show, promote, rollback, canary), and users
pseudonym."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from streamrec.pseudonym import pseudonym
from streamrec.settings import Settings

app = typer.Typer(help="Streaming, event-driven recommendations on Kafka.", no_args_is_help=True)
topics_app = typer.Typer(help="Create and inspect streamrec's topics.", no_args_is_help=True)
recs_app = typer.Typer(help="Read the recommendations output topic.", no_args_is_help=True)
models_app = typer.Typer(
    help="The model registry: a first model, the versions, what is served.", no_args_is_help=True
)
users_app = typer.Typer(help="User ids: the pseudonym of a raw id (docs/privacy.md).", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(recs_app, name="recs")
app.add_typer(models_app, name="models")
app.add_typer(users_app, name="users")
console = Console()


def settings_from_env(**overrides: Any) -> Settings:
    """Settings from STREAMREC_* variables, with command-line options (when given) taking precedence; log
    lines (the Kafka clients' too) go to stderr from the settings' log level up."""
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.log_level, settings.log_format)
    return settings


class StderrHandler(logging.Handler):
    """Log lines on stderr as it is when a line is written: during the demo's live display that is the
    display's, which shows them above itself."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log lines from ``level`` up on stderr, one a line, as text or JSON (``STREAMREC_LOG_FORMAT``).
    `streamrec worker` hands over to faust's logging, at the same level and in the same format."""
    from streamrec.logs import formatter

    if level.upper() not in logging.getLevelNamesMapping():
        raise typer.BadParameter(f"log level {level!r}: use debug, info, warn, error or critical")
    handler = StderrHandler()
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def failure_message(exc: Exception) -> str | None:
    """One line for a failure that is not a bug (settings that cannot work, the broker unreachable, records
    not delivered, a worker or broker that did not start); None for anything else, which keeps its
    traceback."""
    from confluent_kafka import KafkaError, KafkaException
    from pydantic import ValidationError

    from streamrec.streams.broker import BrokerError
    from streamrec.streams.client import DeliveryError, TopicNotReadable
    from streamrec.streams.process import WorkerNotReady

    if isinstance(exc, ValidationError):  # each problem and its variable; never the values given
        return "settings: " + "; ".join(settings_problem(e["loc"], e["msg"]) for e in exc.errors())
    if isinstance(exc, KafkaException) and isinstance(exc.args[0], KafkaError):
        error: KafkaError = exc.args[0]
        unreachable = (
            KafkaError._TRANSPORT,
            KafkaError._ALL_BROKERS_DOWN,
            KafkaError._RESOLVE,
            KafkaError._TIMED_OUT,
        )
        if error.code() in unreachable:
            return f"cannot reach the Kafka broker (STREAMREC_BOOTSTRAP_SERVERS): {error.str()}"
        return f"Kafka: {error.str()}"
    if isinstance(exc, (KafkaException, DeliveryError, TopicNotReadable, BrokerError, WorkerNotReady)):
        return str(exc)
    return None


def settings_problem(location: tuple[int | str, ...], message: str) -> str:
    """One problem of a settings error, by its variable (the settings' own checks name theirs)."""
    variable = "_".join(str(part) for part in location).upper()
    message = message.removeprefix("Value error, ")
    return f"STREAMREC_{variable}: {message}" if variable else message


@app.command()
def broker(port: int = typer.Option(9092, help="Loopback port to listen on.")) -> None:
    """Run the embedded Tansu broker in the foreground (in-memory: a restart starts empty)."""
    from streamrec.streams.broker import EmbeddedBroker

    settings_from_env()  # for its log level
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
    user: str = typer.Option(
        None,
        "--user",
        help="Only this user's recommendations (a raw id or its pseudonym, see users pseudonym).",
    ),
    limit: int = typer.Option(None, "--limit", min=1, help="Stop after this many recommendations."),
    idle_timeout: float = typer.Option(None, help="Stop after this many seconds without one."),
    topic: str = typer.Option(None, help="Another recommendations topic, e.g. the shadow topic."),
    bootstrap: str = typer.Option(None, help="Overrides STREAMREC_BOOTSTRAP_SERVERS."),
) -> None:
    """Print recommendations as they are published: user, items with scores and reasons, latency."""
    from rich.table import Table

    from streamrec.streams.client import RecommendationConsumer

    settings = settings_from_env(bootstrap_servers=bootstrap)
    wanted = None if user is None else {user}
    if user is not None and settings.pseudonym_key is not None:  # a raw id, or a pseudonym already
        wanted = {user, pseudonym(settings.pseudonym_key.get_secret_value().encode(), user)}
    shown = 0
    with RecommendationConsumer(settings, from_beginning=from_beginning, topic=topic) as consumer:
        try:
            for rec in consumer.iterate(idle_timeout_s=idle_timeout):
                if wanted is not None and rec.user_id not in wanted:
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
def api(
    port: int = typer.Option(None, help="Port to listen on (STREAMREC_API_PORT)."),
    data_dir: Path = typer.Option(None, help="The view's RocksDB directory (STREAMREC_API_DATA_DIR)."),
) -> None:
    """Serve each user's newest recommendations and profile over HTTP (docs/api.md), from a view of the
    recommendations, state changelog and catalogue topics kept in RocksDB; any number of replicas."""
    from streamrec.streams.api.server import run_api
    from streamrec.streams.topics import check_broker

    settings = settings_from_env(api_port=port, api_data_dir=data_dir)
    check_broker(settings)
    run_api(settings)


@app.command()
def status(
    interval: float = typer.Option(
        2.0, help="Seconds between two samples of the workers' metrics (events/s, p99)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    watch: float = typer.Option(None, "--watch", help="Draw again every this many seconds, until Ctrl-C."),
) -> None:
    """One view of a running deployment: workers and their partitions, events/s, p99 latency, consumer lag
    per group, dead letters by reason, model version per worker, trainer state (STREAMREC_WORKER_URLS)."""
    import json

    from rich.live import Live

    from streamrec.streams.ops.status import collect, render

    settings = settings_from_env()
    if as_json:
        print(json.dumps(collect(settings, interval)))
        return
    if watch is None:
        console.print(render(collect(settings, interval)))
        return
    with Live(render(collect(settings, interval)), console=console, auto_refresh=False) as live:
        try:
            while True:
                live.update(render(collect(settings, watch)), refresh=True)  # collect takes `watch` s
        except KeyboardInterrupt:
            pass


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
    from streamrec.streams.topics import check_broker

    settings = settings_from_env()
    check_broker(settings)
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


@app.command()
def bench(
    as_json: bool = typer.Option(
        False, "--json", help="Print the result as one JSON line (progress: stderr)."
    ),
    parts: str = typer.Option(
        "ceiling,throughput,latency,group,memory,models,index",
        help="Comma-separated: ceiling, throughput, latency, group (two worker processes in one consumer "
        "group), memory, models, index.",
    ),
    full: bool = typer.Option(False, "--full", help="1M users and 1M items (long: tens of minutes)."),
    events: int = typer.Option(None, help="Backlog events for the throughput run."),
    users: int = typer.Option(None, help="Simulated shoppers in the broker parts."),
    loads: str = typer.Option(None, help="Comma-separated offered loads, events/s (saturation is added)."),
    load_seconds: float = typer.Option(None, help="Seconds per offered load."),
    group_workers: int = typer.Option(None, help="Worker processes in the group part (default 2)."),
    profile: bool = typer.Option(True, "--profile/--no-profile", help="py-spy the worker's event stage."),
    out: Path = typer.Option(Path("var/bench"), help="Where bench.json, latency.png and profile.txt go."),
    model: str = typer.Option(
        "production",
        help="Without STREAMREC_MODEL_REGISTRY: 'production', a model of the shape `streamrec train` makes "
        "on Amazon Beauty (128 dims, 2 layers, 12,101 items; trained once, under a minute), or 'sample', the "
        "demo's.",
    ),
) -> None:
    """Measure throughput, latency, memory and serving cost on the embedded broker; prints one JSON object."""
    import json

    from streamrec.streams.bench import MODELS, PARTS, BenchConfig, run_bench

    chosen = tuple(p for p in parts.split(",") if p)
    unknown = set(chosen) - set(PARTS)
    if unknown:
        raise typer.BadParameter(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if model not in MODELS:
        raise typer.BadParameter(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    overrides: dict[str, object] = {"parts": chosen, "profile": profile, "out_dir": out, "model": model}
    if events is not None:
        overrides["events"] = events
    if users is not None:
        overrides["users"] = users
    if loads is not None:
        overrides["loads"] = tuple(float(x) for x in loads.split(","))
    if load_seconds is not None:
        overrides["load_seconds"] = load_seconds
    if group_workers is not None:
        overrides["group_workers"] = group_workers
    config = BenchConfig.full(**overrides) if full else BenchConfig(**overrides)  # type: ignore[arg-type]
    result = run_bench(settings_from_env(), config, Console(stderr=True))
    print(json.dumps(result) if as_json else json.dumps(result, indent=2))


@app.command()
def native(
    action: str = typer.Argument("status", help="build, clean or status."),
) -> None:
    """Compile the event stage's pure-Python modules with mypyc (`make install` does), remove them, or show
    which run; prints {"stale": ..., "modules": {name: "compiled" | "source"}}."""
    from streamrec import native as compiled

    if action not in ("build", "clean", "status"):
        raise typer.BadParameter("choose build, clean or status")
    raise typer.Exit(compiled.main([action]))


@app.command("train")
def train_cmd(
    data: Path = typer.Option(..., help="Dataset dir or file (shared/data or events+catalog)."),
    out: Path = typer.Option(None, help="Model directory to write; default: a new version in the registry."),
    registry: Path = typer.Option(None, help="Model registry (STREAMREC_MODEL_REGISTRY)."),
    preset: str = typer.Option(
        "auto",
        help="auto (the default recipe: settings picked from the data's shape, docs/quality.md) | "
        "tiny (seconds, demo/tests) | small | full.",
    ),
    epochs: int = typer.Option(None, help="Most epochs (early stopping may stop sooner)."),
    max_minutes: float = typer.Option(None, help="Training time limit."),
    seed: int = typer.Option(None, help="Random seed (STREAMREC_SEED)."),
    device: str = typer.Option(None, help="auto | cpu | cuda (STREAMREC_DEVICE)."),
    promote: bool = typer.Option(False, "--promote", help="Make it CURRENT if it beats the current model."),
) -> None:
    """Train the sequence encoder (leave-one-out, early stopping); writes a versioned model directory."""
    import json

    from streamrec.models import registry as model_registry
    from streamrec.models.data import load
    from streamrec.models.train import TrainConfig, train

    settings = settings_from_env(model_registry=registry, seed=seed, device=device)
    given = {"epochs": epochs, "max_minutes": max_minutes, "seed": settings.seed, "device": settings.device}
    dataset = load(data)
    if preset == "auto":
        config = TrainConfig.for_data(dataset, **given)
    else:
        config = TrainConfig.preset(preset, **given)
    path = train(dataset, out, config, registry_dir=None if out else settings.model_registry)
    promoted = model_registry.promote(path, settings.model_registry) if promote else False
    meta = model_registry.read_metadata(path)
    summary = {"model_dir": str(path), "version": meta["version"], "promoted": promoted}
    summary |= {"metrics": meta["metrics"], "seconds": meta["training_seconds"]}
    summary |= {k: meta[k] for k in ("best_epoch", "epochs_run", "stopped_by")}
    console.print_json(json.dumps(summary))


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., help="Dataset dir or file (shared/data or events+catalog)."),
    model: Path = typer.Option(None, help="Model directory; default: the registry's current model, if any."),
    filter_seen: bool = typer.Option(
        True,
        "--filter-seen/--keep-seen",
        help="Exclude the user's earlier items from the ranking (the literature's protocol) or keep them.",
    ),
    baselines: str = typer.Option("popular,itemknn", help="Comma-separated baselines (popular, itemknn)."),
    split: str = typer.Option("test", help="test | valid."),
    as_served: bool = typer.Option(
        True,
        "--as-served/--model-only",
        help="Also score the model as the worker serves it (its serving window and precision) and report "
        "what that costs in NDCG@10 (served_ndcg_loss).",
    ),
    serve_len: int = typer.Option(
        None,
        "--serve-len",
        min=1,
        help="The serving window to score as served: the newest events per user (default: the model's own, "
        "from its training).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object only."),
) -> None:
    """Leave-one-out evaluation with full ranking: HR@10/20, NDCG@10/20, coverage, users evaluated."""
    import json

    from streamrec.models import registry as model_registry
    from streamrec.models.evaluate import evaluate

    model_dir = model or model_registry.current(settings_from_env().model_registry)
    names = [b for b in baselines.split(",") if b]
    result = evaluate(
        data,
        model_dir,
        baselines=names,
        filter_seen=filter_seen,
        split=split,
        as_served=as_served,
        serve_len=serve_len,
        precision=settings_from_env().serving_precision,
        compile_encoder=settings_from_env().serving_compile,
    )
    if as_json:
        print(json.dumps(result))
    else:
        console.print_json(json.dumps(result))


@app.command()
def replay(
    source: str = typer.Argument(
        ..., help="kafka:TOPIC, a .jsonl/.avro/.csv/.tsv/.parquet file, or a dataset (directory or .txt)."
    ),
    to: str = typer.Option(
        "backfill", "--to", help="backfill (rebuilds state, no live recommendations) | live."
    ),
    fmt: str = typer.Option("auto", "--format", help="auto | jsonl | avro | csv | tsv | parquet | dataset."),
    rate: float = typer.Option(None, "--rate", help="Most events sent per second."),
    users: str = typer.Option(None, "--users", help="Only these users: ids a,b,c or a file of ids."),
    kinds: str = typer.Option(None, "--kinds", help="Only these kinds, e.g. click,purchase."),
    since: str = typer.Option(None, "--since", help="From this time (ISO 8601 or epoch s/ms), inclusive."),
    until: str = typer.Option(None, "--until", help="Up to this time, exclusive."),
    from_offset: str = typer.Option(None, "--from-offset", help="kafka: N for every partition, or P:N,P:N."),
    to_offset: str = typer.Option(None, "--to-offset", help="kafka: stop before this offset (N or P:N,...)."),
    base_time: str = typer.Option(None, "--base-time", help="Datasets: time of the first synthetic event."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and count; send nothing."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Progress file, written after each flush."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run recorded in --checkpoint."),
    reject_file: Path = typer.Option(None, "--reject-file", help="Write invalid records here (JSON Lines)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first invalid record."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    shadow: Path = typer.Option(
        None,
        "--shadow",
        help="MODEL_DIR: re-score the range with this model, compare with what was served.",
    ),
    k: int = typer.Option(None, "--k", help="--shadow: list length compared (STREAMREC_TOP_K)."),
    served_topic: str = typer.Option(None, "--served-topic", help="--shadow: where served lists are read."),
    bootstrap: str = typer.Option(None, help="Overrides STREAMREC_BOOTSTRAP_SERVERS."),
) -> None:
    """Replay history (files or a Kafka range) into the backfill or events topic; prints a JSON summary.

    Resumable with --checkpoint/--resume; filters by user, kind and time; --shadow compares a candidate model.
    """
    import json

    from streamrec.streams import replay as rp
    from streamrec.streams.topics import check_broker

    settings = settings_from_env(bootstrap_servers=bootstrap)
    if to not in ("backfill", "live"):
        raise typer.BadParameter("--to is backfill or live")
    if resume and checkpoint is None:
        raise typer.BadParameter("--resume needs --checkpoint")
    try:
        filters = rp.Filters(
            rp.read_users(users), rp.read_kinds(kinds), rp.read_time(since), rp.read_time(until)
        )
        window = {"since": filters.since, "until": filters.until}
        if shadow is not None:  # the whole range builds state; the window only selects what is scored
            window = {"since": None, "until": None}
        src = rp.open_source(
            source,
            settings,
            fmt=fmt,
            from_offset=from_offset,
            to_offset=to_offset,
            base_time=rp.read_time(base_time),
            **window,
        )
        if shadow is not None:
            from streamrec.streams.shadow import compare

            print(json.dumps(compare(src, filters, settings, shadow, k or settings.top_k, served_topic)))
            return
        topic = settings.backfill_topic if to == "backfill" else settings.events_topic
        if not dry_run:
            check_broker(settings)
        raw_ids = not isinstance(src, rp.KafkaSource)  # files: a backend's raw ids; Kafka: already sent once
        sink: rp.Sink = rp.DryRunSink(topic) if dry_run else rp.KafkaSink(settings, topic, raw_ids=raw_ids)
        options = rp.ReplayOptions(filters, rate, checkpoint, resume, reject_file, strict)
        with _replay_progress(src.total(), enabled=progress) as on_progress:
            try:
                summary = rp.run_replay(src, sink, settings, options, on_progress)
            finally:
                sink.close()
    except rp.ReplayError as exc:
        console.print(f"[red]replay: {exc}[/]", highlight=False)
        raise typer.Exit(2) from None
    print(json.dumps({"source": source, **summary}))
    sys.stdout.flush()
    if summary["stopped"]:
        raise typer.Exit(1)


def _replay_progress(total: int | None, enabled: bool) -> Any:
    """A context manager yielding ``on_progress(read, counts)``: a rich bar with rate and ETA on stderr."""
    import contextlib
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    @contextlib.contextmanager
    def bar() -> Iterator[Callable[[int, Any], None]]:
        columns = [
            TextColumn("replay"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} rec/s  sent {task.fields[sent]}  invalid {task.fields[invalid]}"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=Console(stderr=True), disable=not enabled) as shown:
            task = shown.add_task("replay", total=total, rate="-", sent=0, invalid=0)
            last: list[Any] = [0.0, 0, None]  # time shown, records read, counts

            def show() -> None:
                speed = shown.tasks[0].speed
                rate = f"{speed:,.0f}" if speed else "-"
                counts = last[2]
                sent, invalid = (counts.sent, sum(counts.invalid.values())) if counts else (0, 0)
                shown.update(task, completed=last[1], rate=rate, sent=sent, invalid=invalid)

            def update(read: int, counts: Any) -> None:
                now = time.monotonic()
                last[1:] = [read, counts]
                if now - last[0] >= 0.2:
                    last[0] = now
                    show()

            yield update
            show()

    return bar()


@models_app.command("sample")
def models_sample(
    registry: Path = typer.Option(None, help="Model registry (STREAMREC_MODEL_REGISTRY)."),
    force: bool = typer.Option(False, "--force", help="Promote it even over a model already served."),
) -> None:
    """A first model with no dataset at hand: trained on generated shoppers (about a minute on CPU) and
    promoted in the registry, so `streamrec worker` starts. It knows the sample catalogue's items; a shop's
    own catalogue items are recommended through their text (MiniLM), and searches steer toward them."""
    import json
    import tempfile

    from streamrec.models import registry as model_registry
    from streamrec.models.train import TrainConfig, train
    from streamrec.sample import write_sample_dataset

    settings = settings_from_env(model_registry=registry)
    served = model_registry.current(settings.model_registry)
    if served is not None and not force:
        console.print(f"{served.name} is already served from {settings.model_registry} (--force replaces it)")
        return
    with tempfile.TemporaryDirectory(prefix="streamrec-sample-") as tmp:
        data = write_sample_dataset(Path(tmp) / "data", users=2000, events=60_000, seed=settings.seed)
        config = TrainConfig.preset("tiny", text="minilm", seed=settings.seed, device=settings.device)
        path = train(data, registry_dir=settings.model_registry, config=config, progress=console.is_terminal)
    model_registry.promote(path, settings.model_registry, force=True)
    console.print_json(json.dumps({"model_dir": str(path), "promoted": True}))
    console.print(
        "next: `streamrec worker` serves it (beside `streamrec broker`, after `streamrec topics create`)"
    )


# --- the learning loop: the trainer and the registry's commands ------------------------------------------


@app.command()
def trainer() -> None:
    """Run the trainer: answer fine-tuning triggers one run at a time (fine-tune on the events topics'
    window, judge on its newest slice, promote only a better model); one JSON line per run on stdout,
    Prometheus metrics on STREAMREC_TRAINER_METRICS_PORT."""
    from streamrec.streams.trainer.service import run_trainer

    run_trainer(settings_from_env())


def _figure(values: dict | None, metric: str = "ndcg@10") -> str:
    return f"{values[metric]:.4f}" if values and metric in values else "-"


@models_app.command("list")
def models_list(
    registry: Path = typer.Option(None, help="Model registry (STREAMREC_MODEL_REGISTRY)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per version, a line each."),
) -> None:
    """Every version, oldest first: parent, status, trigger, window size and NDCG@10 on its temporal slice
    (its own, and its parent's on the same slice)."""
    import json

    from rich.table import Table

    from streamrec.models import registry as model_registry

    settings = settings_from_env(model_registry=registry)
    rows = model_registry.describe(settings.model_registry)
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    table = Table(title=f"models in {settings.model_registry}", title_justify="left", show_edge=False)
    for column in ("version", "parent", "status", "trigger", "window", "ndcg@10", "parent's", "reason"):
        table.add_column(column, justify="right" if column in ("window", "ndcg@10", "parent's") else "left")
    for row in rows:
        own = row["candidate"] or row["valid"]
        table.add_row(
            row["version"],
            row["parent_version"] or "-",
            row["status"],
            row["trigger"] or "-",
            f"{row['window_events']:,}" if row["window_events"] is not None else "-",
            _figure(own),
            _figure(row["parent"]),
            row["reason"] or "",
        )
    Console(width=200).print(table)


@models_app.command("show")
def models_show(
    version: str = typer.Argument(..., help="A version in the registry."),
    registry: Path = typer.Option(None, help="Model registry (STREAMREC_MODEL_REGISTRY)."),
) -> None:
    """One version as JSON: its metadata (parent, trigger, data window, training config, figures), its
    status with every change, and its lineage."""
    import json

    from streamrec.models import registry as model_registry

    settings = settings_from_env(model_registry=registry)
    try:
        path = model_registry.version_dir(settings.model_registry, version)
    except model_registry.RegistryError as exc:
        raise typer.BadParameter(str(exc)) from None
    metadata = model_registry.read_metadata(path)
    metadata.pop("history", None)  # per-epoch training history of a first model: long, in metadata.json
    out = {
        **metadata,
        "path": str(path.resolve()),
        "status": model_registry.status_of(path),
        "lineage": model_registry.lineage(settings.model_registry, version),
    }
    print(json.dumps(out, indent=2))


@models_app.command("promote")
def models_promote(
    version: str = typer.Argument(..., help="A version in the registry."),
    reason: str = typer.Option("promoted by command", help="Recorded with the change."),
    registry: Path = typer.Option(None, help="Model registry (STREAMREC_MODEL_REGISTRY)."),
) -> None:
    """Serve VERSION: publish its ModelUpdate (workers switch between micro-batches, as after a trainer
    promotion), then make it the registry's CURRENT."""
    import json

    from streamrec.models import registry as model_registry
    from streamrec.streams.trainer import publish

    settings = settings_from_env(model_registry=registry)
    try:
        record = publish.promote(settings, version, reason)
    except model_registry.RegistryError as exc:
        raise typer.BadParameter(str(exc)) from None
    print(json.dumps(record))


@models_app.command("rollback")
def models_rollback(
    reason: str = typer.Option("rolled back by command", help="Recorded with the change."),
    registry: Path = typer.Option(None, help="Model registry (STREAMREC_MODEL_REGISTRY)."),
) -> None:
    """Serve again the version served before the current one: its ModelUpdate, then CURRENT."""
    import json

    from streamrec.models import registry as model_registry
    from streamrec.streams.trainer import publish

    settings = settings_from_env(model_registry=registry)
    try:
        record = publish.rollback(settings, reason)
    except model_registry.RegistryError as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None
    print(json.dumps(record))


@models_app.command("canary")
def models_canary(
    version: str = typer.Argument(None, help="The version to serve as a canary (with --share)."),
    share: float = typer.Option(0.1, help="Share of users (a stable hash of the user id) served the canary."),
    stop: bool = typer.Option(False, "--stop", help="Roll the running canary back."),
    status: bool = typer.Option(
        False, "--status", help="The running canary's live figures, summed over workers."
    ),
    reason: str = typer.Option("by command", help="Recorded with the change."),
    registry: Path = typer.Option(None, help="Model registry (STREAMREC_MODEL_REGISTRY)."),
) -> None:
    """Serve VERSION to a share of users beside the current version, compare their online hit rates on live
    traffic (--status), then `streamrec models promote VERSION` or --stop. The trainer judges a running
    canary by rule (STREAMREC_CANARY_MIN_OUTCOMES, STREAMREC_CANARY_TOLERANCE)."""
    import json

    from streamrec.models import registry as model_registry
    from streamrec.streams.trainer import publish

    settings = settings_from_env(model_registry=registry)
    try:
        if status:
            print(json.dumps(_canary_status(settings)))
        elif stop:
            print(json.dumps(publish.stop_canary(settings, reason)))
        elif version is not None:
            print(json.dumps(publish.start_canary(settings, version, share, reason)))
        else:
            raise typer.BadParameter("give a VERSION to start a canary, --stop or --status")
    except model_registry.RegistryError as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None


def _canary_status(settings: Settings) -> dict[str, Any]:
    from streamrec.models import registry as model_registry
    from streamrec.serde import DecodeError
    from streamrec.streams.canary import CanaryTally, judge
    from streamrec.streams.schema_store import make_codec
    from streamrec.streams.shadow import values_to_end

    running = model_registry.canary(settings.model_registry)
    if running is None:
        raise model_registry.RegistryError(f"no canary runs in {settings.model_registry}")
    tally = CanaryTally(running["version"], running["parent_version"])
    codec = make_codec(settings)
    for value in values_to_end(settings, settings.canary_reports_topic):
        try:
            tally.add(codec.decode(value or b"", accept={"CanaryReport"})[1])
        except DecodeError:
            continue
    serving, canary = tally.figures()
    decision, why = judge(serving, canary, settings.canary_min_outcomes, settings.canary_tolerance)
    return {
        **running,
        "workers": sorted(tally.reports),
        "serving": {"hits": serving.hits, "outcomes": serving.outcomes, "hit_rate": serving.rate},
        "canary": {"hits": canary.hits, "outcomes": canary.outcomes, "hit_rate": canary.rate},
        "rule": {"decision": decision, "reason": why},
    }


@users_app.command("pseudonym")
def users_pseudonym(
    user_ids: list[str] = typer.Argument(
        None, help="Raw user ids; none: one a line on stdin (which keeps them out of the shell's history)."
    ),
) -> None:
    """Print the pseudonym the producer client sends for each raw user id (STREAMREC_PSEUDONYM_KEY), one a
    line: what /users/{id}/..., `recs tail --user` and the topics know the user by."""
    settings = settings_from_env()
    if settings.pseudonym_key is None:
        raise typer.BadParameter("STREAMREC_PSEUDONYM_KEY (or STREAMREC_PSEUDONYM_KEY_FILE) is not set")
    key = settings.pseudonym_key.get_secret_value().encode()
    for user_id in user_ids or (line.rstrip("\r\n") for line in sys.stdin):
        print(pseudonym(key, user_id))


def main() -> None:
    try:
        app()
    except Exception as exc:
        message = failure_message(exc)
        if message is None:
            raise
        typer.secho(f"streamrec: {message}", fg="red", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
