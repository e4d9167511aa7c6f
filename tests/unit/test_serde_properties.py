"""Property-based tests of the Avro wire format: round trips, schema evolution, and corrupt input."""

from __future__ import annotations

import copy
import io
import struct
import uuid
from dataclasses import replace
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from streamrec.records import (
    EVENT_SCHEMAS,
    CatalogItem,
    Event,
    EventKind,
    HistoryEntry,
    RankedBatch,
    Recommendation,
    RecommendedItem,
    UserState,
)
from streamrec.serde import (
    HEADER_LEN,
    AvroCodec,
    DecodeError,
    EncodeError,
    RecommendationWriter,
    RecordSchema,
    avro_long,
    avro_optional,
    avro_string,
    bundled_schemas,
    make_schema,
    read_record,
    registry_header,
)
from streamrec.settings import Settings
from streamrec.state import (
    StateLimits,
    appends_to_history,
    apply_event,
    decode_state,
    decode_state_bytes,
    encode_state,
    encode_state_bytes,
    state_from_avro,
    state_to_avro,
)
from streamrec.streams.schema_store import RegistryCodec

BUNDLED = bundled_schemas()
NO_SCHEMA = lambda fp: None  # noqa: E731 - a resolver that knows nothing beyond the bundled schemas


def registry_codec(schemas: dict[str, RecordSchema] | None = None, url: str | None = None) -> RegistryCodec:
    url = url or f"mock://{uuid.uuid4().hex}"  # a fresh in-process registry unless shared on purpose
    return RegistryCodec(Settings(schema_registry_url=url), schemas=schemas, resolver=NO_SCHEMA)


CODECS = {"single-object": AvroCodec(resolver=NO_SCHEMA), "registry": registry_codec()}
codec_names = pytest.mark.parametrize("codec_name", sorted(CODECS))
fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ------------------------------------------------------------------------------------------

ids = st.text(min_size=1, max_size=24)
maybe_text = st.none() | st.text(max_size=24)
longs = st.integers(-(2**63), 2**63 - 1)
ints = st.integers(-(2**31), 2**31 - 1)
doubles = st.floats(allow_nan=False)  # NaN != NaN would fail equality, not the codec
contexts = st.none() | st.fixed_dictionaries(
    {"device": maybe_text, "page": maybe_text, "referrer": maybe_text, "locale": maybe_text}
)


@st.composite
def events(draw: st.DrawFn) -> Event:
    kind = draw(st.sampled_from(EventKind))
    return Event(
        event_id=draw(ids),
        user_id=draw(ids),
        kind=kind,
        timestamp=draw(longs),
        item_id=None if kind is EventKind.SEARCH else draw(ids),
        query=draw(st.text(max_size=60)) if kind is EventKind.SEARCH else None,
        session_id=draw(maybe_text),
        price=draw(doubles) if kind is EventKind.PURCHASE else None,
        quantity=draw(ints) if kind is EventKind.PURCHASE else 1,
        context=draw(contexts),
    )


catalog_items = st.builds(
    CatalogItem,
    item_id=ids,
    title=st.text(max_size=60),
    category=maybe_text,
    price=st.none() | doubles,
    in_stock=st.booleans(),
    description=st.none() | st.text(max_size=200),
    updated_at=longs,
)

recommendations = st.builds(
    Recommendation,
    user_id=ids,
    items=st.lists(
        st.builds(
            RecommendedItem,
            item_id=ids,
            score=st.floats(width=32, allow_nan=False),  # Avro float: 32 bits survive exactly
            reason=st.sampled_from(["similar_to_recent", "matches_search", "goes_with_purchase", "popular"]),
            explanation=st.text(max_size=60),
            anchor=maybe_text,
        ),
        max_size=12,
    ),
    model_version=ids,
    index_version=ids,
    cause_event_id=ids,
    event_time=longs,
    publish_time=longs,
    mode=st.sampled_from(["live", "backfill", "shadow"]),
)

