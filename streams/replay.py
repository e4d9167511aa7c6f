"""`streamrec replay`: history from files or a Kafka range, filtered, rate-limited and resumable, into the
events topic or the backfill topic.

The pieces are small and testable without a broker: sources turn files or Kafka records into `SourceRecord`s
(an event, a deletion, or an invalid record with its line number), `Filters` decide what is skipped,
`Checkpoint` remembers how far a run got, and `run_replay` drives them into a `Sink`. Only `KafkaSink` (an
`EventProducer`) and `KafkaSource` talk to a broker. The checkpoint is written only after the producer has
flushed, so it never claims more than was delivered; what a crash re-sends after it carries the same event
ids, which the worker ignores as duplicates.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from streamrec.records import EVENT_SCHEMAS, Event, EventKind
from streamrec.serde import AvroCodec, Codec, DecodeError, EncodeError
from streamrec.settings import Settings
from streamrec.state import event_id_hash
from streamrec.streams.kafka_security import client_config
from streamrec.streams.reading import ReadError, ReadToEnd
from streamrec.validation import ValidationRules, validate_event

READ_TIMEOUT_S = 30.0  # the longest a read of a Kafka range may go without a record or a partition's end
FILE = -1  # the "partition" of a record read from a file: its position is a line or record number


class ReplayError(RuntimeError):
    """A replay that cannot start or go on (bad options, a checkpoint of another run, --strict)."""


# --- records --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deletion:
    """A privacy erasure found in a Kafka range: replayed too, so history never brings a user back."""

    event_id: str
    user_id: str
    timestamp: int
    requested_by: str | None = None


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: str  # unparsable | missing_field | bad_value | refused
    detail: str
    raw: str = ""


@dataclass(slots=True)
class SourceRecord:
    partition: int  # FILE, or the Kafka partition
    offset: int  # line / record number (from 1) in a file, the offset in Kafka
    item: Event | Deletion | Invalid
    record_time: int | None = None  # the Kafka record's timestamp; the window of a Kafka range uses it

    @property
    def where(self) -> str:
        return f"line {self.offset}" if self.partition == FILE else f"{self.partition}@{self.offset}"


# --- mapping rows of click-log exports to events ----------------------------------------------------------

# Column names accepted for each field, first match wins (exports name them in many ways).
COLUMNS: dict[str, tuple[str, ...]] = {
    "event_id": ("event_id", "eventid", "id"),
    "user_id": ("user_id", "userid", "user", "visitor_id", "visitorid", "customer_id", "uid"),
    "item_id": ("item_id", "itemid", "item", "product_id", "productid", "sku"),
    "timestamp": ("timestamp", "ts", "time", "event_time", "event_timestamp", "created_at", "datetime"),
    "kind": ("kind", "event_type", "eventtype", "type", "event", "action", "behavior"),
    "query": ("query", "search_query", "search_term", "q"),
    "session_id": ("session_id", "sessionid", "session"),
    "price": ("price", "unit_price", "amount"),
    "quantity": ("quantity", "qty"),
}

KINDS: dict[str, EventKind] = {
    **dict.fromkeys(("click", "view", "pageview", "page_view", "detail", "pv", "cart", "addtocart",
                     "add_to_cart", "1"), EventKind.CLICK),
    **dict.fromkeys(("search", "2"), EventKind.SEARCH),
    **dict.fromkeys(("purchase", "buy", "order", "transaction", "checkout", "3"), EventKind.PURCHASE),
}  # fmt: skip


class RowError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_time(value: object) -> int:
    """Epoch milliseconds from epoch s/ms/us/ns numbers, ISO 8601 text or datetimes (naive means UTC)."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)
    if isinstance(value, date):
        return int(datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp() * 1000)
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                return parse_time(datetime.fromisoformat(text))
            except ValueError:
                raise RowError("bad_value", f"timestamp {text!r} is neither a number nor ISO 8601") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RowError("bad_value", f"timestamp {value!r} is not a time")
    magnitude = abs(value)
    if magnitude < 1e11:  # seconds (until the year 5138)
        return int(value * 1000)
    if magnitude < 1e14:
        return int(value)
    if magnitude < 1e17:
        return int(value // 1000)
    return int(value // 1_000_000)


def content_id(user_id: str, kind: EventKind, subject: str, timestamp: int) -> str:
    """A stable id for a record that has none: the same row gives the same id in every run and export."""
    key = "\x1f".join((user_id, kind.name, subject, str(timestamp)))
    return "r-" + hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def _pick(row: Mapping[str, Any], name: str) -> Any:
    for column in COLUMNS[name]:
        value = row.get(column)
        if value is not None and value != "":
            return value
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def event_from_row(row: Mapping[str, Any], kind: EventKind | None = None) -> Event:
    """Map one exported row (column names as in COLUMNS, any case) to an event; RowError if it can't."""
    row = {str(k).lower(): v for k, v in row.items()}
    user = _pick(row, "user_id")
    if user is None:
        raise RowError("missing_field", f"no user id (columns {', '.join(COLUMNS['user_id'])})")
    raw_time = _pick(row, "timestamp")
    if raw_time is None:
        raise RowError("missing_field", f"no timestamp (columns {', '.join(COLUMNS['timestamp'])})")
    timestamp = parse_time(raw_time)
    item, query = _pick(row, "item_id"), _pick(row, "query")
    if kind is None:
        raw_kind = _pick(row, "kind")
        if raw_kind is None:
            kind = EventKind.SEARCH if query is not None and item is None else EventKind.CLICK
        else:
            found = KINDS.get(_text(raw_kind).strip().lower())
            if found is None:
                raise RowError("bad_value", f"event type {raw_kind!r} is not one of {sorted(set(KINDS))}")
            kind = found
    if kind is EventKind.SEARCH:
        if query is None:
            raise RowError("missing_field", "a search without a query")
        subject = _text(query)
    else:
        if item is None:
            raise RowError("missing_field", f"a {kind.name.lower()} without an item id")
        subject = _text(item)
    event = Event(
        event_id="",
        user_id=_text(user),
        kind=kind,
        timestamp=timestamp,
        item_id=None if kind is EventKind.SEARCH else subject,
        query=subject if kind is EventKind.SEARCH else None,
        session_id=None if (session := _pick(row, "session_id")) is None else _text(session),
    )
    if kind is EventKind.PURCHASE:
        price, quantity = _pick(row, "price"), _pick(row, "quantity")
        if price is None:
            raise RowError("missing_field", "a purchase without a price")
        try:
            event.price = float(price)
            event.quantity = 1 if quantity is None else int(float(quantity))
        except (TypeError, ValueError):
            raise RowError("bad_value", f"price {price!r} or quantity {quantity!r} is not a number") from None
    given = _pick(row, "event_id")
    event.event_id = (
        _text(given) if given is not None else content_id(event.user_id, kind, subject, timestamp)
    )
    return event


# --- sources ---------------------------------------------------------------------------------------------


class Source(Protocol):
    """Where history comes from. ``identity`` names it in checkpoints (a resumed run must read the same)."""

    identity: str

    def total(self) -> int | None:
        """How many records, if known cheaply (for the progress bar's ETA)."""
        ...

    def records(self, resume: Mapping[int, int]) -> Iterator[SourceRecord]:
        """Records in order, skipping those before ``resume[partition]`` (the next offset to read)."""
        ...


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _file_identity(path: Path) -> str:
    return f"{path.resolve()}:{path.stat().st_size}"


class _FileSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.identity = _file_identity(path)

    def total(self) -> int | None:
        with _open_text(self.path) as f:
            return sum(1 for _ in f)


class JsonLinesSource(_FileSource):
    """One JSON object a line: streamrec's `event_to_json` format, or any row that `event_from_row` maps."""

    def records(self, resume: Mapping[int, int]) -> Iterator[SourceRecord]:
        start = resume.get(FILE, 1)
        with _open_text(self.path) as f:
            for number, line in enumerate(f, 1):
                if number < start or not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise RowError("unparsable", f"a JSON {type(row).__name__}, not an object")
                    item: Event | Invalid = event_from_row(row)
                except json.JSONDecodeError as exc:
                    item = Invalid("unparsable", f"not JSON: {exc}", line.rstrip("\n"))
                except RowError as exc:
                    item = Invalid(exc.reason, exc.detail, line.rstrip("\n"))
                yield SourceRecord(FILE, number, item)


class CsvSource(_FileSource):
    """A CSV (or TSV) export with a header row; line numbers count the header as line 1."""

    def __init__(self, path: Path, delimiter: str = ",") -> None:
        super().__init__(path)
        self.delimiter = delimiter

    def total(self) -> int | None:
        lines = super().total()
        return None if lines is None else max(0, lines - 1)

    def records(self, resume: Mapping[int, int]) -> Iterator[SourceRecord]:
        start = resume.get(FILE, 1)
        with _open_text(self.path) as f:
            reader = csv.DictReader(f, delimiter=self.delimiter)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    yield SourceRecord(FILE, reader.line_num, Invalid("unparsable", str(exc)))
                    continue
                number = reader.line_num
                if number < start:
                    continue
                raw = self.delimiter.join("" if v is None else str(v) for v in row.values())
                if None in row:  # more cells than header columns
                    yield SourceRecord(FILE, number, Invalid("unparsable", "more cells than columns", raw))
                    continue
                try:
                    item: Event | Invalid = event_from_row(row)
                except RowError as exc:
                    item = Invalid(exc.reason, exc.detail, raw)
                yield SourceRecord(FILE, number, item)


class ParquetSource(_FileSource):
    """A Parquet export: rows are mapped like CSV rows; numbers are row numbers from 1."""

    def total(self) -> int | None:
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(self.path).metadata.num_rows)

    def records(self, resume: Mapping[int, int]) -> Iterator[SourceRecord]:
        import pyarrow.parquet as pq

        start = resume.get(FILE, 1)
        number = 0
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=8192):
            if number + batch.num_rows < start:
                number += batch.num_rows
                continue
            for row in batch.to_pylist():
                number += 1
                if number < start:
                    continue
                try:
                    item: Event | Invalid = event_from_row(row)
                except RowError as exc:
                    item = Invalid(exc.reason, exc.detail, json.dumps(row, default=str))
                yield SourceRecord(FILE, number, item)


