"""The rules a record must keep to be applied: the worker dead-letters what breaks them, and the producer
client refuses it before sending (both call streamrec.validation)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrec.catalog import Catalog
from streamrec.dead_letters import DEAD_LETTER_OVERHEAD, KEY_COPY_BYTES, REASONS, dead_letter
from streamrec.records import CatalogItem, Event, EventKind
from streamrec.serde import AvroCodec
from streamrec.state import StateLimits, apply_event, encode_state, largest_state_bytes
from streamrec.validation import (
    AVRO_INT_MAX,
    Rejection,
    ValidationRules,
    id_problem,
    validate_deletion,
    validate_event,
    validate_item,
)

NOW = 1_800_000_000_000
RULES = ValidationRules(max_event_age_ms=86_400_000, max_clock_skew_ms=300_000)


def click(n: int, item: str = "known", user: str = "u1", ts: int = NOW) -> Event:
    return Event(event_id=f"e{n}", user_id=user, kind=EventKind.CLICK, timestamp=ts, item_id=item)


def reason(event: Event, rules: ValidationRules = RULES) -> str | None:
    catalog = Catalog()
    catalog.upsert(CatalogItem("known", "Known Item"))
    rejection = validate_event(event, NOW, rules, catalog.__contains__)
    return rejection.reason if rejection else None


def test_validation_reasons() -> None:
    assert reason(click(1)) is None
    assert reason(click(1, "nope")) == "unknown_item"
    assert reason(click(1, ts=NOW + 3_600_000)) == "absurd_timestamp"
    assert reason(click(1, ts=0)) == "absurd_timestamp"
    assert reason(click(1, user="")) == "invalid_record"
    assert reason(Event("e", "u", EventKind.SEARCH, NOW, query="  ")) == "invalid_record"
    assert reason(Event("e", "u", EventKind.PURCHASE, NOW, item_id="known", price=-1.0)) == "invalid_record"
    nan = Event("e", "u", EventKind.PURCHASE, NOW, item_id="known", price=float("nan"))
    assert reason(nan) == "invalid_record"
    none = Event("e", "u", EventKind.PURCHASE, NOW, item_id="known", price=2.0, quantity=0)
    assert reason(none) == "invalid_record"
    lenient = ValidationRules(RULES.max_event_age_ms, RULES.max_clock_skew_ms, reject_unknown_items=False)
    assert reason(click(1, "nope"), lenient) is None
    history = ValidationRules(None, RULES.max_clock_skew_ms)  # the backfill topic: no age limit
    assert reason(click(1, ts=0), history) is None
    assert reason(click(1, ts=NOW + 3_600_000), history) == "absurd_timestamp", "the future still is not"


@pytest.mark.parametrize(
    "user",
    ["   ", "\t", "\u3000", "user\x00", "user\n1", "us\x1fer", "user\x7f", "user\x85", "a\u2028b", "x" * 257],
    ids=[
        "spaces",
        "tab",
        "ideographic-space",
        "nul",
        "newline",
        "unit-sep",
        "del",
        "c1-nel",
        "line-sep",
        "long",
    ],
)
def test_blank_ids_control_characters_and_long_ids_are_invalid(user: str) -> None:
    assert reason(click(1, user=user)) == "invalid_record"
    assert reason(click(1, item=user)) == "invalid_record"
    assert reason(Event(user, "u", EventKind.CLICK, NOW, item_id="known")) == "invalid_record"
    assert reason(Event("e", "u", EventKind.CLICK, NOW, item_id="known", session_id=user)) == "invalid_record"


def test_limits_count_utf8_bytes_and_quote_little_of_the_value() -> None:
    assert id_problem("user_id", "ü" * 128, 256) is None  # 256 bytes
    problem = id_problem("user_id", "ü" * 129, 256)
    assert problem is not None and "258 bytes" in problem
    huge = id_problem("user_id", "\x00" + "x" * 1_000_000, 2_000_000)
    assert huge is not None and len(huge) < 200, "a detail never carries a megabyte"
    long_query = Event("e", "u", EventKind.SEARCH, NOW, query="q" * 1025)
    assert reason(long_query) == "invalid_record"
    assert reason(Event("e", "u", EventKind.SEARCH, NOW, query="q" * 1024)) is None


def test_a_quantity_beyond_an_avro_int_is_invalid() -> None:
    ok = Event("e", "u", EventKind.PURCHASE, NOW, item_id="known", price=2.0, quantity=AVRO_INT_MAX)
    assert reason(ok) is None
    over = Event("e", "u", EventKind.PURCHASE, NOW, item_id="known", price=2.0, quantity=AVRO_INT_MAX + 1)
    assert reason(over) == "invalid_record"


def test_deletions_need_valid_ids_and_a_time_not_in_the_future() -> None:
    def deletion(**fields: object) -> Rejection | None:
        return validate_deletion({"event_id": "d1", "user_id": "u1", "timestamp": NOW, **fields}, NOW, RULES)

    assert deletion() is None
    assert deletion(user_id=" ").reason == "invalid_record"  # type: ignore[union-attr]
    assert deletion(user_id="u\x00").reason == "invalid_record"  # type: ignore[union-attr]
    # one far ahead would refuse the user's own events until then
    assert deletion(timestamp=NOW + 86_400_000).reason == "absurd_timestamp"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (CatalogItem("sku-1", "Rose Serum", "beauty", 19.9, description="Line one.\nLine two."), None),
        (CatalogItem("sku-1", "Rose Serum", price=-10.0), "invalid_record"),
        (CatalogItem("sku-1", "Rose Serum", price=float("inf")), "invalid_record"),
        (CatalogItem("sku-1", "  "), "invalid_record"),
        (CatalogItem(" ", "Rose Serum"), "invalid_record"),
        (CatalogItem("sku\x00", "Rose Serum"), "invalid_record"),
        (CatalogItem("sku-1", "Rose\x1bSerum"), "invalid_record"),
        (CatalogItem("sku-1", "Rose Serum", description="x" * 20_000), "invalid_record"),
        (CatalogItem("sku-1", "Rose Serum", updated_at=-5), "invalid_record"),
        (CatalogItem("sku-1", "Rose Serum", updated_at=NOW + 86_400_000), "absurd_timestamp"),
    ],
    ids=[
        "ok",
        "negative-price",
        "infinite-price",
        "blank-title",
        "blank-id",
        "nul-id",
        "escape",
        "long",
        "negative-time",
        "future",
    ],
)
def test_catalogue_upserts_are_validated(item: CatalogItem, expected: str | None) -> None:
    rejection = validate_item(item, NOW, RULES)
    assert (rejection.reason if rejection else None) == expected


def test_every_reason_a_dead_letter_can_carry_is_explained() -> None:
    assert set(REASONS) >= {
        "undecodable", "unknown_schema", "incompatible_schema", "invalid_record", "unknown_item",
        "absurd_timestamp", "too_large", "wrong_key", "wrong_partition", "erased_user",
    }  # fmt: skip


@given(key=st.integers(0, 3_000_000), value=st.integers(0, 3_000_000))
def test_a_dead_letter_never_exceeds_the_record_limit_and_says_what_it_cut(key: int, value: int) -> None:
    limit = 1_000_000
    record = dead_letter("t", 0, 7, b"k" * key, b"v" * value, Rejection("too_large", "x"), "w", limit)
    encoded = AvroCodec().encode("DeadLetter", record)
    assert len(encoded) + len(record["key"]) <= limit
    assert record["key"] == b"k" * len(record["key"]) and record["value"] == b"v" * len(record["value"])
    if 2 * key + value <= limit - DEAD_LETTER_OVERHEAD:
        assert len(record["key"]) == key and len(record["value"]) == value
        assert record["key_size"] is None and record["value_size"] is None
    else:
        assert record["key_size"] in (None, key) and record["value_size"] in (None, value)
        assert record["key_size"] is not None or record["value_size"] is not None
        assert "cut to its first" in record["detail"]
        if key > KEY_COPY_BYTES:
            assert len(record["key"]) == KEY_COPY_BYTES


def test_the_largest_state_the_limits_allow_is_bounded_by_largest_state_bytes() -> None:
    limits = StateLimits(history_length=5, max_purchased=4, dedupe_window=8)
    state = None
    for n in range(12):
        kind = EventKind.SEARCH if n % 3 == 0 else EventKind.PURCHASE
        event = Event(
            event_id=f"{n:0>256}",
            user_id="u" * 256,
            kind=kind,
            timestamp=2**62 + n,
            item_id=None if kind is EventKind.SEARCH else f"{n:x>256}",
            query="q" * 1024 if kind is EventKind.SEARCH else None,
            price=1.0,
        )
        state, _ = apply_event(state, event, limits)
    assert state is not None
    assert len(encode_state(state)) <= largest_state_bytes(limits, 256, 1024)


def test_the_contract_reference_explains_every_dead_letter_reason() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "contracts.md").read_text()
    assert [r for r in REASONS if f"| `{r}` |" not in text] == []
