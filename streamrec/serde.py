"""Avro wire format: single-object encoding (no registry needed) with writer-schema resolution.

A record on the wire is ``C3 01`` + the 8-byte CRC-64-AVRO fingerprint of its writer schema + the Avro body.
A reader that does not know a fingerprint asks a resolver (the schemas topic) for the writer schema, then
decodes with Avro schema resolution into its own version: that is what lets a producer add an optional field
while older workers keep running.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint, to_parsing_canonical_form
from mypy_extensions import mypyc_attr

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8
# Confluent Schema Registry framing: magic byte 0 + 4-byte big-endian schema id + Avro body.
REGISTRY_MAGIC = b"\x00"
REGISTRY_HEADER_LEN = len(REGISTRY_MAGIC) + 4


def registry_header(schema_id: int) -> bytes:
    return REGISTRY_MAGIC + schema_id.to_bytes(4, "big")


def registry_schema_id(data: bytes) -> int:
    """The schema id of a registry-framed record; DecodeError when the framing is wrong."""
    if not isinstance(data, bytes | bytearray) or len(data) < REGISTRY_HEADER_LEN or data[:1] != b"\x00":
        raise DecodeError("undecodable", "not a schema-registry framed record")
    return int.from_bytes(data[1:REGISTRY_HEADER_LEN], "big")


class DecodeError(Exception):
    """A record that cannot be decoded; ``reason`` is the dead-letter reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@mypyc_attr(allow_interpreted_subclasses=True)  # streams/client.py: InvalidRecordError
class EncodeError(ValueError):
    """A record that does not match its schema; raised before anything is sent."""


@dataclass(frozen=True)
class ReadPlan:
    """How a record body is read without fastavro: each field's name, kind and, for a record, its plan."""

    names: list[str]
    kinds: list[int]
    nested: list[ReadPlan | None]


@dataclass(frozen=True)
class RecordSchema:
    name: str  # short name, e.g. "ClickEvent"
    full_name: str  # e.g. "streamrec.ClickEvent"
    definition: dict[str, Any]  # expanded JSON definition (named types inlined)
    parsed: Any  # fastavro parsed schema
    fingerprint: bytes  # 8 bytes, in wire order
    plan: ReadPlan | None = None  # set when the hand-written reader can read it (read_plan)

    @property
    def json(self) -> str:
        return json.dumps(self.definition, separators=(",", ":"))


def _expand(schema: Any, named: dict[str, Any]) -> Any:
    """Inline named-type references so each schema stands alone (other languages need no file layout)."""
    if isinstance(schema, str):
        return _expand(named[schema], named) if schema in named else schema
    if isinstance(schema, list):
        return [_expand(s, named) for s in schema]
    if isinstance(schema, dict):
        out = dict(schema)
        if "fields" in out:
            out["fields"] = [{**f, "type": _expand(f["type"], named)} for f in out["fields"]]
        for key in ("items", "values"):
            if key in out:
                out[key] = _expand(out[key], named)
        return out
    return schema


def plain_types(schema: Any) -> Any:
    """``schema`` without logical types: a ``{"type": "long", "logicalType": "timestamp-millis"}`` is read
    and written as the long it is on the wire. The files declare them for other languages' libraries; the
    Parsing Canonical Form, and so the fingerprint, leaves them out."""
    if isinstance(schema, list):
        return [plain_types(s) for s in schema]
    if isinstance(schema, dict):
        if "logicalType" in schema and isinstance(schema.get("type"), str):
            return schema["type"]
        out = dict(schema)
        if "fields" in out:
            out["fields"] = [{**f, "type": plain_types(f["type"])} for f in out["fields"]]
        for key in ("items", "values"):
            if key in out:
                out[key] = plain_types(out[key])
        return out
    return schema


def make_schema(definition: dict[str, Any]) -> RecordSchema:
    """Build a RecordSchema from a stand-alone (expanded) Avro record definition. ``definition`` is kept as
    given (what a producer publishes); records are read and written without logical types
    (``plain_types``)."""
    plain = plain_types(definition)
    # Parsed with fastavro's hint: its readers and writers then skip re-parsing the schema on every call
    # (that re-parse was ~half the cost of encoding a UserState).
    parsed = fastavro.parse_schema(plain, _force=True)
    canonical = to_parsing_canonical_form(parsed)
    namespace = definition.get("namespace")
    name = definition["name"]
    full_name = name if "." in name or not namespace else f"{namespace}.{name}"
    return RecordSchema(
        name=full_name.rsplit(".", 1)[-1],
        full_name=full_name,
        definition=definition,
        parsed=parsed,
        fingerprint=bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")),
        plan=read_plan(plain),
    )