class AvroFileSource(_FileSource):
    """An Avro object container file: records of streamrec's event schemas, or rows with a kind column."""

    def total(self) -> int | None:
        return None

    def records(self, resume: Mapping[int, int]) -> Iterator[SourceRecord]:
        import fastavro

        start = resume.get(FILE, 1)
        with self.path.open("rb") as f:
            reader = fastavro.reader(f)
            schema = reader.writer_schema
            name = str(schema.get("name", "")).rsplit(".", 1)[-1] if isinstance(schema, dict) else ""
            kind = EVENT_SCHEMAS.get(name)
            number = 0
            while True:
                number += 1
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except (ValueError, EOFError, OSError) as exc:  # a corrupt block ends what can be read
                    yield SourceRecord(FILE, number, Invalid("unparsable", f"corrupt Avro block: {exc}"))
                    return
                if number < start:
                    continue
                try:
                    if not isinstance(record, dict):
                        raise RowError("unparsable", f"an Avro {type(record).__name__}, not a record")
                    item: Event | Invalid = event_from_row(record, kind)
                except RowError as exc:
                    item = Invalid(exc.reason, exc.detail, json.dumps(record, default=str))
                yield SourceRecord(FILE, number, item)


class DatasetSource:
    """A ../shared/data dataset (SASRec `user item` lines or session lines) as click events.

    Timestamps are synthetic: ``base_time + n * spacing_ms`` for the n-th event, so they increase in file
    order and every user's events are in order. Event ids hash the dataset's content fingerprint, the user
    and the position, so a re-run yields the same ids (and the worker ignores what it already applied).
    """

    def __init__(self, path: Path, base_time: int, spacing_ms: int = 1000) -> None:
        from streamrec.models.data import load

        self.path = path
        self.data = load(path)
        self.base_time = base_time
        self.spacing_ms = spacing_ms
        self.identity = f"{path.resolve()}:{self.data.fingerprint}:{base_time}:{spacing_ms}"

    def total(self) -> int | None:
        return sum(len(steps) for steps in self.data.sequences.values())

    def records(self, resume: Mapping[int, int]) -> Iterator[SourceRecord]:
        from streamrec.models.data import PAD

        start = resume.get(FILE, 1)
        ids = self.data.item_ids
        number = 0
        for user, steps in self.data.sequences.items():
            for position, step in enumerate(steps):
                number += 1
                if number < start:
                    continue
                key = f"{self.data.fingerprint}\x1f{user}\x1f{position}"
                event_id = "ds-" + hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
                timestamp = self.base_time + (number - 1) * self.spacing_ms
                kind = EventKind(step.kind)
                if step.item != PAD:
                    event = Event(event_id, user, kind, timestamp, item_id=ids[step.item - 1])
                else:
                    event = Event(event_id, user, EventKind.SEARCH, timestamp, query=step.query)
                yield SourceRecord(FILE, number, event)


