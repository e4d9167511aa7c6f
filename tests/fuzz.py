"""A seeded stream of hostile records mixed with valid events, for the events topic: what a broken or
malicious backend could send. Each record says what the worker must do with it: the dead-letter reason it must
be refused with, or the valid event it must apply exactly once (a resent valid event is a duplicate).

``hostile_stream`` is plain data (no Kafka): tests/reliability/test_fuzz.py produces it to a real broker.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from streamrec.partitioner import partition_of
from streamrec.records import Event, EventKind
from streamrec.serde import MAGIC, AvroCodec, RecordSchema, avro_long, make_schema


@dataclass(frozen=True)
class FuzzRecord:
    key: bytes | None
    value: bytes | None
    partition: int | None  # None: the key's own partition (murmur2, as the client places it)
    fault: str  # "valid", "duplicate" or the name of the hostile kind (FAULTS)
    reason: str | None  # the dead-letter reason the worker must give; None for a valid event or duplicate
    event: Event | None = None  # the valid event (also for a duplicate: the one resent)


@dataclass
class Fuzzer:
    """Makes the records; ``items`` are catalogue ids the worker knows, ``partitions`` the events topic's."""

    items: list[str]
    partitions: int
    seed: int = 27
    users: int = 2_000
    now_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    codec: AvroCodec = field(default_factory=AvroCodec)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.sent: list[Event] = []
        self.evolved, self.incompatible = writer_schemas(self.codec)

    # --- valid events ---------------------------------------------------------------------------------

    def user(self) -> str:
        return f"fuzz-{self.rng.randrange(self.users):05d}"

    def event(self, kind: EventKind | None = None) -> Event:
        """A valid event, of ``kind`` if given."""
        event = self._event()
        while kind is not None and event.kind is not kind:
            event = self._event()
        return event

    def _event(self) -> Event:
        rng = self.rng
        base = {
            "event_id": uuid.UUID(int=rng.getrandbits(128)).hex,
            "user_id": self.user(),
            # within the last hour: out of order per user, never old nor ahead
            "timestamp": self.now_ms - rng.randrange(3_600_000),
            "session_id": rng.choice([None, f"s-{rng.randrange(10_000)}"]),
        }
        roll = rng.random()
        if roll < 0.2:
            return Event(kind=EventKind.SEARCH, query=rng.choice(QUERIES), **base)  # type: ignore[arg-type]
        item = rng.choice(self.items)
        if roll > 0.93:
            price = round(rng.uniform(0, 500), 2)
            return Event(
                kind=EventKind.PURCHASE, item_id=item, price=price, quantity=rng.randint(1, 3), **base
            )  # type: ignore[arg-type]
        return Event(kind=EventKind.CLICK, item_id=item, **base)  # type: ignore[arg-type]

    def encode(self, event: Event) -> bytes:
        return self.codec.encode(event.schema_name, event.to_avro())

    def edge(self) -> Event:
        """A valid event at the edges of the rules: ids and queries of the longest size allowed in multi-byte
        characters, a price of 0 or near the largest double, the largest quantity, a timestamp a day short
        of the age limit or within the clock skew."""
        rng = self.rng
        event = self.event()
        suffix = rng.choice(["", "ü" * 100, "🙂" * 60, "​" * 10, "名" * 80])  # at most 240 bytes
        event.user_id = f"{event.user_id}-{suffix}"
        event.event_id = f"{uuid.UUID(int=rng.getrandbits(128)).hex}{'é' * 112}"  # 256 bytes
        event.session_id = rng.choice([None, "s" * 256, "ß" * 128])
        event.timestamp = rng.choice(
            [self.now_ms - 3649 * 86_400_000, self.now_ms + 240_000, event.timestamp]
        )
        if event.kind is EventKind.SEARCH:
            event.query = rng.choice(["🙂" * 256, "q" * 1024, "a"])
        elif event.kind is EventKind.PURCHASE:
            event.price = rng.choice([0.0, 1.7e308, 5e-324])
            event.quantity = rng.choice([1, 2**31 - 1])
        return event

    def valid(self) -> FuzzRecord:
        roll = self.rng.random()
        event = self.edge() if roll < 0.05 else self.event()
        self.sent.append(event)
        value = self.encode(event)
        if roll > 0.95 and event.kind is EventKind.CLICK:  # a backend on a newer, compatible schema
            value = self.codec.encode("ClickEvent", {**event.to_avro(), "experiment": "b"}, self.evolved)
        return FuzzRecord(event.user_id.encode(), value, None, "valid", None, event)

    def duplicate(self) -> FuzzRecord:
        event = self.rng.choice(self.sent)
        return FuzzRecord(event.user_id.encode(), self.encode(event), None, "duplicate", None, event)

    # --- hostile records --------------------------------------------------------------------------------

    def keyed(self, fault: str, reason: str, value: bytes | None, user_id: str) -> FuzzRecord:
        return FuzzRecord(user_id.encode(), value, None, fault, reason)

    def changed(self, fault: str, reason: str, kind: EventKind | None = None, **fields: object) -> FuzzRecord:
        """A valid event (of ``kind`` if given) with some fields replaced (the key stays its user id)."""
        event = self.event(kind)
        record = {**event.to_avro(), **fields}
        user_id = str(record["user_id"])
        return self.keyed(fault, reason, self.codec.encode(event.schema_name, record), user_id)

    def random_bytes(self) -> FuzzRecord:
        noise = self.rng.randbytes(self.rng.randrange(1, 400))
        if noise.startswith(MAGIC):  # the framing: that is another fault (bad_fingerprint)
            noise = b"\x00" + noise
        return self.keyed("random_bytes", "undecodable", noise, self.user())

    def truncated(self) -> FuzzRecord:
        event = self.event()
        body = self.encode(event)
        return self.keyed("truncated", "undecodable", body[: self.rng.randrange(1, len(body))], event.user_id)

    def trailing_bytes(self) -> FuzzRecord:
        event = self.event()
        extra = self.rng.randbytes(self.rng.randrange(1, 20))
        return self.keyed("trailing_bytes", "undecodable", self.encode(event) + extra, event.user_id)

    def oversized(self) -> FuzzRecord:
        event = self.event()
        record = {**event.to_avro(), "session_id": "s" * 70_000}
        return self.keyed(
            "oversized", "too_large", self.codec.encode(event.schema_name, record), event.user_id
        )

    def bad_fingerprint(self) -> FuzzRecord:
        event = self.event()
        body = self.encode(event)[len(MAGIC) + 8 :]
        return self.keyed(
            "bad_fingerprint", "unknown_schema", MAGIC + self.rng.randbytes(8) + body, event.user_id
        )

    def wrong_record_type(self) -> FuzzRecord:
        """A well-formed record of a type that does not belong on the events topic."""
        item = {"item_id": self.rng.choice(self.items), "title": "T", "category": None, "price": 1.0,
                "in_stock": True, "description": None, "updated_at": self.now_ms}  # fmt: skip
        return self.keyed(
            "wrong_record_type", "unknown_schema", self.codec.encode("CatalogItem", item), self.user()
        )

    def incompatible_schema(self) -> FuzzRecord:
        """A writer schema on the schemas topic that cannot be read as the worker's (a string timestamp)."""
        event = self.event(EventKind.CLICK)
        record = {**event.to_avro(), "timestamp": str(event.timestamp)}
        value = self.codec.encode("ClickEvent", record, self.incompatible)
        return self.keyed("incompatible_schema", "incompatible_schema", value, event.user_id)

    def tombstone(self) -> FuzzRecord:
        return self.keyed("tombstone", "undecodable", None, self.user())

    def wrong_key(self) -> FuzzRecord:
        event = self.event()
        key = self.rng.choice([None, b"", b"someone-else", event.user_id.encode() + b" "])
        return FuzzRecord(key, self.encode(event), None, "wrong_key", "wrong_key")

    def wrong_partition(self) -> FuzzRecord:
        event = self.event()
        home = partition_of(event.user_id.encode(), self.partitions)
        elsewhere = (home + self.rng.randrange(1, self.partitions)) % self.partitions
        return FuzzRecord(
            event.user_id.encode(), self.encode(event), elsewhere, "wrong_partition", "wrong_partition"
        )

    def control_in_user(self) -> FuzzRecord:
        return self.changed("control_in_user", "invalid_record", user_id=f"{self.user()}{self.control()}")

    def control_in_query(self) -> FuzzRecord:
        query = f"red{self.control()}shoes"
        return self.changed("control_in_query", "invalid_record", EventKind.SEARCH, query=query)

    def control(self) -> str:
        return self.rng.choice(["\x00", "\x1b[31m", "\n", "\r", "\x7f", "\x85", "\u2028", "\t"])

    def blank_id(self) -> FuzzRecord:
        return self.changed("blank_id", "invalid_record", event_id=self.rng.choice(["", " ", "\u3000"]))

    def long_id(self) -> FuzzRecord:
        return self.changed("long_id", "invalid_record", event_id="e" * self.rng.randrange(300, 5_000))

    def negative_timestamp(self) -> FuzzRecord:
        return self.changed("negative_timestamp", "absurd_timestamp", timestamp=-self.rng.randrange(1, 2**62))

    def future_timestamp(self) -> FuzzRecord:
        ahead = self.rng.choice(
            [10**9, 2**62, self.now_ms * 1000]
        )  # days ahead, the far future, microseconds
        return self.changed("future_timestamp", "absurd_timestamp", timestamp=self.now_ms + ahead)

    def seconds_timestamp(self) -> FuzzRecord:
        return self.changed("seconds_timestamp", "absurd_timestamp", timestamp=self.now_ms // 1000)

    def bad_price(self) -> FuzzRecord:
        price = self.rng.choice([math.nan, math.inf, -math.inf, -0.01, -1e308])
        return self.changed("bad_price", "invalid_record", EventKind.PURCHASE, price=price)

    def bad_quantity(self) -> FuzzRecord:
        quantity = self.rng.choice([0, -1, -(2**31)])
        return self.changed("bad_quantity", "invalid_record", EventKind.PURCHASE, quantity=quantity)

    def quantity_over_int(self) -> FuzzRecord:
        event = self.event(EventKind.PURCHASE)
        body = self.codec.encode("PurchaseEvent", {**event.to_avro(), "quantity": 1, "context": None})
        assert body.endswith(avro_long(1) + b"\x00\x00")  # quantity, no currency, no context
        value = body[:-3] + avro_long(self.rng.choice([2**31, 2**40, 2**62])) + b"\x00\x00"
        return self.keyed("quantity_over_int", "undecodable", value, event.user_id)

    def deletion(self, fault: str, reason: str, user_id: str, timestamp: int) -> FuzzRecord:
        record = {"event_id": uuid.UUID(int=self.rng.getrandbits(128)).hex, "user_id": user_id,
                  "timestamp": timestamp, "requested_by": None}  # fmt: skip
        return self.keyed(fault, reason, self.codec.encode("UserDeletion", record), user_id)

    def future_deletion(self) -> FuzzRecord:
        """An erasure dated ahead would refuse the user's events until then: refused itself."""
        return self.deletion("future_deletion", "absurd_timestamp", self.user(), self.now_ms + 10**9)

    def control_in_deletion(self) -> FuzzRecord:
        user_id = f"{self.user()}{self.control()}"
        return self.deletion("control_in_deletion", "invalid_record", user_id, self.now_ms)

    def unknown_item(self) -> FuzzRecord:
        return self.changed(
            "unknown_item", "unknown_item", EventKind.CLICK, item_id=f"no-such-{self.rng.randrange(10**9)}"
        )


FAULTS: dict[str, Callable[[Fuzzer], FuzzRecord]] = {
    name: getattr(Fuzzer, name)
    for name in (
        "random_bytes",
        "truncated",
        "trailing_bytes",
        "oversized",
        "bad_fingerprint",
        "wrong_record_type",
        "incompatible_schema",
        "tombstone",
        "wrong_key",
        "wrong_partition",
        "control_in_user",
        "control_in_query",
        "blank_id",
        "long_id",
        "negative_timestamp",
        "future_timestamp",
        "seconds_timestamp",
        "bad_price",
        "bad_quantity",
        "quantity_over_int",
        "unknown_item",
        "future_deletion",
        "control_in_deletion",
    )
}
QUERIES = ["running shoes", "rose serum", "board game", "wireless headphones", "cast iron pan", "thriller"]


def writer_schemas(codec: AvroCodec) -> tuple[RecordSchema, RecordSchema]:
    """Two writer schemas of ClickEvent that backends could publish on the schemas topic: a newer one with a
    field added (with a default: the worker reads it), and an incompatible one (a string timestamp)."""
    evolved = json.loads(codec.schema("ClickEvent").json)
    evolved["fields"].append({"name": "experiment", "type": ["null", "string"], "default": None})
    incompatible = json.loads(codec.schema("ClickEvent").json)
    for f in incompatible["fields"]:
        if f["name"] == "timestamp":
            f["type"] = "string"
    return make_schema(evolved), make_schema(incompatible)


def hostile_stream(
    fuzzer: Fuzzer, records: int, hostile_share: float = 0.3, duplicate_share: float = 0.03
) -> Iterator[FuzzRecord]:
    """``records`` records: hostile ones of every kind in turn (random order), resent valid events, and
    valid events for the rest. The hostile kinds cycle so that each appears about equally often."""
    rng = fuzzer.rng
    faults = list(FAULTS.values())
    for n in range(records):
        roll = rng.random()
        if roll < hostile_share:
            yield faults[n % len(faults)](fuzzer)
        elif roll < hostile_share + duplicate_share and fuzzer.sent:
            yield fuzzer.duplicate()
        else:
            yield fuzzer.valid()


def expected_counts(records: list[FuzzRecord]) -> dict[str, Counter[str]]:
    """Per user, how many clicks, searches and purchases the worker must hold: each valid event once."""
    counts: dict[str, Counter[str]] = {}
    for r in records:
        if r.fault == "valid":
            assert r.event is not None
            counts.setdefault(r.event.user_id, Counter())[COUNTERS[r.event.kind]] += 1
    return counts


COUNTERS = {EventKind.CLICK: "clicks", EventKind.SEARCH: "searches", EventKind.PURCHASE: "purchases"}
