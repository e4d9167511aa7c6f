"""The worker process: a faust-streaming app hosting the batched event stage.

faust does what it is good at here: lifecycle, the web server (health, metrics, state lookups), timers, and
agents for the low-rate control topics. Catalogue upserts and promoted models must reach every worker, so
their agents write GlobalTables (RocksDB-backed, changelogged), and each worker applies what arrives on the
tables' changelogs. The high-rate event topic goes through the batched stage (streams/event_stage.py) in its
own thread, because faust's per-message path tops out far below the broker (BROKER.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import faust
from faust.web import Request, Response, View
from faust.web.drivers.aiohttp import Web as AiohttpWeb
from prometheus_client import generate_latest

from streamrec.catalog import Catalog
from streamrec.dead_letters import dead_letter
from streamrec.logs import formatter, set_log_context
from streamrec.records import CatalogItem
from streamrec.serde import DecodeError
from streamrec.settings import Settings
from streamrec.streams.auth import ApiKeys
from streamrec.streams.event_stage import EventStage, Recommender, now_ms
from streamrec.streams.kafka_security import client_config, faust_credentials
from streamrec.streams.metrics import WorkerMetrics
from streamrec.streams.ops.worker import WorkerSampler
from streamrec.streams.schema_store import make_codec
from streamrec.triggers import OnlineAccuracy, TriggerPolicy
from streamrec.validation import Rejection, ValidationRules, validate_item

log = logging.getLogger(__name__)

CURRENT_MODEL_KEY = b"current"
CANARY_MODEL_KEY = b"canary"  # a ModelUpdate with canary_share: a candidate beside the current model


def load_recommender(settings: Settings, model_dir: Path | None = None) -> Recommender:
    """The model to serve: the given directory, the configured one, or the registry's current version. With
    ``ranking_process`` the model is loaded in a child process, and this one loads only its item map."""
    from streamrec.models.registry import current

    path = model_dir or settings.model_dir or current(settings.model_registry)
    if path is None:
        raise SystemExit(
            f"streamrec worker: no model to serve: nothing is promoted in {settings.model_registry}. "
            "For a first run: `streamrec models sample` (a small model, about a minute to train); with your "
            "own data: `streamrec train --data DIR --promote`."
        )
    recommender = _load_model(settings, Path(path))
    if recommender.serve_len > settings.history_length:  # served with what the states keep
        log.warning(
            "model %s is served with the newest %d events per user but states keep %d "
            "(STREAMREC_HISTORY_LENGTH): set it to at least %d to serve it as evaluated",
            recommender.model_version,
            recommender.serve_len,
            settings.history_length,
            recommender.serve_len,
        )
    return recommender


def _load_model(settings: Settings, path: Path) -> Recommender:
    if settings.ranking_process:
        from streamrec.models.ranking_process import ProcessRecommender

        return ProcessRecommender(
            path,
            device=settings.device,
            threads=settings.serving_threads,
            precision=settings.serving_precision,
            processes=settings.ranking_processes,
            compile_encoder=settings.serving_compile,
        )
    from streamrec.models.serving import Recommender as ModelRecommender
    from streamrec.models.serving import keep_freed_memory, set_threads

    keep_freed_memory()
    set_threads(settings.serving_threads)
    recommender = ModelRecommender.load(path, device=settings.device, precision=settings.serving_precision)
    if settings.serving_compile:
        recommender.compile_encoder()
    recommender.warm_up()
    return recommender


def ranking_process_health(recommender: Recommender) -> dict[str, Any] | None:
    """The served model's ranking processes (``ranking_process``): the first one's pid, every one's, whether
    all run, how often they were started again; None when the model ranks in this process."""
    from streamrec.models.ranking_process import ProcessRecommender

    if not isinstance(recommender, ProcessRecommender):
        return None
    return {
        "pid": recommender.pid,
        "pids": recommender.pids,
        "alive": recommender.alive,
        "restarts": recommender.restarts,
        "encoder_compiled": recommender.encoder_compiled,
    }


class OnlyOurRoutes(AiohttpWeb):
    """faust's web server without faust's own pages (``/router``, ``/table`` with the tables' raw bytes,
    ``/graph``, the statistics index): a worker serves streamrec's routes only."""

    default_blueprints: ClassVar[list[Any]] = []
    production_blueprints: ClassVar[list[Any]] = []
    debug_blueprints: ClassVar[list[Any]] = []
    optional_blueprints: ClassVar[list[Any]] = []