def _parse_offsets(spec: str | None, partitions: list[int]) -> dict[int, int]:
    """``"100"`` (every partition) or ``"0:100,3:250"`` -> {partition: offset}."""
    if spec is None:
        return {}
    spec = spec.strip()
    if ":" not in spec:
        return dict.fromkeys(partitions, int(spec))
    out: dict[int, int] = {}
    for part in spec.split(","):
        p, _, o = part.partition(":")
        out[int(p)] = int(o)
    unknown = set(out) - set(partitions)
    if unknown:
        raise ReplayError(f"no partition(s) {sorted(unknown)}; the topic has {partitions}")
    return out


class KafkaSource:
    """A range of a topic, by offsets (``[from, to)`` per partition) or by record time (``[since, until)``).

    By time, each partition starts where ``offsets_for_times`` points (a ``grace_ms`` earlier), and every
    record's timestamp is checked anyway: the embedded broker's time index answers offset 0 for any time
    (BROKER.md), and CreateTime is only nearly ordered. A partition stops at its end (partition EOF, not
    ListOffsets, which that broker also gets wrong), at ``to``, or at a record ``grace_ms`` past ``until``.
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        from_offset: str | None = None,
        to_offset: str | None = None,
        since: int | None = None,
        until: int | None = None,
        grace_ms: int | None = None,
        codec: Codec | None = None,
    ) -> None:
        from confluent_kafka import Consumer

        from streamrec.streams.schema_store import make_codec

        self.settings = settings
        self.topic = topic
        self.since, self.until = since, until
        self.grace_ms = settings.max_clock_skew_s * 1000 if grace_ms is None else grace_ms
        self.codec = codec or make_codec(settings)
        self.consumer = Consumer(
            {
                **client_config(settings),
                "group.id": "streamrec-replay",  # required by the client; assign() never joins it
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            }
        )
        meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            self.consumer.close()
            raise ReplayError(f"topic {topic} is not readable: {meta and meta.error}")
        self.partitions = sorted(meta.partitions)
        self.starts = _parse_offsets(from_offset, self.partitions)
        self.ends = _parse_offsets(to_offset, self.partitions)
        window = f"{since}..{until}" if since is not None or until is not None else "all"
        self.identity = f"kafka:{topic}:{from_offset}:{to_offset}:{window}"

    def total(self) -> int | None:
        if not self.ends:
            return None
        return sum(max(0, self.ends.get(p, 0) - self.starts.get(p, 0)) for p in self.partitions)

    def _time_starts(self) -> dict[int, int]:
        """Where the broker's time index says ``since - grace`` begins; -1: nothing that late."""
        from confluent_kafka import TopicPartition

        if self.since is None:
            return {}
        asked = [TopicPartition(self.topic, p, max(0, self.since - self.grace_ms)) for p in self.partitions]
        found = self.consumer.offsets_for_times(asked, timeout=10)
        return {tp.partition: tp.offset for tp in found}

    def records(self, resume: Mapping[int, int]) -> Iterator[SourceRecord]:
        from confluent_kafka import OFFSET_BEGINNING

        by_time = self._time_starts()
        starts = {}
        for p in self.partitions:
            start = max(self.starts.get(p, 0), resume.get(p, 0))
            if by_time.get(p, 0) < 0:
                continue  # nothing at or after `since` in this partition
            start = max(start, by_time.get(p, 0))
            if p in self.ends and start >= self.ends[p]:
                continue
            starts[p] = start or OFFSET_BEGINNING
        reader = ReadToEnd(self.consumer, self.topic, starts, READ_TIMEOUT_S)
        try:
            for records in reader:
                for msg in records:
                    p = msg.partition()
                    if p not in reader.pending:  # finished earlier in this fetch
                        continue
                    offset = msg.offset() or 0
                    _, record_time = msg.timestamp()
                    past_end = p in self.ends and offset >= self.ends[p]
                    if past_end or (self.until is not None and record_time >= self.until + self.grace_ms):
                        reader.finish(p)
                        continue
                    yield SourceRecord(p, offset, self._decode(msg.value()), record_time)
        except ReadError as exc:
            raise ReplayError(str(exc)) from exc
        finally:
            self.consumer.close()

    def _decode(self, value: bytes | None) -> Event | Deletion | Invalid:
        if value is None:
            return Invalid("unparsable", "empty record (tombstone)")
        try:
            name, record = self.codec.decode(value, accept=[*EVENT_SCHEMAS, "UserDeletion"])
        except DecodeError as exc:
            return Invalid("unparsable", f"{exc.reason}: {exc.detail}", value.hex()[:200])
        if name == "UserDeletion":
            return Deletion(
                record["event_id"], record["user_id"], record["timestamp"], record.get("requested_by")
            )
        return Event.from_avro(name, record)