user_states = st.builds(
    UserState,
    user_id=ids,
    history=st.lists(
        st.builds(
            HistoryEntry,
            kind=st.sampled_from(EventKind),
            timestamp=longs,
            item_id=st.none() | ids,
            query=maybe_text,
        ),
        max_size=20,
    ),
    purchased=st.lists(ids, max_size=10),
    seen_event_ids=st.lists(longs, max_size=64),
    clicks=longs,
    searches=longs,
    purchases=longs,
    last_event_id=maybe_text,
    last_event_time=longs,
    rate_tat=longs,
    fast_streak=longs,
    repeat_item=st.none() | ids,
    repeat_count=longs,
    flagged=st.none() | st.sampled_from(["inhuman_speed", "repeated_item"]),
    flagged_at=longs,
)


# --- round trips -----------------------------------------------------------------------------------------


@codec_names
@fast
@given(event=events())
def test_every_event_type_round_trips(codec_name: str, event: Event) -> None:
    codec = CODECS[codec_name]
    name, record = codec.decode(codec.encode(event.schema_name, event.to_avro()))
    assert name == event.schema_name
    assert Event.from_avro(name, record) == event


@codec_names
@fast
@given(user_id=ids, event_id=ids, timestamp=longs, requested_by=maybe_text)
def test_user_deletion_round_trips(
    codec_name: str, user_id: str, event_id: str, timestamp: int, requested_by: str | None
) -> None:
    codec = CODECS[codec_name]
    record = {"event_id": event_id, "user_id": user_id, "timestamp": timestamp, "requested_by": requested_by}
    assert codec.decode(codec.encode("UserDeletion", record)) == ("UserDeletion", record)


@codec_names
@fast
@given(item=catalog_items)
def test_catalog_item_round_trips(codec_name: str, item: CatalogItem) -> None:
    codec = CODECS[codec_name]
    name, record = codec.decode(codec.encode("CatalogItem", item.to_avro()), accept=["CatalogItem"])
    assert CatalogItem.from_avro(record) == item


@codec_names
@fast
@given(rec=recommendations)
def test_recommendation_round_trips(codec_name: str, rec: Recommendation) -> None:
    codec = CODECS[codec_name]
    _, record = codec.decode(codec.encode("Recommendation", rec.to_avro()))
    assert Recommendation.from_avro(record) == rec


WRITER = RecommendationWriter(max_strings=50)  # small: the table's reset is exercised too


@codec_names
@fast
@given(rec=recommendations)
def test_the_hand_written_recommendation_writer_is_byte_identical_to_fastavro(
    codec_name: str, rec: Recommendation
) -> None:
    codec = CODECS[codec_name]
    assert codec.header("Recommendation") + WRITER.body(rec) == codec.encode("Recommendation", rec.to_avro())


@st.composite
def ranked_batches(draw: st.DrawFn) -> tuple[RankedBatch, list[tuple[str, str, int, str]]]:
    """A batch as the ranker leaves it: ranked rows over a small catalogue, reasons by code, popular fills."""
    item_ids = draw(st.lists(ids, min_size=1, max_size=8))
    reasons = draw(
        st.dictionaries(
            st.integers(-5, 20),
            st.tuples(
                st.sampled_from(["similar_to_recent", "matches_search"]), st.text(max_size=30), maybe_text
            ),
            min_size=1,
            max_size=6,
        )
    )
    rows = draw(st.integers(0, 5))
    ranked = [
        draw(
            st.lists(
                st.tuples(
                    st.integers(1, len(item_ids)),
                    st.floats(width=32, allow_nan=False),
                    st.sampled_from(sorted(reasons)),
                ),
                max_size=10,
            )
        )
        for _ in range(rows)
    ]
    fills = [draw(recommendations).items[:3] for _ in range(rows)]
    batch = RankedBatch(
        item_ids,
        [[i for i, _, _ in row] for row in ranked],
        [[s for _, s, _ in row] for row in ranked],
        [[c for _, _, c in row] for row in ranked],
        reasons,
        fills,
    )
    heads = [
        (draw(ids), draw(ids), draw(longs), draw(st.sampled_from(["live", "backfill"]))) for _ in range(rows)
    ]
    return batch, heads