def bundled_schemas() -> dict[str, RecordSchema]:
    """The schemas shipped in schemas/, by short name."""
    raw = {}
    for entry in resources.files("streamrec.schemas").iterdir():
        if entry.name.endswith(".avsc"):
            definition = json.loads(entry.read_text())
            raw[f"{definition.get('namespace', 'streamrec')}.{definition['name']}"] = definition
    return {
        d["name"]: make_schema(_expand(d, {k: v for k, v in raw.items() if k != n})) for n, d in raw.items()
    }


# --- hand-written Avro reader for the worker's hot path (tests hold it to fastavro) ------------------------

# Field kinds of a read plan; OPTIONAL marks the union ["null", kind] (branch 0 is null, 1 the value).
# ARRAY marks an array of the kind it is combined with.
_STRING, _LONG, _DOUBLE, _RECORD, _INT, _SINGLE = 1, 2, 3, 4, 5, 6  # _SINGLE: an Avro float
_OPTIONAL = 8
_ARRAY = 16
_PRIMITIVES = {"string": _STRING, "long": _LONG, "int": _INT, "double": _DOUBLE, "float": _SINGLE}
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_DOUBLE_AT = struct.Struct("<d").unpack_from
_FLOAT_AT = struct.Struct("<f").unpack_from
_LONG_BITS = (1 << 64) - 1


def read_plan(definition: Any) -> ReadPlan | None:
    """The plan of a record made of strings, longs, ints, floats, doubles, nested records, arrays of any of
    them and ["null", X] unions: every record but one with a boolean (CatalogItem); None for anything
    else, which fastavro reads."""
    if not isinstance(definition, dict) or definition.get("type") != "record":
        return None
    names: list[str] = []
    kinds: list[int] = []
    nested: list[ReadPlan | None] = []
    for f in definition["fields"]:
        kind, optional = f["type"], 0
        if isinstance(kind, list):
            if len(kind) != 2 or kind[0] != "null":
                return None
            kind, optional = kind[1], _OPTIONAL
        array = 0
        if isinstance(kind, dict) and kind.get("type") == "array":
            kind, array = kind["items"], _ARRAY
        sub = read_plan(kind) if isinstance(kind, dict) else None
        if sub is not None:
            code = _RECORD
        elif isinstance(kind, str) and kind in _PRIMITIVES:
            code = _PRIMITIVES[kind]
        else:
            return None
        names.append(f["name"])
        kinds.append(code | array | optional)
        nested.append(sub)
    return ReadPlan(names, kinds, nested)