def open_source(
    spec: str,
    settings: Settings,
    *,
    fmt: str = "auto",
    from_offset: str | None = None,
    to_offset: str | None = None,
    since: int | None = None,
    until: int | None = None,
    base_time: int | None = None,
) -> Source:
    """``kafka:TOPIC``, a file (.jsonl/.json/.ndjson, .avro, .csv, .tsv, .parquet, optionally .gz for text),
    a directory of events.jsonl, or a ../shared/data dataset (directory or .txt file)."""
    if spec.startswith("kafka:"):
        return KafkaSource(settings, spec[len("kafka:") :], from_offset, to_offset, since, until)
    if from_offset is not None or to_offset is not None:
        raise ReplayError("--from-offset/--to-offset select a Kafka range: use them with kafka:TOPIC")
    path = Path(spec)
    if not path.exists():
        raise ReplayError(f"no such file or directory: {path}")
    if fmt == "auto":
        fmt = _guess_format(path)
    if fmt == "jsonl":
        return JsonLinesSource(path / "events.jsonl" if path.is_dir() else path)
    if fmt in ("csv", "tsv"):
        return CsvSource(path, delimiter="\t" if fmt == "tsv" else ",")
    if fmt == "parquet":
        return ParquetSource(path)
    if fmt == "avro":
        return AvroFileSource(path)
    if fmt == "dataset":
        return DatasetSource(path, DEFAULT_BASE_TIME if base_time is None else base_time)
    raise ReplayError(f"unknown format {fmt!r}")