@fast
@given(drawn=ranked_batches(), versions=st.tuples(ids, ids), publish=longs)
def test_a_batch_written_from_its_arrays_is_byte_identical_to_fastavro(
    drawn: tuple[RankedBatch, list[tuple[str, str, int, str]]], versions: tuple[str, str], publish: int
) -> None:
    """The worker writes a micro-batch's records straight from the ranker's lists; each is what fastavro
    writes for the Recommendation with that row's items, whatever the writer's table held before."""
    batch, heads = drawn
    codec = CODECS["single-object"]
    bodies = WRITER.bodies(batch, heads, *versions, publish)
    assert len(bodies) == len(heads)
    for u, ((user_id, cause, event_time, mode), body) in enumerate(zip(heads, bodies, strict=True)):
        rec = Recommendation(user_id, batch.items(u), *versions, cause, event_time, publish, mode)
        assert codec.header("Recommendation") + body == codec.encode("Recommendation", rec.to_avro())
        assert batch.ids(u) == [i.item_id for i in rec.items]


@given(
    n=st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.integers(-(2**15), 2**15),  # every varint length change near the table edges
        st.integers(1_500_000_000_000, 2_000_000_000_000),  # timestamps in ms
    )
)
def test_the_hand_written_long_is_fastavros(n: int) -> None:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema("long"), n)
    assert avro_long(n) == out.getvalue()


@codec_names
@fast
@given(state=user_states)
def test_user_state_round_trips(codec_name: str, state: UserState) -> None:
    codec = CODECS[codec_name]
    _, record = codec.decode(codec.encode("UserState", state_to_avro(state)))
    assert state_from_avro(record) == state


@fast
@given(state=user_states)
@example(state=UserState("u", purchases=-1))  # once taken for "purchased list not encoded yet"
def test_the_changelog_encoding_round_trips_user_state(state: UserState) -> None:
    assert decode_state(encode_state(state)) == state


# What the worker does with a user who dropped out of its cache: read the stored state by hand, apply the new
# events, re-encode from the bytes it read. Held to fastavro's reading and to a full encode.

_new_clicks = st.lists(st.tuples(st.integers(0, 40), st.integers(-5, 1000)), max_size=6)


@fast
@given(state=user_states, clicks=_new_clicks)
def test_a_stored_state_read_by_hand_is_fastavros_and_re_encodes_from_its_bytes(
    state: UserState, clicks: list[tuple[int, int]]
) -> None:
    data = encode_state(state)
    read, parts = decode_state_bytes(data)
    assert read == decode_state(data) == state
    assert parts == encode_state_bytes(state)[1]
    # New clicks just after the newest entry (a few a little before it: inserted by time), as the worker
    # applies them: an insert re-encodes the whole state, an append only its new entries.
    newest = min(max((h.timestamp for h in read.history), default=0), 2**63 - 2000)
    new, bytes_ = 0, parts
    for n, delta in clicks:
        event = Event(f"e{n}", read.user_id, EventKind.CLICK, newest + delta, item_id=f"i{n}")
        if not appends_to_history(read, event):
            bytes_ = None
        new += apply_event(read, event, StateLimits(history_length=12, dedupe_window=40))[1]
    assert encode_state_bytes(read, bytes_, new)[0] == encode_state(read)


def _blocks(items: list[bytes], cuts: list[int], sized: bool) -> bytes:
    """An Avro array split into blocks at ``cuts``, each with its byte size when ``sized`` (as the spec allows
    a writer to do; fastavro and streamrec write one block)."""
    out, start = [], 0
    for end in [*sorted({c % (len(items) + 1) for c in cuts}), len(items)]:
        block = items[start:end]
        if block:
            body = b"".join(block)
            head = avro_long(-len(block)) + avro_long(len(body)) if sized else avro_long(len(block))
            out.append(head + body)
        start = max(start, end)
    return b"".join([*out, b"\x00"])