class WorkerApp(faust.App):
    def _new_web(self) -> AiohttpWeb:
        return OnlyOurRoutes(self)


class Worker:
    """Wires the faust app, the event stage and the control-topic handlers of one worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = WorkerMetrics()
        self.metrics.watch_gc()
        self.catalog = Catalog()
        self.accuracy = OnlineAccuracy()
        self._canary_base: dict[str, tuple[int, int]] = {}  # each version's figures when the canary started
        self.policy = TriggerPolicy(
            min_events=settings.trigger_min_events,
            interval_s=settings.trigger_interval_s,
            drift_ratio=settings.trigger_drift_ratio,
            trained_at=time.time(),
        )
        self.codec = make_codec(settings)
        self.item_rules = ValidationRules.from_settings(settings)
        self.auth = ApiKeys(settings.api_key_list())
        recommender = load_recommender(settings)
        self.metrics.model_info.labels(recommender.model_version).set(1)
        set_log_context(service="worker", worker_id=self.worker_id, model_version=recommender.model_version)
        self.sampler = WorkerSampler(settings, self.metrics)  # consumer lag and state size, for /metrics
        self.stage = EventStage(
            settings.model_copy(update={"worker_id": self.worker_id}),
            self.catalog,
            recommender,
            self.codec,
            metrics=self.metrics,
            accuracy=self.accuracy,
            on_events=self._count_events,
        )
        self._events_lock = threading.Lock()
        self.app = self._make_app()

    def recommendable_items(self) -> int:
        """Items a recommendation may name now: the catalogue's in stock once any catalogue record has arrived
        (items the model never saw through their content vectors), before that the model's own items."""
        if len(self.catalog):
            return self.catalog.in_stock
        return len(getattr(self.stage.recommender, "item_ids", ()))

    def _count_events(self, n: int) -> None:
        with self._events_lock:
            self.policy.events_since_training += n

    # --- faust ------------------------------------------------------------------------------------------

    def _make_app(self) -> faust.App:
        s = self.settings
        # On the embedded broker, a restart loses every topic: the tables' local offsets are then past their
        # changelogs' ends, which faust's consistency check takes for a fault and crashes on (the tables keep
        # what they hold, and read the new changelogs from their starts).
        extra: dict[str, Any] = (
            {"producer_max_batch_size": 1, "recovery_consistency_check": False} if s.embedded_broker else {}
        )
        s.data_dir.mkdir(parents=True, exist_ok=True)
        app = WorkerApp(
            s.app_id,
            broker=f"kafka://{s.bootstrap_servers}",
            broker_credentials=faust_credentials(s),  # TLS and SASL as every other client (kafka_security)
            store="rocksdb://",
            datadir=str(s.data_dir / "faust"),
            web_enabled=s.web_enabled,
            web_port=s.web_port,
            web_host=s.web_host,
            web_bind=s.web_host,  # faust binds 0.0.0.0 unless told: listen only where the settings say
            broker_session_timeout=s.session_timeout_ms / 1000,
            broker_heartbeat_interval=s.heartbeat_interval_ms / 1000,
            broker_rebalance_timeout=s.session_timeout_ms / 1000,
            topic_partitions=1,
            topic_allow_declare=True,
            producer_compression_type=None if s.output_compression == "none" else s.output_compression,
            **extra,
        )
        catalog_topic = app.topic(s.catalog_topic, key_serializer="raw", value_serializer="raw", partitions=1)
        models_topic = app.topic(
            s.model_updates_topic, key_serializer="raw", value_serializer="raw", partitions=1
        )
        dead_letters = app.topic(s.dead_letter_topic, key_serializer="raw", value_serializer="raw")
        triggers = app.topic(s.triggers_topic, key_serializer="raw", value_serializer="raw", partitions=1)
        canary_reports = app.topic(
            s.canary_reports_topic, key_serializer="raw", value_serializer="raw", partitions=1
        )

        catalog_table = app.GlobalTable(
            "catalog",
            key_type=bytes,
            value_type=bytes,
            partitions=1,
            recovery_buffer_size=1,
            on_changelog_event=self._on_catalog_changelog,
        )
        models_table = app.GlobalTable(
            "models",
            key_type=bytes,
            value_type=bytes,
            partitions=1,
            recovery_buffer_size=1,
            on_changelog_event=self._on_models_changelog,
        )

        @app.agent(catalog_topic)
        async def catalog_upserts(stream: Any) -> None:
            async for event in stream.events():
                value = event.value
                try:
                    item = self._decode_item(value)
                except DecodeError as exc:
                    await self._dead_letter(dead_letters, event.message, exc.reason, exc.detail)
                    continue
                catalog_table[item.item_id.encode()] = value
                self.catalog.upsert(item)  # this worker owns the table partition: no changelog echo

        @app.agent(models_topic)
        async def model_updates(stream: Any) -> None:
            async for event in stream.events():
                try:
                    self.codec.decode(event.value, accept={"ModelUpdate"})
                except DecodeError as exc:
                    await self._dead_letter(dead_letters, event.message, exc.reason, exc.detail)
                    continue
                key = CANARY_MODEL_KEY if event.key == CANARY_MODEL_KEY else CURRENT_MODEL_KEY
                apply = self._set_canary if key == CANARY_MODEL_KEY else self._swap_model
                failed = await apply(event.value)
                if failed is not None:
                    # Not written to the table: no worker is told to serve a model this one cannot load,
                    # and no restart tries it again. The model served so far stays.
                    await self._dead_letter(dead_letters, event.message, "unloadable_model", failed)
                    continue
                models_table[key] = event.value

        @app.task
        async def run_event_stage() -> None:
            await self._run_stage(app)

        @app.timer(interval=s.trigger_check_s)
        async def check_triggers() -> None:
            await self._check_triggers(triggers)
            await self._report_canary(canary_reports)

        @app.timer(interval=s.lag_check_s)
        async def sample_operations() -> None:
            assignment = self.stage.assignment()
            await asyncio.get_running_loop().run_in_executor(None, self.sampler.sample, assignment)

        worker = self

        @app.page("/health")
        class Health(View):
            async def get(self, request: Request) -> Response:
                alive = worker.stage_thread is not None and worker.stage_thread.is_alive()
                body = {
                    "worker_id": worker.worker_id,
                    "stage_alive": alive,
                    # False while the event stage's clients reach no broker; they reconnect by themselves
                    "broker_connected": worker.stage.disconnected_since is None,
                    "disconnected_since": worker.stage.disconnected_since,
                    "ready": worker.stage.ready.is_set(),
                    "partitions": sorted(worker.stage.store.partitions),
                    "assignment": worker.stage.assignment(),
                    "model_version": worker.stage.recommender.model_version,
                    "ranking_process": ranking_process_health(worker.stage.recommender),
                    "catalog_items": len(worker.catalog),
                    "recommendable_items": worker.recommendable_items(),
                    "canary": worker.stage.canary_info(),
                }
                return self.json(body, status=200 if alive else 503)

        @app.page("/metrics")
        class Metrics(View):
            async def get(self, request: Request) -> Response:
                return self.bytes(generate_latest(worker.metrics.registry), content_type="text/plain")

        @app.page("/users/{user_id}/state")
        class UserStateView(View):
            async def get(self, request: Request, user_id: str) -> Response:
                refused = worker.auth.refuse(request.headers)
                if refused is not None:
                    status, message = refused
                    return self.json({"error": message}, status=status)
                state = worker.stage.lookup(user_id)
                if state is None:
                    return self.json({"user_id": user_id, "found": False}, status=404)
                return self.json({"found": True, **dataclasses.asdict(state)})

        self.catalog_table, self.models_table = catalog_table, models_table
        self.stage_thread: threading.Thread | None = None
        return app

    # --- control topics -----------------------------------------------------------------------------------

    def _decode_item(self, value: bytes | None) -> CatalogItem:
        """A catalogue upsert, held to the rules the producer client applies (DecodeError with the reason)."""
        if value is None:
            raise DecodeError("undecodable", "empty catalogue record")
        _, record = self.codec.decode(value, accept={"CatalogItem"})
        item = CatalogItem.from_avro(record)
        rejection = validate_item(item, now_ms(), self.item_rules)
        if rejection is not None:
            raise DecodeError(rejection.reason, rejection.detail)
        return item

    async def _on_catalog_changelog(self, event: Any) -> None:
        with contextlib.suppress(DecodeError):  # only valid items are ever written to the table
            self.catalog.upsert(self._decode_item(event.value))

    async def _on_models_changelog(self, event: Any) -> None:
        if event.key == CURRENT_MODEL_KEY and event.value is not None:
            await self._swap_model(event.value)
        elif event.key == CANARY_MODEL_KEY and event.value is not None:
            await self._set_canary(event.value)

    async def _swap_model(self, value: bytes) -> str | None:
        """Serve the model a ModelUpdate names; what went wrong if it cannot be loaded, else None."""
        _, update = self.codec.decode(value, accept={"ModelUpdate"})
        if update["model_version"] == self.stage.recommender.model_version:
            return None
        canary = self.stage.canary
        if canary is not None and canary.candidate.model_version == update["model_version"]:
            recommender = canary.candidate  # a canary promoted: already loaded, and warm
        else:
            loaded, failed = await self._load(update)
            if loaded is None:
                return failed
            recommender = loaded
        self.stage.swap_model(recommender)
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(recommender.model_version).set(1)
        self.metrics.model_updates.inc()
        set_log_context(model_version=recommender.model_version)
        with self._events_lock:
            self.policy.fired(time.time())
        return None

    async def _load(self, update: dict[str, Any]) -> tuple[Recommender | None, str]:
        """The model of a ModelUpdate, loaded beside the one served; or None and why not."""
        version, path = update["model_version"], update["path"]
        try:
            recommender = await asyncio.get_running_loop().run_in_executor(
                None, load_recommender, self.settings, Path(path)
            )
        except Exception as exc:
            log.exception("could not load model %s from %s", version, path)
            return None, f"model {version} could not be loaded from {path}: {type(exc).__name__}: {exc}"
        if recommender.model_version != version:
            close = getattr(recommender, "close", None)  # a ranking process ends with it
            if close is not None:
                close()
            return None, f"{path} holds model {recommender.model_version}, not {version}"
        return recommender, ""

    async def _set_canary(self, value: bytes) -> str | None:
        """Start, change or end a canary: a candidate served to ``canary_share`` of the users beside the
        current model, which must be the one it was judged against (its ``parent_version``). What went wrong
        if the candidate cannot be loaded, else None."""
        _, update = self.codec.decode(value, accept={"ModelUpdate"})
        share = update.get("canary_share") or 0.0
        serving = self.stage.pending_model_version() or self.stage.recommender.model_version
        running = self.stage.canary
        if share <= 0 or update.get("parent_version") != serving:
            self.stage.set_canary(None, 0.0)
            self.metrics.canary_share.clear()
            return None
        if running is not None and running.candidate.model_version == update["model_version"]:
            candidate: Recommender | None = running.candidate  # a new share for the same canary
        else:
            candidate, failed = await self._load(update)
            if candidate is None:
                return failed
        same = running is not None and running.candidate is candidate
        started = running.started_at if running is not None and same else now_ms()
        if not same:
            self._canary_base = self.accuracy.by_version()  # its reports count from now
        self.stage.set_canary(candidate, share, started)
        self.metrics.canary_share.clear()
        self.metrics.canary_share.labels(update["model_version"]).set(share)
        return None

    async def _report_canary(self, topic: Any) -> None:
        """While a canary runs: this worker's hit rates of both versions since it started (the trainer, or
        `streamrec models canary --status`, adds up every worker's newest report)."""
        canary = self.stage.canary
        if canary is None:
            return
        now = self.accuracy.by_version()
        base = self._canary_base

        def since(version: str) -> tuple[int, int]:
            hits, outcomes = now.get(version, (0, 0))
            hits0, outcomes0 = base.get(version, (0, 0))
            return hits - hits0, outcomes - outcomes0

        (serving_hits, serving_n), (canary_hits, canary_n) = (
            since(canary.serving.model_version),
            since(canary.candidate.model_version),
        )
        record = {
            "worker_id": self.worker_id,
            "serving_version": canary.serving.model_version,
            "canary_version": canary.candidate.model_version,
            "canary_share": canary.share,
            "serving_hits": serving_hits,
            "serving_outcomes": serving_n,
            "canary_hits": canary_hits,
            "canary_outcomes": canary_n,
            "started_at": canary.started_at,
            "created_at": now_ms(),
        }
        await topic.send(key=self.worker_id.encode(), value=self.codec.encode("CanaryReport", record))

    async def _dead_letter(self, topic: Any, message: Any, reason: str, detail: str) -> None:
        record = dead_letter(
            message.topic,
            message.partition,
            message.offset,
            message.key,
            message.value,
            Rejection(reason, detail),
            self.worker_id,
            self.settings.max_record_bytes,
        )
        await topic.send(key=record["key"] or b"", value=self.codec.encode("DeadLetter", record))
        self.metrics.dead_letters.labels(reason).inc()

    async def _check_triggers(self, topic: Any) -> None:
        with self._events_lock:
            reason = self.policy.decide(time.time(), self.accuracy)
            if reason is None:
                return
            events = self.policy.events_since_training
            self.policy.fired(time.time())
        record = {
            "trigger_id": uuid.uuid4().hex,
            "reason": reason,
            "model_version": self.stage.recommender.model_version,
            "events_since_training": events,
            "online_hit_rate": self.accuracy.rate,
            "baseline_hit_rate": self.accuracy.baseline_rate,
            "worker_id": self.worker_id,
            "created_at": now_ms(),
        }
        await topic.send(key=self.worker_id.encode(), value=self.codec.encode("FineTuneTrigger", record))
        self.metrics.finetune_triggers.labels(reason).inc()
        log.info("fine-tuning trigger published: %s", reason)

    # --- the event stage thread ----------------------------------------------------------------------------

    async def _load_tables(self, app: faust.App) -> None:
        """Fill the catalogue and take the promoted model from the recovered tables before the event stage
        starts, on every kind of start. A recovery from the changelog announces each record
        (``_on_catalog_changelog``); one from this worker's own data directory replays nothing, so the
        tables' local contents are read here as well: without them every click would be refused as an
        unknown item until the catalogue was published again."""
        try:
            await asyncio.wait_for(app.tables.recovery.completed.wait(), timeout=120)  # type: ignore[attr-defined]
        except TimeoutError:
            log.error("table recovery not complete after 120 s; starting with what is recovered")
        loaded = 0
        for _, value in list(self.catalog_table.items()):
            try:
                self.catalog.upsert(self._decode_item(value))
                loaded += 1
            except DecodeError:  # only valid items are written to the table, by an older version maybe
                continue
        current = self.models_table.get(CURRENT_MODEL_KEY)
        if current is not None:
            await self._swap_model(current)
        canary = self.models_table.get(CANARY_MODEL_KEY)
        if canary is not None:
            await self._set_canary(canary)
        log.info(
            "%s starts with %d catalogue items and model %s",
            self.worker_id,
            loaded,
            self.stage.pending_model_version() or self.stage.recommender.model_version,
        )

    async def _run_stage(self, app: faust.App) -> None:
        await self._load_tables(app)
        quiet_gc()
        stop = threading.Event()
        self.stage_thread = threading.Thread(
            target=self.stage.run, args=(stop,), name="event-stage", daemon=True
        )
        self.stage_thread.start()
        try:
            while self.stage_thread.is_alive():
                await asyncio.sleep(0.5)
            if self.stage.error is not None:
                await app.crash(self.stage.error)
        finally:
            stop.set()
            self.stage_thread.join(timeout=30)