# Synthetic dataset timestamps start here by default: fixed, so a re-run yields the same events.
DEFAULT_BASE_TIME = 1_577_836_800_000  # 2020-01-01T00:00:00Z


def _guess_format(path: Path) -> str:
    if path.is_dir():
        return "jsonl" if (path / "events.jsonl").exists() else "dataset"
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    formats = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
    formats |= {".parquet": "parquet", ".pq": "parquet", ".avro": "avro", ".txt": "dataset"}
    if last not in formats:
        raise ReplayError(f"cannot tell the format of {path.name}; pass --format")
    return formats[last]


# --- filters, rate, checkpoint ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """What to replay: only these users and kinds, in ``[since, until)`` (epoch ms).

    The window applies to the event's timestamp in files and to the record's timestamp in a Kafka range.
    Deletions pass the kinds filter: erasing a selected user is never filtered out by event type.
    """

    users: frozenset[str] | None = None
    kinds: frozenset[EventKind] | None = None
    since: int | None = None
    until: int | None = None

    def skip_reason(self, record: SourceRecord) -> str | None:
        item = record.item
        assert not isinstance(item, Invalid)
        if self.users is not None and item.user_id not in self.users:
            return "user"
        if self.kinds is not None and isinstance(item, Event) and item.kind not in self.kinds:
            return "kind"
        when = record.record_time if record.record_time is not None else item.timestamp
        if (self.since is not None and when < self.since) or (self.until is not None and when >= self.until):
            return "time"
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "users": sorted(self.users) if self.users is not None else None,
            "kinds": sorted(k.name.lower() for k in self.kinds) if self.kinds is not None else None,
            "since": self.since,
            "until": self.until,
        }


class RateLimiter:
    """Paces calls to at most ``rate`` a second on average (None: as fast as possible)."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ReplayError("--rate must be positive")
        self.rate, self.clock, self.sleep = rate, clock, sleep
        self.started: float | None = None
        self.count = 0

    def wait(self) -> None:
        if self.rate is None:
            return
        now = self.clock()
        if self.started is None:
            self.started = now
        due = self.started + self.count / self.rate
        if due > now:
            self.sleep(due - now)
        self.count += 1


