"""The training window: the events and backfill topics read to their ends with the worker's decoding and
validation rules, erased users left out, the worker's abuse control applied (events over the rate limit and
every event of a flagged user left out, streamrec/abuse.py), and the newest events chosen by the settings.

``read_topics`` is the Kafka edge; ``erasure_times`` and ``select_window`` are pure. The window records where
it came from (topics, partitions, offsets, time range, counts), and that description is kept with the model.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from streamrec.abuse import AbuseRules, screen
from streamrec.partitioner import partition_of
from streamrec.records import CatalogItem, Event
from streamrec.serde import Codec, DecodeError
from streamrec.settings import Settings
from streamrec.streams.event_stage import ACCEPTED_SCHEMAS, arrival_ms
from streamrec.streams.kafka_security import client_config
from streamrec.streams.reading import ReadError, ReadToEnd
from streamrec.streams.shadow import values_to_end
from streamrec.validation import Rejection, ValidationRules, validate_deletion, validate_event, validate_item

READ_TIMEOUT_S = 30.0  # the longest a read may go without a record or a partition's end


class WindowError(RuntimeError):
    """A topic that cannot be read to its end."""


@dataclass(frozen=True, slots=True)
class Erasure:
    """A UserDeletion as read: the user, and the deletion's timestamp."""

    user_id: str
    timestamp: int


@dataclass(frozen=True, slots=True)
class Located:
    """A valid event or erasure and where it was read."""

    item: Event | Erasure
    topic: str
    partition: int
    offset: int
    arrived_ms: int = 0  # when the record reached Kafka (``arrival_ms``): the rate limit's clock


@dataclass
class TopicsRead:
    """Everything valid on the topics, in offset order per partition, with what was refused and why, and
    where each partition ended when it was read."""

    records: list[Located] = field(default_factory=list)
    ends: dict[str, dict[int, int]] = field(default_factory=dict)
    read: int = 0
    refused: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class WindowSpec:
    max_events: int
    since_ms: int | None = None  # inclusive, on the event's timestamp
    until_ms: int | None = None  # exclusive
    abuse: AbuseRules = AbuseRules()  # the workers' rate limit and bot detector
    backfill_topic: str = "streamrec.events.backfill"  # history: not rate limited

    @classmethod
    def from_settings(cls, settings: Settings, now_ms: int) -> WindowSpec:
        hours = settings.trainer_window_hours
        since = None if hours is None else now_ms - int(hours * 3_600_000)
        return cls(
            settings.trainer_window_events,
            since,
            None,
            AbuseRules.from_settings(settings),
            settings.backfill_topic,
        )


@dataclass
class Window:
    events: list[Event]  # oldest first
    description: dict[str, Any]


def erasure_times(records: Iterable[Located]) -> dict[str, int]:
    """When each erased user was erased, as the worker computes it: the later of the deletion's timestamp and
    the user's newest event read before it. Events of the user up to that time are refused afterwards (and
    the state they built is gone), so none of them may be trained on (docs/privacy.md)."""
    newest: dict[str, int] = {}
    erased: dict[str, int] = {}
    for record in records:
        item = record.item
        if isinstance(item, Erasure):
            erased[item.user_id] = max(
                erased.get(item.user_id, 0), item.timestamp, newest.get(item.user_id, 0)
            )
        elif item.timestamp > newest.get(item.user_id, 0):
            newest[item.user_id] = item.timestamp
    return erased


def select_window(read: TopicsRead, spec: WindowSpec) -> Window:
    """The newest ``spec.max_events`` events in the time range, each event id once, without any event of an
    erased user up to their erasure, any event the workers refuse as over the rate limit, or any event of a
    user their bot detector flags (judged on everything read, in the order read: a user's events are in one
    partition, read in offset order as the worker applies them); oldest first (by timestamp, then where it
    was read)."""
    erased = erasure_times(read.records)
    seen: set[str] = set()
    unique: list[Located] = []
    left_out = duplicates = out_of_range = 0
    for record in read.records:
        event = record.item
        if isinstance(event, Erasure):
            continue
        if event.timestamp <= erased.get(event.user_id, -1):
            left_out += 1
            continue
        if event.event_id in seen:
            duplicates += 1
            continue
        seen.add(event.event_id)
        unique.append(record)
    verdicts = screen(
        [
            (r.item, None if r.topic == spec.backfill_topic else r.arrived_ms or r.item.timestamp)
            for r in unique
            if isinstance(r.item, Event)
        ],
        spec.abuse,
    )
    kept: list[Located] = []
    rate_limited = flagged_left_out = 0
    for record in unique:
        event = record.item
        assert isinstance(event, Event)
        if event.user_id in verdicts.flagged:
            flagged_left_out += 1
            continue
        if event.event_id in verdicts.rate_limited:
            rate_limited += 1
            continue
        if (spec.since_ms is not None and event.timestamp < spec.since_ms) or (
            spec.until_ms is not None and event.timestamp >= spec.until_ms
        ):
            out_of_range += 1
            continue
        kept.append(record)
    kept.sort(key=lambda r: (r.item.timestamp, r.topic, r.partition, r.offset))
    older = max(0, len(kept) - spec.max_events)
    chosen = kept[older:]
    events = [r.item for r in chosen if isinstance(r.item, Event)]
    topics: dict[str, dict[str, dict[str, int]]] = {}
    for topic, ends in read.ends.items():
        topics[topic] = {str(p): {"end": end} for p, end in sorted(ends.items())}
    for r in chosen:
        part = topics.setdefault(r.topic, {}).setdefault(str(r.partition), {})
        part["from"] = min(part.get("from", r.offset), r.offset)
        part["to"] = max(part.get("to", r.offset), r.offset)  # inclusive: the last offset trained on
    description = {
        "topics": topics,
        "time_range": [events[0].timestamp, events[-1].timestamp] if events else None,
        "since": spec.since_ms,
        "until": spec.until_ms,
        "max_events": spec.max_events,
        "events": len(events),
        "users": len({e.user_id for e in events}),
        "records_read": read.read,
        "refused": dict(read.refused),
        "duplicates": duplicates,
        "erased_users": len(erased),
        "erased_events_left_out": left_out,
        "rate_limited": rate_limited,
        "flagged_users": dict(Counter(verdicts.flagged.values())),
        "flagged_events_left_out": flagged_left_out,
        "outside_time_range": out_of_range,
        "older_than_window": older,
    }
    return Window(events, description)