@fast
@given(state=user_states, cuts=st.lists(st.integers(0, 64), max_size=4), sized=st.booleans())
def test_a_state_another_writer_split_into_blocks_reads_the_same(
    state: UserState, cuts: list[int], sized: bool
) -> None:
    history = [
        avro_long(int(h.kind)) + avro_optional(h.item_id) + avro_optional(h.query) + avro_long(h.timestamp)
        for h in state.history
    ]
    data = b"".join(
        [
            avro_string(state.user_id),
            _blocks(history, cuts, sized),
            _blocks([avro_string(p) for p in state.purchased], cuts, sized),
            _blocks([avro_long(x) for x in state.seen_event_ids], cuts, sized),
            *(avro_long(n) for n in (state.clicks, state.searches, state.purchases)),
            avro_optional(state.last_event_id),
            avro_long(state.last_event_time),
        ]
    )
    # a state written before abuse control ends there: the worker's reader gives those fields their defaults
    assert decode_state_bytes(data)[0] == replace(
        state, rate_tat=0, fast_streak=0, repeat_item=None, repeat_count=0, flagged=None, flagged_at=0
    )
    data += b"".join(
        [
            *(avro_long(n) for n in (state.rate_tat, state.fast_streak)),
            avro_optional(state.repeat_item),
            avro_long(state.repeat_count),
            avro_optional(state.flagged),
            avro_long(state.flagged_at),
        ]
    )
    read, parts = decode_state_bytes(data)
    assert read == decode_state(data) == state
    # Written back, it is in streamrec's own form (one block per array, no sizes)
    assert encode_state_bytes(read, parts, 0)[0] == encode_state(state)


# --- schema evolution ------------------------------------------------------------------------------------


def with_campaign(schema: RecordSchema) -> RecordSchema:
    """The next version of a schema: one added optional field, as a backend release would add it."""
    definition = copy.deepcopy(schema.definition)
    definition["fields"].append({"name": "campaign", "type": ["null", "string"], "default": None})
    return make_schema(definition)


@fast
@given(event=events(), campaign=maybe_text)
def test_a_newer_writer_decodes_in_an_older_reader_through_the_resolver(
    event: Event, campaign: str | None
) -> None:
    newer = with_campaign(BUNDLED[event.schema_name])
    writer = AvroCodec({**BUNDLED, event.schema_name: newer})
    data = writer.encode(event.schema_name, {**event.to_avro(), "campaign": campaign})

    with pytest.raises(DecodeError) as unknown:
        AvroCodec(resolver=NO_SCHEMA).decode(data)
    assert unknown.value.reason == "unknown_schema"

    asked: list[bytes] = []
    reader = AvroCodec(resolver=lambda fp: asked.append(fp) or {newer.fingerprint: newer.json}.get(fp))
    name, record = reader.decode(data)
    assert "campaign" not in record
    assert Event.from_avro(name, record) == event
    reader.decode(data)
    assert asked == [newer.fingerprint]  # learnt once, not asked per record


@fast
@given(event=events())
def test_an_older_writer_decodes_in_a_newer_reader_with_the_default(event: Event) -> None:
    older = BUNDLED[event.schema_name]
    newer = with_campaign(older)
    data = AvroCodec().encode(event.schema_name, event.to_avro())
    reader = AvroCodec({**BUNDLED, event.schema_name: newer}, resolver={older.fingerprint: older.json}.get)
    name, record = reader.decode(data)
    assert record["campaign"] is None
    assert Event.from_avro(name, record) == event


@fast
@given(event=events(), campaign=maybe_text)
def test_evolution_through_the_registry_both_ways(event: Event, campaign: str | None) -> None:
    url = f"mock://{uuid.uuid4().hex}"
    newer = with_campaign(BUNDLED[event.schema_name])
    new_side = registry_codec({**BUNDLED, event.schema_name: newer}, url)
    old_side = registry_codec(None, url)

    name, record = old_side.decode(
        new_side.encode(event.schema_name, {**event.to_avro(), "campaign": campaign})
    )
    assert "campaign" not in record and Event.from_avro(name, record) == event

    name, record = new_side.decode(old_side.encode(event.schema_name, event.to_avro()))
    assert record["campaign"] is None and Event.from_avro(name, record) == event