@dataclass
class Counts:
    read: int = 0
    sent: int = 0
    deletions: int = 0
    duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    invalid: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["skipped"], out["invalid"] = dict(self.skipped), dict(self.invalid)
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Counts:
        return cls(
            read=raw["read"],
            sent=raw["sent"],
            deletions=raw["deletions"],
            duplicates=raw["duplicates"],
            skipped=Counter(raw["skipped"]),
            invalid=Counter(raw["invalid"]),
        )


@dataclass
class Checkpoint:
    """How far a run got: per partition (FILE for files), the next position to read; and its counts.

    ``run`` identifies the source, the target and the filters: a checkpoint is never resumed by another run.
    """

    run: str
    next_positions: dict[int, int] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    done: bool = False

    def advance(self, record: SourceRecord) -> None:
        self.next_positions[record.partition] = record.offset + 1

    def save(self, path: Path) -> None:
        """Atomically: a crash leaves the previous checkpoint or this one, never half of one."""
        body = {
            "run": self.run,
            "next_positions": {str(p): o for p, o in self.next_positions.items()},
            "counts": self.counts.to_json(),
            "done": self.done,
            "saved_at": int(time.time() * 1000),
        }
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        raw = json.loads(path.read_text())
        return cls(
            run=raw["run"],
            next_positions={int(p): int(o) for p, o in raw["next_positions"].items()},
            counts=Counts.from_json(raw["counts"]),
            done=bool(raw["done"]),
        )


def run_identity(source: Source, target: str, filters: Filters) -> str:
    return json.dumps({"source": source.identity, "target": target, "filters": filters.describe()})


# --- sinks -----------------------------------------------------------------------------------------------


class Sink(Protocol):
    target: str

    def send(self, item: Event | Deletion) -> None: ...

    def flush(self) -> None:
        """Return only once everything sent is delivered; raise if any of it was not."""
        ...

    def close(self) -> None: ...


class KafkaSink:
    """Sends through `EventProducer` (validated, idempotent, murmur2 partitioner, like any backend).

    ``raw_ids``: the source holds raw user ids (files), which are sent as pseudonyms when
    ``STREAMREC_PSEUDONYM_KEY`` is set. Records read from Kafka passed a producer already and keep their ids.
    """

    def __init__(self, settings: Settings, topic: str, *, raw_ids: bool = True) -> None:
        from streamrec.streams.client import EventProducer

        self.target = topic
        self.historical = topic == settings.backfill_topic
        pseudonymise = None if raw_ids else False  # None: as the settings say
        self.producer = EventProducer(settings, config={"linger.ms": 20}, pseudonymise=pseudonymise)

    def send(self, item: Event | Deletion) -> None:
        if isinstance(item, Deletion):
            user_id = self.producer.sent_user_id(item.user_id)
            record = {
                "event_id": item.event_id,
                "user_id": user_id,
                "timestamp": item.timestamp,
                "requested_by": item.requested_by,
            }
            self.producer.send("UserDeletion", record, key=user_id, topic=self.target)
        else:
            if self.producer.pseudonymises:
                item = pseudonymous_content_id(item, self.producer.sent_user_id(item.user_id))
            self.producer.send_event(item, topic=self.target, historical=self.historical)

    def flush(self) -> None:
        self.producer.flush(60)

    def close(self) -> None:
        self.producer.close(60)