class _Body:
    """A record body being read; every read checks the bytes it takes (ValueError when they are not there)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def long(self) -> int:
        data, pos = self.data, self.pos
        if pos >= len(data):
            raise ValueError("truncated")
        b = data[pos]
        n, shift = b & 0x7F, 7
        while b & 0x80:
            pos += 1
            if pos >= len(data) or shift > 63:
                raise ValueError("truncated or over-long varint")
            b = data[pos]
            n |= (b & 0x7F) << shift
            shift += 7
        self.pos = pos + 1
        if n > _LONG_BITS:  # a tenth byte with more than the 64th bit: outside an Avro long
            raise ValueError("a varint beyond 64 bits (outside an Avro long)")
        return (n >> 1) ^ -(n & 1)

    def string(self) -> str:
        size = self.long()
        start = self.pos
        end = start + size
        if size < 0 or end > len(self.data):
            raise ValueError(f"a string of {size} bytes at {start} of {len(self.data)}")
        self.pos = end
        return self.data[start:end].decode()

    def double(self) -> float:
        start = self.pos
        if start + 8 > len(self.data):
            raise ValueError("truncated double")
        self.pos = start + 8
        value: float = _DOUBLE_AT(self.data, start)[0]
        return value

    def single(self) -> float:
        start = self.pos
        if start + 4 > len(self.data):
            raise ValueError("truncated float")
        self.pos = start + 4
        value: float = _FLOAT_AT(self.data, start)[0]
        return value

    def value(self, name: str, kind: int, sub: ReadPlan | None) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _LONG:
            return self.long()
        if kind == _INT:
            value = self.long()
            if not _INT_MIN <= value <= _INT_MAX:
                raise ValueError(f"{name} {value} is outside an Avro int's range")
            return value
        if kind == _DOUBLE:
            return self.double()
        if kind == _SINGLE:
            return self.single()
        assert sub is not None
        return self.record(sub)

    def array(self, name: str, kind: int, sub: ReadPlan | None) -> list[Any]:
        """Blocks of items, each a count (negative: its absolute value, then the block's size in bytes),
        until a count of 0."""
        out = []
        count = self.long()
        while count:
            if count < 0:
                count = -count
                self.long()  # the block's size in bytes: a reader may skip with it; this one reads on
            for _ in range(count):
                out.append(self.value(name, kind, sub))
            count = self.long()
        return out

    def record(self, plan: ReadPlan) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, kind, sub in zip(plan.names, plan.kinds, plan.nested, strict=True):
            if kind & _OPTIONAL:
                branch = self.long()
                if branch == 0:
                    out[name] = None
                    continue
                if branch != 1:
                    raise ValueError(f"union branch {branch} of {name}")
                kind ^= _OPTIONAL
            if kind & _ARRAY:
                out[name] = self.array(name, kind ^ _ARRAY, sub)
            else:
                out[name] = self.value(name, kind, sub)
        return out


def read_record(schema: RecordSchema, body: bytes) -> dict[str, Any]:
    """The record in ``body``, written with ``schema`` (which must have a plan): what fastavro reads, at
    a fraction of the cost. DecodeError for a truncated or corrupt body, or one with bytes left over."""
    assert schema.plan is not None
    reader = _Body(body)
    try:
        record = reader.record(schema.plan)
    except ValueError as exc:  # UnicodeDecodeError included
        raise DecodeError("undecodable", f"{schema.name} body: {exc}") from exc
    if reader.pos != len(body):
        raise DecodeError("undecodable", f"{schema.name} body has {len(body) - reader.pos} trailing bytes")
    return record


# --- hand-written Avro writers for the worker's hot path (tests hold them byte-identical to fastavro) ------

_SMALL = [bytes([n]) for n in range(128)]
NULL = b"\x00"  # union branch 0 (null); also the end of an array
SOME = b"\x02"  # union branch 1
_FLOAT = struct.Struct("<f").pack


# A varint 14 bits at a time: a non-final pair of 7-bit groups, and the final one or two groups.
_PAIRS = [bytes([(v & 0x7F) | 0x80, ((v >> 7) & 0x7F) | 0x80]) for v in range(1 << 14)]
_FINAL = [bytes([v]) if v < 0x80 else bytes([(v & 0x7F) | 0x80, v >> 7]) for v in range(1 << 14)]


def avro_long(n: int) -> bytes:
    """Avro long: zig-zag, then base-128 varint, least significant group first (two groups per table
    lookup: a timestamp takes four lookups instead of seven appends)."""
    n = (n << 1) ^ (n >> 63)
    if n < 0x80:
        return _SMALL[n]
    if n < 0x4000:
        return _FINAL[n]
    parts = []
    while n >= 0x4000:
        parts.append(_PAIRS[n & 0x3FFF])
        n >>= 14
    parts.append(_FINAL[n])
    return b"".join(parts)


def avro_string(value: str) -> bytes:
    data = value.encode()
    return avro_long(len(data)) + data


def avro_optional(value: str | None) -> bytes:
    return NULL if value is None else SOME + avro_string(value)


class RecommendationWriter:
    """The body of a Recommendation record, written by hand: the same bytes as fastavro, ~10x cheaper.

    Every micro-batch writes one record per changed user, ten items each, out of a small vocabulary (item
    ids, reason codes, explanations, anchors): their encodings are kept in a bounded table, so an item costs
    a few dictionary hits, a float pack and a join.
    """

    def __init__(self, max_strings: int = 200_000) -> None:
        self.max_strings = max_strings
        self._strings: dict[str, bytes] = {}
        self._anchors: dict[str | None, bytes] = {None: NULL}
        self._ids_of: list[str] | None = None
        self._id_bytes: list[bytes] = [NULL]

    def _string(self, value: str) -> bytes:
        found = self._strings.get(value)
        if found is None:
            if len(self._strings) >= self.max_strings:
                self._strings.clear()  # bounded: the vocabulary of a catalogue, not of the event stream
            found = self._strings[value] = avro_string(value)
        return found

    def _anchor(self, value: str | None) -> bytes:
        found = self._anchors.get(value)
        if found is None:
            if len(self._anchors) >= self.max_strings:
                self._anchors.clear()
                self._anchors[None] = NULL
            found = self._anchors[value] = SOME + avro_string(value)  # type: ignore[arg-type]
        return found

    def _item(self, i: Any) -> bytes:
        """One RecommendedItem (``body``'s items, and ``bodies``' popularity fill)."""
        string = self._string
        return (
            string(i.item_id)
            + _FLOAT(i.score)
            + string(i.reason)
            + string(i.explanation)
            + self._anchor(i.anchor)
        )

    def body(self, rec: Any) -> bytes:
        """``rec``: a streamrec.records.Recommendation (attribute access only: serde imports no records)."""
        string = self._string
        parts = [avro_string(rec.user_id)]
        items = rec.items
        if items:
            parts.append(avro_long(len(items)))
            parts += map(self._item, items)
        parts += (
            NULL,
            string(rec.model_version),
            string(rec.index_version),
            avro_string(rec.cause_event_id),
            avro_long(rec.event_time),
            avro_long(rec.publish_time),
            string(rec.mode),
        )
        return b"".join(parts)

    def _item_strings(self, item_ids: list[str]) -> list[bytes]:
        """Encoded item ids by item index (index 0 is padding), kept while the recommender's list is."""
        if item_ids is not self._ids_of:
            self._ids_of, self._id_bytes = item_ids, [NULL]
        known = self._id_bytes
        if len(known) <= len(item_ids):  # items upserted since: append-only, indices stay
            known += [avro_string(i) for i in item_ids[len(known) - 1 :]]
        return known

    def bodies(
        self,
        batch: Any,
        heads: list[tuple[str, str, int, str]],
        model_version: str,
        index_version: str,
        publish_time: int,
    ) -> list[bytes]:
        """The bodies of a whole micro-batch's records, straight from a streamrec.records.RankedBatch: row u
        of ``batch`` with ``heads[u]`` = (user_id, cause_event_id, event_time, mode). The same bytes as
        ``body`` of the Recommendation built from ``batch.items(u)``; a ranked item costs two list lookups,
        a float pack and a concatenation."""
        id_bytes = self._item_strings(batch.item_ids)
        string, anchor, pack = self._string, self._anchor, _FLOAT
        tails = {
            code: string(reason) + string(explanation) + anchor(anchor_id)
            for code, (reason, explanation, anchor_id) in batch.reasons.items()
        }
        middle = NULL + string(model_version) + string(index_version)
        published = avro_long(publish_time)
        out = []
        for (user_id, cause_event_id, event_time, mode), picked, scores, codes, fills in zip(
            heads, batch.picked, batch.scores, batch.codes, batch.fills, strict=True
        ):
            parts = [avro_string(user_id)]
            count = len(picked) + len(fills)
            if count:
                parts.append(avro_long(count))
                parts += [
                    id_bytes[idx] + pack(score) + tails[code]
                    for idx, score, code in zip(picked, scores, codes, strict=True)
                ]
                parts += map(self._item, fills)
            parts += (middle, avro_string(cause_event_id), avro_long(event_time), published, string(mode))
            out.append(b"".join(parts))
        return out


WriterSchemaResolver = Callable[[bytes], str | None]
"""Looks up a writer schema's JSON by fingerprint (e.g. from the schemas topic); None when unknown."""


class Codec(Protocol):
    """What the worker and the clients need of a codec: AvroCodec, or the schema-registry codec."""

    def schema(self, name: str) -> RecordSchema: ...

    def encode(self, name: str, record: dict[str, Any], schema: RecordSchema | None = None) -> bytes: ...

    def header(self, name: str) -> bytes: ...

    def decode(self, data: bytes, accept: Iterable[str] | None = None) -> tuple[str, dict[str, Any]]: ...


@mypyc_attr(allow_interpreted_subclasses=True)  # streams/schema_store.py: RegistryCodec
class AvroCodec:
    """Encodes and decodes single-object Avro records against this process's (reader) schemas."""

    def __init__(
        self,
        schemas: dict[str, RecordSchema] | None = None,
        resolver: WriterSchemaResolver | None = None,
    ) -> None:
        self.schemas = schemas if schemas is not None else bundled_schemas()
        self._by_fingerprint: dict[bytes, RecordSchema] = {s.fingerprint: s for s in self.schemas.values()}
        self._by_full_name = {s.full_name: s for s in self.schemas.values()}
        self._resolver = resolver

    def schema(self, name: str) -> RecordSchema:
        return self.schemas[name]

    def learn(self, writer_json: str) -> RecordSchema:
        """Accept a writer schema (for example a newer version of one of ours) for decoding."""
        writer = make_schema(json.loads(writer_json))
        self._by_fingerprint.setdefault(writer.fingerprint, writer)
        return writer

    def header(self, name: str) -> bytes:
        """What precedes the Avro body of a record written with this process's schema ``name``."""
        return MAGIC + self.schemas[name].fingerprint

    def encode(self, name: str, record: dict[str, Any], schema: RecordSchema | None = None) -> bytes:
        schema = schema or self.schemas[name]
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(schema.fingerprint)
        try:
            fastavro.schemaless_writer(buf, schema.parsed, record, strict_allow_default=True)
        # OverflowError: an integer beyond a long's range (fastavro does not check an int's 32 bits).
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise EncodeError(f"{name} does not match its schema: {exc}") from exc
        return buf.getvalue()

    def writer_schema(self, data: bytes) -> RecordSchema:
        if not isinstance(data, bytes | bytearray) or len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("undecodable", "not an Avro single-object encoded record")
        fp = bytes(data[2:HEADER_LEN])
        writer = self._by_fingerprint.get(fp)
        if writer is None and self._resolver is not None:
            found = self._resolver(fp)
            if found is not None:
                writer = self.learn(found)
                # Published under the fingerprint its producer's library computed, which may not be the
                # specification's (Apache avro for Python keeps {"type": "long"} of a logical type in its
                # canonical form): the next record with it is known at once.
                self._by_fingerprint.setdefault(fp, writer)
        if writer is None:
            raise DecodeError("unknown_schema", f"no writer schema with fingerprint {fp.hex()}")
        return writer

    def decode(self, data: bytes, accept: Iterable[str] | None = None) -> tuple[str, dict[str, Any]]:
        """Return (short schema name, record), resolved into this process's version of the schema."""
        return self.read_body(self.writer_schema(data), data[HEADER_LEN:], accept)

    def read_body(
        self, writer: RecordSchema, body: bytes, accept: Iterable[str] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Decode an Avro body written with ``writer`` into this process's version (any framing)."""
        reader = self._by_full_name.get(writer.full_name)
        if reader is None or (accept is not None and reader.name not in accept):
            raise DecodeError("unknown_schema", f"{writer.full_name} is not expected here")
        # The same canonical schema (any framing): the hand-written reader, else fastavro with resolution
        if reader.plan is not None and reader.fingerprint == writer.fingerprint:
            return reader.name, read_record(reader, body)
        buf = io.BytesIO(body)
        try:
            record = fastavro.schemaless_reader(
                buf, writer.parsed, None if reader is writer else reader.parsed
            )
        except SchemaResolutionError as exc:
            raise DecodeError("incompatible_schema", f"{writer.name}: {exc}") from exc
        except Exception as exc:  # fastavro raises many types for truncated or corrupt bodies
            raise DecodeError("undecodable", f"{writer.name} body: {type(exc).__name__}: {exc}") from exc
        if not isinstance(record, dict):
            raise DecodeError("undecodable", f"{writer.name} body is not a record")
        # Bytes left over mean the body was not written with this schema (concatenated or corrupt).
        if buf.tell() != len(body):
            left = len(body) - buf.tell()
            raise DecodeError("undecodable", f"{writer.name} body has {left} trailing bytes")
        return reader.name, record