def test_the_registry_codec_also_reads_single_object_records() -> None:
    item = CatalogItem("i-1", "Rose Serum", price=12.5)
    data = AvroCodec().encode("CatalogItem", item.to_avro())
    assert data[:2] == b"\xc3\x01"
    _, record = CATALOG_REGISTRY.decode(data)
    assert CatalogItem.from_avro(record) == item
    framed = CATALOG_REGISTRY.encode("CatalogItem", item.to_avro())
    assert framed[:1] == b"\x00" and framed[5:] == data[10:]  # same Avro body, other framing


CATALOG_REGISTRY = registry_codec()


# --- corrupt and truncated input -------------------------------------------------------------------------

DECODE_REASONS = {"undecodable", "unknown_schema"}


def decodes_or_rejects(codec: AvroCodec, data: bytes) -> DecodeError | None:
    """Decode; the only failure allowed is a DecodeError with a dead-letter reason."""
    try:
        codec.decode(data)
    except DecodeError as exc:
        assert exc.reason in DECODE_REASONS
        return exc
    return None


def encoded_samples() -> st.SearchStrategy[tuple[str, bytes]]:
    """A valid record of any type, encoded by either codec, tagged with the codec's name."""

    def encode(codec_name: str, value: Any) -> tuple[str, bytes]:
        codec = CODECS[codec_name]
        if isinstance(value, Event):
            return codec_name, codec.encode(value.schema_name, value.to_avro())
        if isinstance(value, UserState):
            return codec_name, codec.encode("UserState", state_to_avro(value))
        return codec_name, codec.encode(type(value).__name__, value.to_avro())

    return st.builds(
        encode,
        st.sampled_from(sorted(CODECS)),
        st.one_of(events(), catalog_items, recommendations, user_states),
    )


@codec_names
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_decode_error(codec_name: str, data: bytes) -> None:
    decodes_or_rejects(CODECS[codec_name], data)


@codec_names
@settings(max_examples=300, deadline=None)
@given(schema=st.sampled_from(sorted(BUNDLED)), body=st.binary(max_size=200))
def test_a_known_header_with_a_garbage_body_is_rejected_cleanly(
    codec_name: str, schema: str, body: bytes
) -> None:
    codec = CODECS[codec_name]
    if isinstance(codec, RegistryCodec):
        header = registry_header(codec.schema_id(BUNDLED[schema]))
    else:
        header = b"\xc3\x01" + BUNDLED[schema].fingerprint
    decodes_or_rejects(codec, header + body)


@settings(max_examples=200, deadline=None)
@given(sample=encoded_samples(), data=st.data())
def test_truncated_records_are_undecodable(sample: tuple[str, bytes], data: st.DataObject) -> None:
    codec_name, encoded = sample
    cut = data.draw(st.integers(0, len(encoded) - 1))
    error = decodes_or_rejects(CODECS[codec_name], encoded[:cut])
    assert error is not None, "a strict prefix of a record must not decode"


@settings(max_examples=200, deadline=None)
@given(sample=encoded_samples(), extra=st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_undecodable(sample: tuple[str, bytes], extra: bytes) -> None:
    codec_name, encoded = sample
    error = decodes_or_rejects(CODECS[codec_name], encoded + extra)
    assert error is not None and error.reason == "undecodable"


@settings(max_examples=300, deadline=None)
@given(sample=encoded_samples(), data=st.data())
def test_flipped_bytes_decode_or_raise_decode_error(sample: tuple[str, bytes], data: st.DataObject) -> None:
    codec_name, encoded = sample
    corrupt = bytearray(encoded)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(corrupt) - 1))
        corrupt[position] ^= data.draw(st.integers(1, 255))
    decodes_or_rejects(CODECS[codec_name], bytes(corrupt))