def pseudonymous_content_id(event: Event, user_pseudonym: str) -> Event:
    """``event`` with an id derived from its pseudonym instead of its raw user id, when its id was derived
    (a row without one): kind, item and time travel in the record, so an id hashed from the raw user id
    would let anyone test a guessed id against it. The same row still gives the same id in every run."""
    subject = (event.query if event.kind is EventKind.SEARCH else event.item_id) or ""
    if event.event_id != content_id(event.user_id, event.kind, subject, event.timestamp):
        return event
    return replace(event, event_id=content_id(user_pseudonym, event.kind, subject, event.timestamp))


class DryRunSink:
    """Sends nothing: every record has been validated and encoded before it reaches a sink."""

    def __init__(self, target: str) -> None:
        self.target = target

    def send(self, item: Event | Deletion) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _purchase_extra(event: Event) -> dict[str, Any]:
    return {"currency": None} if event.kind is EventKind.PURCHASE else {}


# --- the run ---------------------------------------------------------------------------------------------


@dataclass
class ReplayOptions:
    filters: Filters = field(default_factory=Filters)
    rate: float | None = None
    checkpoint: Path | None = None
    resume: bool = False
    reject_file: Path | None = None
    strict: bool = False
    checkpoint_every_s: float = 1.0
    checkpoint_every_records: int = 5000


def _rules(settings: Settings, historical: bool) -> ValidationRules:
    # The worker's own rules, less the catalogue (the replay tool does not read it): an event the worker
    # would dead-letter for its shape or time is reported here instead of being sent.
    return replace(ValidationRules.from_settings(settings, historical=historical), reject_unknown_items=False)


