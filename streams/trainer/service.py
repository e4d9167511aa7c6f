"""`streamrec trainer`: the long-running service that answers fine-tuning triggers and judges canaries.

It consumes the triggers topic in its own consumer group and runs one fine-tuning run at a time, in a
thread, while it goes on consuming. Triggers that arrive during a run wait, and all of them are answered by
one follow-up run. A trigger's offset is committed only once the run that answers it has finished, so a
trainer that stops or dies mid-run picks its triggers up again when it (or another member of the group)
starts; a trigger that some version in the registry already answered is not run again.

While a canary runs (the registry's CANARY: started by a run with ``canary_share``, or by `streamrec models
canary`), it also reads the workers' canary reports, and promotes or rolls the canary back by the rule in
streams/canary.py; no new run starts before that.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from confluent_kafka import Consumer, Message, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from streamrec.models import registry
from streamrec.serde import Codec, DecodeError
from streamrec.settings import Settings
from streamrec.streams.canary import CanaryTally, judge
from streamrec.streams.kafka_security import client_config
from streamrec.streams.reading import consume_arrived
from streamrec.streams.schema_store import make_codec
from streamrec.streams.trainer import publish
from streamrec.streams.trainer.run import Outcome, Trigger, discard_partial, run_once

log = logging.getLogger(__name__)

RUN_BUCKETS_S = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)


@dataclass
class TrainerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.runs = Counter("streamrec_trainer_runs", "Fine-tuning runs by outcome", ["outcome"], registry=r)
        self.run_seconds = Histogram(
            "streamrec_trainer_run_seconds", "Duration of a run", buckets=RUN_BUCKETS_S, registry=r
        )
        self.cpu_seconds = Counter(
            "streamrec_trainer_cpu_seconds", "CPU time of the runs' training and scoring", registry=r
        )
        self.window_events = Gauge(
            "streamrec_trainer_window_events", "Valid events in the last run's window", registry=r
        )
        self.triggers = Counter(
            "streamrec_trainer_triggers", "Fine-tuning triggers consumed, by reason", ["reason"], registry=r
        )
        self.coalesced = Counter(
            "streamrec_trainer_triggers_coalesced",
            "Triggers answered by a run that answered an earlier one too",
            registry=r,
        )
        self.running = Gauge("streamrec_trainer_running", "1 while a run is in progress", registry=r)
        self.slice = Gauge(
            "streamrec_trainer_slice",
            "The last run's figures on the window's newest slice: the candidate's and the serving model's",
            ["model", "metric"],
            registry=r,
        )
        self.last_run = Gauge(
            "streamrec_trainer_last_run_timestamp_seconds", "When the last run ended", registry=r
        )
        self.canary_decisions = Counter(
            "streamrec_trainer_canary_decisions",
            "Canaries promoted or rolled back by the rule",
            ["decision"],
            registry=r,
        )
        self.canary_hit_rate = Gauge(
            "streamrec_trainer_canary_hit_rate",
            "Online hit rate of the running canary and of the serving model beside it, over every worker",
            ["model"],
            registry=r,
        )

    def record(self, outcome: Outcome, triggers: int) -> None:
        self.runs.labels(outcome.outcome).inc()
        self.run_seconds.observe(outcome.seconds)
        self.cpu_seconds.inc(outcome.cpu_seconds)
        self.window_events.set(outcome.window_events)
        self.coalesced.inc(max(0, triggers - 1))
        self.last_run.set(time.time())
        for model, figures in (("candidate", outcome.candidate), ("serving", outcome.parent)):
            for metric in ("hr@10", "ndcg@10"):
                if figures and metric in figures:
                    self.slice.labels(model, metric).set(figures[metric])


Partition = tuple[str, int]  # (topic, partition)


class TriggerQueue:
    """Triggers waiting, the run in progress, and how far each partition's offsets may be committed: past
    the longest prefix of records that are answered (or were no trigger to answer)."""

    def __init__(self) -> None:
        self.pending: list[tuple[Trigger, Partition, int]] = []  # (trigger, partition, offset)
        self.running: list[tuple[Trigger, Partition, int]] | None = None
        self._records: dict[Partition, dict[int, bool]] = {}  # partition -> offset -> answered

    def arrived(self, trigger: Trigger | None, partition: Partition, offset: int) -> None:
        """A record of the topic; None: nothing to run for it (not a trigger, or answered already)."""
        self._records.setdefault(partition, {})[offset] = trigger is None
        if trigger is not None:
            self.pending.append((trigger, partition, offset))

    def start(self) -> list[Trigger] | None:
        """Every waiting trigger, for one run, when none is in progress."""
        if self.running is not None or not self.pending:
            return None
        self.running, self.pending = self.pending, []
        return [t for t, _, _ in self.running]

    def finished(self) -> None:
        for _, partition, offset in self.running or []:
            if offset in self._records.get(partition, {}):
                self._records[partition][offset] = True
        self.running = None

    def revoked(self, partitions: set[Partition]) -> None:
        """Partitions moved to another member: their waiting triggers are its to answer now."""
        self.pending = [entry for entry in self.pending if entry[1] not in partitions]
        for p in partitions:
            self._records.pop(p, None)

    def committable(self) -> dict[Partition, int]:
        """Per partition, the offset to commit (the next one after the answered prefix), once; it is then
        forgotten."""
        out: dict[Partition, int] = {}
        for partition, records in self._records.items():
            done = None
            for offset in sorted(records):
                if not records[offset]:
                    break
                done = offset
            if done is not None:
                out[partition] = done + 1
                for offset in [o for o in records if o <= done]:
                    del records[offset]
        return out


class TrainerService:
    def __init__(
        self,
        settings: Settings,
        metrics: TrainerMetrics | None = None,
        run: Callable[[Settings, list[Trigger], Codec], Outcome] = run_once,
        emit: Callable[[dict], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or TrainerMetrics()
        self.run = run
        self.emit = emit or _print_line
        self.codec = make_codec(settings)
        self.queue = TriggerQueue()
        self.answered = registry.trigger_ids(settings.model_registry)
        self.tally: CanaryTally | None = None
        self._done = threading.Event()
        self._outcome: Outcome | None = None
        self._thread: threading.Thread | None = None

    def _consumer(self) -> Consumer:
        s = self.settings
        consumer = Consumer(
            {
                **client_config(s),
                "group.id": s.trainer_group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": s.session_timeout_ms,
                "heartbeat.interval.ms": s.heartbeat_interval_ms,
            }
        )

        def on_revoke(_: Consumer, partitions: list[TopicPartition]) -> None:
            self.queue.revoked({(tp.topic, tp.partition) for tp in partitions})

        consumer.subscribe([s.triggers_topic, s.canary_reports_topic], on_revoke=on_revoke)
        return consumer

    def serve(self, stop: threading.Event) -> None:
        """Consume triggers and run until ``stop`` is set. A run in progress then is abandoned: its
        triggers are not committed, so the next start answers them."""
        discard_partial(self.settings)
        consumer = self._consumer()
        try:
            while not stop.is_set():
                for msg in consume_arrived(consumer, 500, 0.5):
                    self._arrived(msg)
                self._judge_canary()
                self._step()
                offsets = self.queue.committable()
                if offsets:
                    consumer.commit(
                        offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
                    )
        finally:
            consumer.close()

    def _arrived(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            log.warning("triggers topic: %s", err.str())
            return
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        assert topic is not None and partition is not None and offset is not None
        where = (topic, partition)
        trigger: Trigger | None = None
        try:
            name, record = self.codec.decode(msg.value() or b"", accept={"FineTuneTrigger", "CanaryReport"})
            if name == "CanaryReport":
                if self.tally is not None:
                    self.tally.add(record)
            else:
                trigger = Trigger.from_avro(record)
        except (DecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("not a trigger or canary report at %s[%s]@%s: %s", topic, partition, offset, exc)
        if trigger is not None:
            self.metrics.triggers.labels(trigger.reason).inc()
            if trigger.trigger_id in self.answered:
                trigger = None  # a version in the registry answered it before a restart
        self.queue.arrived(trigger, where, offset)

    def _step(self) -> None:
        """Finish the run that is done, start the next one with every trigger waiting."""
        if self._thread is not None and self._done.is_set():
            self._thread.join()
            running = self.queue.running or []
            outcome = self._outcome or Outcome("failed", "the run raised (see the log)")
            self._thread, self._outcome = None, None
            self.answered.update(t.trigger_id for t, _, _ in running)
            self.queue.finished()
            self.metrics.running.set(0)
            self.metrics.record(outcome, len(running))
            self.emit({"triggers": [t.trigger_id for t, _, _ in running], **asdict(outcome)})
        if self._thread is None and registry.canary(self.settings.model_registry) is None:
            batch = self.queue.start()
            if batch:
                self._done.clear()
                self.metrics.running.set(1)
                # A daemon thread: a trainer told to stop does not wait for a run of minutes to end.
                self._thread = threading.Thread(target=self._run, args=(batch,), name="run", daemon=True)
                self._thread.start()

    def _judge_canary(self) -> None:
        """Add up the workers' reports of the running canary; promote or roll it back once the rule says."""
        running = registry.canary(self.settings.model_registry)
        if running is None:
            self.tally = None
            return
        if self.tally is None or self.tally.canary_version != running["version"]:
            # reports of an earlier canary are left out by version; this one's arrive every trigger_check_s
            self.tally = CanaryTally(running["version"], running["parent_version"])
        serving, canary = self.tally.figures()
        for model, figures in (("canary", canary), ("serving", serving)):
            if figures.rate is not None:
                self.metrics.canary_hit_rate.labels(model).set(figures.rate)
        s = self.settings
        decision, reason = judge(serving, canary, s.canary_min_outcomes, s.canary_tolerance)
        if decision is None:
            return
        if decision == "promote":
            publish.promote(s, running["version"], reason)
        else:
            publish.stop_canary(s, reason)
        self.metrics.canary_decisions.labels(decision).inc()
        self.emit({"canary": running["version"], "decision": decision, "reason": reason})
        self.tally = None

    def _run(self, triggers: list[Trigger]) -> None:
        try:
            self._outcome = self.run(self.settings, triggers, self.codec)
        except Exception:
            log.exception("fine-tuning run for %s failed", [t.trigger_id for t in triggers])
        finally:
            self._done.set()


def _print_line(summary: dict) -> None:
    print(json.dumps(summary), flush=True)
    sys.stdout.flush()


def run_trainer(settings: Settings) -> None:
    """Run the trainer in the foreground until SIGINT/SIGTERM; one JSON line per run on stdout."""
    import signal

    service = TrainerService(settings)
    if settings.trainer_metrics_port:
        start_http_server(settings.trainer_metrics_port, settings.web_host, service.metrics.registry)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service.serve(stop)