# --- the Kafka edge -------------------------------------------------------------------------------------


class RecordRules:
    """The worker's rules for a record of the events or backfill topic (streams/event_stage.py ``_decode``):
    the size limit, decoding, validation (the backfill topic's without the age limit), the catalogue check,
    and that it is keyed by its user id and sits on that key's partition."""

    def __init__(
        self, settings: Settings, codec: Codec, catalog: dict[str, CatalogItem], now_ms: int
    ) -> None:
        self.codec = codec
        self.catalog = catalog
        self.now_ms = now_ms
        self.max_bytes = settings.max_event_bytes
        self.live = ValidationRules.from_settings(settings)
        self.historical = ValidationRules.from_settings(settings, historical=True)
        self.backfill_topic = settings.backfill_topic

    def check(
        self, topic: str, partition: int, partitions: int, key: bytes | None, value: bytes | None
    ) -> Event | Erasure | Rejection:
        if value is None:
            return Rejection("undecodable", "empty record (tombstone)")
        if len(value) + (len(key) if key is not None else 0) > self.max_bytes:
            return Rejection("too_large", "larger than the worker reads")
        try:
            name, record = self.codec.decode(value, accept=ACCEPTED_SCHEMAS)
        except DecodeError as exc:
            return Rejection(exc.reason, exc.detail)
        rules = self.historical if topic == self.backfill_topic else self.live
        item: Event | Erasure
        if name == "UserDeletion":
            rejection = validate_deletion(record, self.now_ms, rules)
            item = Erasure(record["user_id"], record["timestamp"])
        else:
            item = Event.from_avro(name, record)
            rejection = validate_event(item, self.now_ms, rules, self.catalog.__contains__)
        if rejection is not None:
            return rejection
        expected = item.user_id.encode()
        if key != expected:
            return Rejection("wrong_key", "not keyed by its user id")
        if partition_of(expected, partitions) != partition:
            return Rejection("wrong_partition", "not on its key's partition")
        return item


def read_catalog(settings: Settings, codec: Codec, now_ms: int) -> dict[str, CatalogItem]:
    """The catalogue as the workers hold it: the newest valid record of each item."""
    rules = ValidationRules.from_settings(settings)
    catalog: dict[str, CatalogItem] = {}
    for value in values_to_end(settings, settings.catalog_topic):
        try:
            _, record = codec.decode(value or b"", accept={"CatalogItem"})
        except DecodeError:
            continue
        item = CatalogItem.from_avro(record)
        if validate_item(item, now_ms, rules) is not None:
            continue
        held = catalog.get(item.item_id)
        if held is None or not item.updated_at or held.updated_at <= item.updated_at:
            catalog[item.item_id] = item
    return catalog


def read_topics(settings: Settings, rules: RecordRules) -> TopicsRead:
    """The events and backfill topics from their beginnings to their ends (partition EOF: the embedded
    broker's ListOffsets answer is wrong), every record checked by ``rules``."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer

    consumer = Consumer(
        {
            **client_config(settings),
            "group.id": settings.trainer_group,  # required by the client; assign() never joins it
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    out = TopicsRead()
    try:
        for topic in (settings.events_topic, settings.backfill_topic):
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                raise WindowError(f"topic {topic} is not readable: {meta and meta.error}")
            partitions = len(meta.partitions)
            ends = out.ends.setdefault(topic, dict.fromkeys(meta.partitions, 0))
            starts = dict.fromkeys(meta.partitions, OFFSET_BEGINNING)
            for msg in _messages(ReadToEnd(consumer, topic, starts, READ_TIMEOUT_S)):
                p, offset = msg.partition(), msg.offset()
                assert p is not None and offset is not None  # set on every fetched record
                out.read += 1
                ends[p] = offset + 1
                checked = rules.check(topic, p, partitions, msg.key(), msg.value())
                if isinstance(checked, Rejection):
                    out.refused[checked.reason] += 1
                elif isinstance(checked, Event):
                    arrived = arrival_ms(msg.timestamp(), checked.timestamp)
                    out.records.append(Located(checked, topic, p, offset, arrived))
                else:
                    out.records.append(Located(checked, topic, p, offset))
    except ReadError as exc:
        raise WindowError(str(exc)) from exc
    finally:
        consumer.close()
    return out


def _messages(reader: ReadToEnd) -> Iterator[Any]:
    for batch in reader:
        yield from batch


def read_window(settings: Settings, codec: Codec) -> tuple[Window, dict[str, CatalogItem]]:
    """The training window and the catalogue, read now."""
    now = time.time_ns() // 1_000_000
    catalog = read_catalog(settings, codec, now)
    read = read_topics(settings, RecordRules(settings, codec, catalog, now))
    return select_window(read, WindowSpec.from_settings(settings, now)), catalog