def run_replay(
    source: Source,
    sink: Sink,
    settings: Settings,
    options: ReplayOptions,
    on_progress: Callable[[int, Counts], None] | None = None,
) -> dict[str, Any]:
    """Replay ``source`` into ``sink``; returns the summary. Resumes from ``options.checkpoint`` if asked."""
    identity = run_identity(source, sink.target, options.filters)
    checkpoint = Checkpoint(identity)
    path = options.checkpoint
    resumed = False
    if path is not None and path.exists():
        if not options.resume:
            raise ReplayError(f"checkpoint {path} exists: pass --resume to continue that run, or remove it")
        checkpoint = Checkpoint.load(path)
        if checkpoint.run != identity:
            raise ReplayError(
                f"checkpoint {path} belongs to another run (source, target or filters differ):\n"
                f"  checkpoint: {checkpoint.run}\n  this run:   {identity}"
            )
        resumed = True
    counts = checkpoint.counts
    started = time.monotonic()
    sent_before = counts.sent
    rules = _rules(settings, historical=sink.target == settings.backfill_topic)
    limiter = RateLimiter(options.rate)
    seen: set[int] = set()
    examples: list[dict[str, Any]] = []
    reject = _open_reject_file(options.reject_file, append=resumed)
    last_save = time.monotonic()
    since_save = 0
    stopped: str | None = None

    def save() -> None:
        sink.flush()  # first: the checkpoint must never claim more than was delivered
        if path is not None:
            checkpoint.save(path)

    def report_invalid(record: SourceRecord, invalid: Invalid) -> None:
        counts.invalid[invalid.reason] += 1
        entry = {"where": record.where, "partition": record.partition, "offset": record.offset}
        entry |= {"reason": invalid.reason, "detail": invalid.detail}
        if len(examples) < 20:
            examples.append(entry)
        if reject is not None:
            reject.write(json.dumps(entry | {"raw": invalid.raw}) + "\n")

    try:
        if not checkpoint.done:
            for record in source.records(checkpoint.next_positions):
                counts.read += 1
                item: Event | Deletion | Invalid | None = record.item
                if isinstance(item, Event | Deletion):
                    item = _check(item, rules, options.filters, record, counts, seen)
                if isinstance(item, Invalid):
                    report_invalid(record, item)
                    if options.strict:  # stop before it: everything earlier is delivered and checkpointed
                        stopped = f"{record.where}: {item.reason}: {item.detail}"
                        break
                elif item is not None:
                    limiter.wait()
                    sink.send(item)
                    if isinstance(item, Deletion):
                        counts.deletions += 1
                    else:
                        counts.sent += 1
                checkpoint.advance(record)
                since_save += 1
                now = time.monotonic()
                if (
                    since_save >= options.checkpoint_every_records
                    or now - last_save >= options.checkpoint_every_s
                ):
                    save()
                    last_save, since_save = now, 0
                if on_progress is not None:
                    on_progress(counts.read, counts)
            else:
                checkpoint.done = True
        save()
    finally:
        if reject is not None:
            reject.close()
    seconds = time.monotonic() - started
    sent_now = counts.sent - sent_before
    dry_run = isinstance(sink, DryRunSink)
    totals = counts.to_json()
    if dry_run:  # nothing left the process: say what a real run would have sent
        totals["would_send"], totals["sent"] = totals["sent"], 0
    return {
        "target": sink.target,
        "dry_run": dry_run,
        "resumed": resumed,
        **totals,
        "invalid_examples": examples,
        "seconds": round(seconds, 3),
        "events_per_s": round(sent_now / seconds, 1) if seconds > 0 else None,
        "complete": checkpoint.done,
        "stopped": stopped,
    }


def _check(
    item: Event | Deletion,
    rules: ValidationRules,
    filters: Filters,
    record: SourceRecord,
    counts: Counts,
    seen: set[int],
) -> Event | Deletion | Invalid | None:
    """The item to send, an Invalid to report, or None when it is skipped (counted)."""
    reason = filters.skip_reason(record)
    if reason is not None:
        counts.skipped[reason] += 1
        return None
    digest = event_id_hash(item.event_id)
    if digest in seen:
        counts.duplicates += 1
        return None
    if isinstance(item, Event):
        rejection = validate_event(item, int(time.time() * 1000), rules, lambda _: True)
        if rejection is not None:
            return Invalid("refused", f"{rejection.reason}: {rejection.detail}")
        try:
            _CODEC.encode(item.schema_name, item.to_avro() | _purchase_extra(item))
        except EncodeError as exc:
            return Invalid("refused", f"does not fit its schema: {exc}")
    seen.add(digest)
    return item


_CODEC = AvroCodec()


def _open_reject_file(path: Path | None, append: bool) -> IO[str] | None:
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a" if append else "w")


def read_users(spec: str | None) -> frozenset[str] | None:
    """``--users``: a file of ids (one a line) when such a file exists, else a comma-separated list."""
    if spec is None:
        return None
    path = Path(spec)
    with contextlib.suppress(OSError):
        if path.is_file():
            return frozenset(line.strip() for line in path.read_text().splitlines() if line.strip())
    return frozenset(u.strip() for u in spec.split(",") if u.strip())


def read_kinds(spec: str | None) -> frozenset[EventKind] | None:
    if spec is None:
        return None
    kinds = set()
    for name in spec.split(","):
        name = name.strip().lower()
        if name not in ("click", "search", "purchase"):
            raise ReplayError(f"unknown event kind {name!r}: click, search or purchase")
        kinds.add(EventKind[name.upper()])
    return frozenset(kinds)


def read_time(spec: str | None) -> int | None:
    """``--since/--until``: epoch seconds or milliseconds, or ISO 8601 (naive means UTC)."""
    if spec is None:
        return None
    try:
        return parse_time(spec)
    except RowError as exc:
        raise ReplayError(exc.detail) from None
