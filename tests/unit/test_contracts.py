"""The contract a backend in another language implements from docs/contracts.md: each schema file alone,
fingerprints by the specification, the single-object framing, and records that an independent Avro
implementation (the Apache project's, for Python) writes and reads as streamrec does."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import avro.io
import avro.schema
import pytest

from streamrec.serde import HEADER_LEN, MAGIC, AvroCodec, bundled_schemas, plain_types

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = sorted((ROOT / "schemas").glob("*.avsc"))
CONTRACTS = (ROOT / "docs" / "contracts.md").read_text()

# What producers deployed before the schema files became self-contained and gained logical types computed:
# they must keep working, so these never change (a new version of a schema is a new file content with a new
# fingerprint, published on the schemas topic, and these stay decodable).
DEPLOYED = {
    "ClickEvent": "64599d14a297bb4d",
    "SearchEvent": "9647b43567b986d7",
    "PurchaseEvent": "07607aeb9bbd8a20",
    "UserDeletion": "34727350a522f2ca",
    "CatalogItem": "8754702ef846c240",
    "Recommendation": "4479d897ddb5b053",
}

EMPTY = 0xC15D213AA4D7A795  # the specification's CRC-64-AVRO


def crc64_avro(data: bytes) -> int:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
        table.append(fp)
    fp = EMPTY
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def apache(name: str) -> avro.schema.Schema:
    return avro.schema.parse((ROOT / "schemas" / f"{name}.avsc").read_text())


@pytest.mark.parametrize("path", SCHEMAS, ids=[p.stem for p in SCHEMAS])
def test_every_schema_file_loads_on_its_own(path: Path) -> None:
    parsed = avro.schema.parse(path.read_text())  # no other file: a missing named type would fail here
    assert parsed.fullname == f"streamrec.{path.stem}"


def test_every_timestamp_is_a_timestamp_millis_with_its_unit_documented() -> None:
    def walk(schema: Any, where: str) -> list[str]:
        found = []
        if isinstance(schema, dict):
            for field in schema.get("fields", []):
                kind = field["type"]
                name = field["name"]
                if name in (
                    "timestamp",
                    "updated_at",
                    "failed_at",
                    "created_at",
                    "promoted_at",
                ) or name.endswith("_time"):
                    ok = isinstance(kind, dict) and kind.get("logicalType") == "timestamp-millis"
                    ok = ok and "milliseconds since the Unix epoch, UTC" in field.get("doc", "")
                    found += [] if ok else [f"{where}.{name}"]
                for part in kind if isinstance(kind, list) else [kind]:
                    found += walk(part, f"{where}.{name}")
        return found

    internal = {"UserState"}  # the workers' own changelog value, read by no one else
    bad = [w for p in SCHEMAS if p.stem not in internal for w in walk(json.loads(p.read_text()), p.stem)]
    assert bad == []


@pytest.mark.parametrize("name", sorted(DEPLOYED))
def test_fingerprints_follow_the_specification_and_never_change(name: str) -> None:
    """CRC-64-AVRO of the Parsing Canonical Form (logical types left out), little-endian on the wire."""
    plain = avro.schema.parse(
        json.dumps(plain_types(json.loads((ROOT / "schemas" / f"{name}.avsc").read_text())))
    )
    expected = crc64_avro(plain.canonical_form.encode()).to_bytes(8, "little")
    assert bundled_schemas()[name].fingerprint == expected
    assert expected.hex() == DEPLOYED[name]
    assert f"| `{name}` | `{DEPLOYED[name]}` |" in CONTRACTS


def test_the_worked_example_in_the_contract_is_what_the_codec_writes() -> None:
    block = re.search(r"<!-- wire-example -->\n```\n(.*?)```", CONTRACTS, re.S)
    assert block is not None
    documented = bytes.fromhex("".join(line.split("#")[0] for line in block.group(1).splitlines()))
    record = {"event_id": "e1", "user_id": "u42", "timestamp": 1767225600000, "item_id": "sku-1"}
    assert AvroCodec().encode("ClickEvent", record) == documented


def _apache_body(name: str, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    avro.io.DatumWriter(apache(name)).write(record, avro.io.BinaryEncoder(out))
    return out.getvalue()


def _apache_read(name: str, body: bytes) -> dict[str, Any]:
    return avro.io.DatumReader(apache(name)).read(avro.io.BinaryDecoder(io.BytesIO(body)))


AT = datetime(2026, 1, 1, tzinfo=UTC)
AT_MS = 1767225600000


@pytest.mark.parametrize(
    ("name", "record", "ours"),
    [
        (
            "ClickEvent",
            {
                "event_id": "e1",
                "user_id": "u42",
                "timestamp": AT,
                "session_id": None,
                "item_id": "sku-1",
                "context": {"device": "mobile", "page": "search", "referrer": None, "locale": "en-GB"},
            },
            {"timestamp": AT_MS},
        ),
        (
            "PurchaseEvent",
            {
                "event_id": "e2",
                "user_id": "u42",
                "timestamp": AT,
                "session_id": "s1",
                "item_id": "sku-1",
                "price": 19.9,
                "quantity": 2,
                "currency": "EUR",
                "context": None,
            },
            {"timestamp": AT_MS},
        ),
        (
            "UserDeletion",
            {"event_id": "d1", "user_id": "u42", "timestamp": AT, "requested_by": "support"},
            {"timestamp": AT_MS},
        ),
        (
            "CatalogItem",
            {
                "item_id": "sku-1",
                "title": "Rose Serum",
                "category": "beauty",
                "price": 19.9,
                "in_stock": True,
                "description": None,
                "updated_at": AT,
            },
            {"updated_at": AT_MS},
        ),
    ],  # fmt: skip
    ids=["click", "purchase", "deletion", "catalogue"],
)
def test_records_written_by_the_apache_library_are_read_by_streamrec_and_back(
    name: str, record: dict[str, Any], ours: dict[str, int]
) -> None:
    codec = AvroCodec()
    body = _apache_body(name, record)
    framed = MAGIC + codec.schema(name).fingerprint + body
    decoded_name, decoded = codec.decode(framed)
    assert decoded_name == name and decoded == {**record, **ours}
    ours_encoded = codec.encode(name, decoded)
    assert ours_encoded[HEADER_LEN:] == body
    assert _apache_read(name, ours_encoded[HEADER_LEN:]) == record


def test_streamrecs_recommendations_and_dead_letters_are_read_by_the_apache_library() -> None:
    codec = AvroCodec()
    recommendation = {
        "user_id": "u42",
        "items": [
            {"item_id": "sku-1", "score": 0.5, "reason": "popular", "explanation": "Popular", "anchor": None}
        ],
        "model_version": "m1",
        "index_version": "m1.0",
        "cause_event_id": "e1",
        "event_time": AT_MS,
        "publish_time": AT_MS + 30,
        "mode": "live",
    }
    read = _apache_read("Recommendation", codec.encode("Recommendation", recommendation)[HEADER_LEN:])
    assert read["items"] == recommendation["items"] and read["event_time"] == AT
    letter = {
        "source_topic": "streamrec.events", "partition": 1, "offset": 7, "key": b"u42", "value": b"\x00",
        "reason": "undecodable", "detail": "x", "failed_at": AT_MS, "worker_id": "w", "key_size": None,
        "value_size": None,
    }  # fmt: skip
    assert _apache_read("DeadLetter", codec.encode("DeadLetter", letter)[HEADER_LEN:])["failed_at"] == AT