# --- encoding rejects what does not match ----------------------------------------------------------------

wrong_values = st.one_of(st.none(), st.text(max_size=5), st.integers(2**63, 2**80), st.binary(max_size=5))


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(["event_id", "user_id", "timestamp", "item_id"]), value=wrong_values)
def test_encoding_a_mismatched_field_raises_encode_error(field: str, value: Any) -> None:
    record: dict[str, Any] = {"event_id": "e", "user_id": "u", "timestamp": 1, "item_id": "i"}
    expected_type = str if field != "timestamp" else int
    assume(not isinstance(value, expected_type) or (expected_type is int and value >= 2**63))  # a mismatch
    record[field] = value
    for codec in CODECS.values():
        with pytest.raises(EncodeError):
            codec.encode("ClickEvent", record)


# --- the hand-written reader of the worker's hot path ------------------------------------------------------


def test_the_hot_schemas_are_read_by_hand() -> None:
    """The events topic's records, and the recommendations and states the API's view reads, take the
    hand-written path; records with booleans or wider unions do not."""
    for name in (*EVENT_SCHEMAS, "UserDeletion", "Recommendation", "UserState", "FineTuneTrigger"):
        assert BUNDLED[name].plan is not None, name
    for name in ("CatalogItem", "DeadLetter", "ModelUpdate"):
        assert BUNDLED[name].plan is None, name


def _fastavro_body(name: str, body: bytes) -> dict[str, Any] | None:
    buf = io.BytesIO(body)
    try:
        record = fastavro.schemaless_reader(buf, BUNDLED[name].parsed, None)
    except Exception:
        return None
    return record if buf.tell() == len(body) else None


def _hand_body(name: str, body: bytes) -> dict[str, Any] | None:
    try:
        return read_record(BUNDLED[name], body)
    except DecodeError:
        return None


@fast
@given(event=events())
def test_the_hand_reader_reads_every_event_as_fastavro_does(event: Event) -> None:
    body = AvroCodec().encode(event.schema_name, event.to_avro())[HEADER_LEN:]
    assert _hand_body(event.schema_name, body) == _fastavro_body(event.schema_name, body) is not None


@settings(max_examples=400, deadline=None)
@given(event=events(), data=st.data())
def test_what_the_hand_reader_accepts_fastavro_reads_the_same(event: Event, data: st.DataObject) -> None:
    """Corrupt bodies: the hand reader may refuse more than fastavro (varints over 10 bytes), never less,
    and never reads a different record."""
    body = bytearray(AvroCodec().encode(event.schema_name, event.to_avro())[HEADER_LEN:])
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(body) - 1))
        body[position] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(body)))
    hand = _hand_body(event.schema_name, bytes(body[:cut]))
    if hand is not None:
        assert hand == _fastavro_body(event.schema_name, bytes(body[:cut]))


def _body_of(value: Recommendation | UserState) -> tuple[str, bytes]:
    if isinstance(value, UserState):
        return "UserState", AvroCodec().encode("UserState", state_to_avro(value))[HEADER_LEN:]
    return "Recommendation", AvroCodec().encode("Recommendation", value.to_avro())[HEADER_LEN:]


@fast
@given(value=st.one_of(recommendations, user_states))
def test_the_hand_reader_reads_arrays_and_floats_as_fastavro_does(value: Recommendation | UserState) -> None:
    name, body = _body_of(value)
    assert _hand_body(name, body) == _fastavro_body(name, body) is not None