def quiet_gc() -> None:
    """Keep the cyclic garbage collector off the event path. Measured on the 100k-event backlog: full
    collections took 6.2 s of a 22 s run with the defaults, 0 s with this (gen-0 collections 0.24 s).

    Everything alive at start-up (model, catalogue, faust, libraries) is frozen out of every later
    collection. A micro-batch makes ~10^5 short-lived objects (events, recommended items) that reference
    counting frees at its end; with the default gen-0 threshold of 700 they were promoted and counted
    towards full collections over the whole heap of cached user states. A larger threshold lets a batch's
    objects die young. Cycles are still collected, just less often.

    200,000 rather than 50,000 (round 14) for workers with more active users than the state cache holds:
    each batch then reads ~1,000 states back (~57 tracked objects each) and evicts as many. The evicted
    states' frees offset the new allocations in the count that triggers a collection, so the young
    generation had ~100k objects when 50,000 fired it, once a batch, at 60-70 ms a collection, and every
    20th collection went through the states promoted since (~0.8 s). With 40,000 shoppers and 20,000
    cached, 1.2M events, the worker spent 2.4-2.5 s in the collector instead of 19-21 s (docs/performance.md,
    round 14). Under a steady churn the count barely grows, so collections become rare; garbage that is
    not freed (cycles) still raises it and is collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(200_000, 20, 10)


class RepeatedLines(logging.Filter):
    """Lets a line through once per ``interval_s`` for each logger and message template, and says how many
    it held back: a client retrying a broker that went away logs the same failure every 100 ms (aiokafka),
    and that is one fault to report, not hundreds of lines."""

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}  # -> (when last shown, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = (record.name, str(record.msg)), time.monotonic()
        shown_at, held = self.seen.get(key, (now - self.interval_s, 0))
        if now - shown_at < self.interval_s:
            self.seen[key] = (shown_at, held + 1)
            return False
        if len(self.seen) > 10_000:  # messages formatted before logging are each a template of their own
            self.seen = {k: v for k, v in self.seen.items() if now - v[0] < self.interval_s}
        self.seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like it in the last {now - shown_at:.0f} s)"
        return True


def quiet_faust(level: str) -> None:
    """faust warns whenever its producer buffer fills, which a catalogue upsert burst does on every start
    (table writes wait for the broker): flow control, not a fault. Shown from ``info`` down."""
    if logging.getLevelNamesMapping().get(level.upper(), logging.NOTSET) >= logging.WARNING:
        logging.getLogger("faust.transport.producer").setLevel(logging.ERROR)


def wait_for_broker(settings: Settings, quiet_s: float = 5.0, timeout_s: float = 60.0) -> None:
    """A worker started beside its broker waits for it, saying so once after ``quiet_s``; one that stays away
    ends the worker with one line instead of faust's traceback."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(client_config(settings))
    try:
        admin.list_topics(timeout=quiet_s)
        return
    except KafkaException:
        log.warning("waiting for the Kafka broker at %s", settings.bootstrap_servers)
    try:
        admin.list_topics(timeout=timeout_s - quiet_s)
    except KafkaException as exc:
        raise SystemExit(
            f"streamrec worker: no Kafka broker at {settings.bootstrap_servers} within {timeout_s:.0f} s: "
            f"{exc.args[0].str()}"
        ) from None


def run_worker(settings: Settings) -> None:
    """Run one worker in the foreground until SIGINT/SIGTERM."""
    from faust.worker import Worker as FaustWorker

    class QuietWorker(FaustWorker):
        """faust's worker without its progress spinner (it writes cursor codes even where no terminal is),
        and with repeated log lines held back."""

        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            self.spinner = None
            for handler in logger.handlers:
                handler.addFilter(RepeatedLines())
                if settings.log_format == "json":
                    handler.setFormatter(formatter("json"))

    wait_for_broker(settings)
    worker = Worker(settings)
    quiet_faust(settings.log_level)
    QuietWorker(worker.app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