@fast
@given(rec=recommendations, cuts=st.lists(st.integers(0, 12), max_size=4), sized=st.booleans())
def test_the_hand_reader_reads_an_array_another_writer_split_into_blocks(
    rec: Recommendation, cuts: list[int], sized: bool
) -> None:
    one_block = AvroCodec().encode("Recommendation", rec.to_avro())[HEADER_LEN:]
    head = avro_string(rec.user_id)
    items = [
        avro_string(i.item_id)
        + struct.pack("<f", i.score)
        + avro_string(i.reason)
        + avro_string(i.explanation)
        + avro_optional(i.anchor)
        for i in rec.items
    ]
    tail = one_block[len(head) + len(avro_long(len(items))) * bool(items) + sum(map(len, items)) + 1 :]
    body = head + _blocks(items, cuts, sized) + tail
    assert _hand_body("Recommendation", body) == _fastavro_body("Recommendation", one_block)


@settings(max_examples=200, deadline=None)
@given(value=st.one_of(recommendations, user_states), data=st.data())
def test_what_the_hand_reader_accepts_of_a_corrupt_array_fastavro_reads_the_same(
    value: Recommendation | UserState, data: st.DataObject
) -> None:
    name, clean = _body_of(value)
    body = bytearray(clean)
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(body) - 1))
        body[position] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(body)))
    hand = _hand_body(name, bytes(body[:cut]))
    if hand is not None:
        assert hand == _fastavro_body(name, bytes(body[:cut]))


def _click_body(
    timestamp: bytes = avro_long(1), session: bytes = b"\x00", event_id: bytes = b"\x02e"
) -> bytes:
    return event_id + avro_string("u") + timestamp + session + avro_string("i") + b"\x00"


@pytest.mark.parametrize(
    "body",
    [
        _click_body(),
        _click_body(session=b"\x02" + avro_string("s")),
        _click_body(session=b"\x04" + avro_string("s")),  # a union branch the schema does not have
        _click_body(timestamp=b"\xff" * 9 + b"\x01"),  # ten bytes: the smallest long
        _click_body(timestamp=b"\x80" * 9 + b"\x01"),
        _click_body(event_id=b"\x03e"),  # a negative length
        _click_body(event_id=b"\x04\xff\xfe"),  # not UTF-8
        _click_body(event_id=b"\x40e"),  # longer than the body
    ],
    ids=[
        "plain",
        "session",
        "branch-2",
        "ten-byte-largest",
        "ten-byte-min",
        "negative-length",
        "not-utf8",
        "overrun",
    ],
)
def test_the_hand_reader_accepts_and_refuses_as_fastavro_does(body: bytes) -> None:
    assert _hand_body("ClickEvent", body) == _fastavro_body("ClickEvent", body)


@pytest.mark.parametrize(
    "body",
    [
        _click_body(timestamp=b"\xff" * 10 + b"\x01"),
        _click_body(timestamp=b"\xff" * 9 + b"\x7f"),
        _click_body(session=b"\x01" + avro_string("s")),
    ],
    ids=["eleven-byte-long", "ten-byte-beyond-64-bits", "branch-minus-1"],
)
def test_the_hand_reader_refuses_what_fastavro_reads_by_accident(body: bytes) -> None:
    """fastavro wraps an 11-byte varint around, drops a tenth byte's bits beyond the 64th, and takes union
    branch -1 as the last branch (a Python index); no writer makes any of them (none is a long), so the
    hand reader dead-letters them."""
    assert _fastavro_body("ClickEvent", body) is not None
    assert _hand_body("ClickEvent", body) is None


@pytest.mark.parametrize("quantity", [2**31, -(2**31) - 1, 2**40])
def test_an_int_field_beyond_32_bits_is_undecodable(quantity: int) -> None:
    """An Avro int is 32 bits; fastavro reads a longer varint into an int field as it comes."""
    head = avro_string("e") + avro_string("u") + avro_long(1) + b"\x00" + avro_string("i")
    price, tail = struct.pack("<d", 1.0), b"\x00\x00"  # no currency, no context
    body = head + price + avro_long(quantity) + tail
    assert _fastavro_body("PurchaseEvent", body) is not None
    assert _hand_body("PurchaseEvent", body) is None
    inside = head + price + avro_long(2**31 - 1) + tail
    assert _hand_body("PurchaseEvent", inside) == _fastavro_body("PurchaseEvent", inside) is not None
