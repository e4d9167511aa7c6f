"""The encoder's input windows of a batch of users, against a plain per-user reference."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from streamrec import windows as windows_module
from streamrec.models.data import PAD
from streamrec.records import EventKind, HistoryEntry, UserState
from streamrec.state import encode_state
from streamrec.windows import windows, windows_from_bytes

H = HistoryEntry
KNOWN = {f"i{j}": j + 1 for j in range(6)}

entries = st.one_of(
    st.builds(
        H,
        st.sampled_from([EventKind.CLICK, EventKind.PURCHASE]),
        st.integers(0, 9),
        st.sampled_from([*KNOWN, "new"]),
    ),
    st.builds(H, st.just(EventKind.CLICK), st.integers(0, 9), st.none()),
    st.builds(
        H, st.just(EventKind.SEARCH), st.integers(0, 9), st.none(), st.sampled_from([None, "", "tea", "mug"])
    ),
)
users = st.lists(
    st.builds(UserState, user_id=st.just("u"), history=st.lists(entries, max_size=12)), max_size=6
)


def reference(batch: list[UserState], limit: int) -> list[tuple[int, list[tuple[int, int, str | None]]]]:
    """Per warm user: (its index, its window oldest first as (item, kind, query))."""
    out = []
    for u, user in enumerate(batch):
        usable = [
            (PAD, int(e.kind), e.query)
            if e.kind is EventKind.SEARCH
            else (KNOWN[e.item_id], int(e.kind), None)
            for e in user.history
            if (e.kind is EventKind.SEARCH and e.query)
            or (e.kind is not EventKind.SEARCH and e.item_id in KNOWN)
        ]
        if usable:
            out.append((u, usable[-limit:]))
    return out


@given(batch=users, limit=st.integers(1, 8))
@example(batch=[UserState("u", [H(EventKind.CLICK, 0, "new"), H(EventKind.SEARCH, 1, None, "")])], limit=3)
def test_windows_are_each_users_newest_usable_events_left_padded(batch: list[UserState], limit: int) -> None:
    got = windows(batch, KNOWN, limit)
    want = reference(batch, limit)
    assert got.rows == [u for u, _ in want]
    assert got.length == max([1, *(len(w) for _, w in want)])
    queries = {}
    for r, (_, window) in enumerate(want):
        row = slice(r * got.length, (r + 1) * got.length)
        pad = [PAD] * (got.length - len(window))
        assert got.items[row] == pad + [item for item, _, _ in window]
        assert got.kinds[row] == pad + [kind for _, kind, _ in window]
        for j, (_, _, query) in enumerate(window, start=len(pad)):
            if query is not None:
                queries[(r, j)] = query
    assert {(r, j): q for r, j, q in got.searches} == queries
    assert len(got.searches) == len(queries)


def test_its_codes_are_the_event_kinds_and_padding_of_the_models() -> None:
    assert windows_module.PAD == PAD
    assert int(EventKind.CLICK) == windows_module._CLICK_CODE
    assert int(EventKind.SEARCH) == windows_module._SEARCH_CODE
    assert int(EventKind.PURCHASE) == windows_module._PURCHASE_CODE


stored_users = st.lists(
    st.builds(
        UserState,
        user_id=st.sampled_from(["u", "ü-1", "x" * 200]),  # a multi-byte and a two-byte-length id
        history=st.lists(entries, max_size=60),
        purchased=st.lists(st.sampled_from([*KNOWN, "new", "é"]), max_size=5),
        seen_event_ids=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=64),
        clicks=st.integers(0, 10**6),
    ),
    max_size=6,
)


@given(batch=stored_users, limit=st.integers(1, 20))
def test_windows_read_from_the_stored_bytes_are_the_states_windows(
    batch: list[UserState], limit: int
) -> None:
    # A ranking process reads the windows and purchases from the bytes the worker stores (its changelog
    # values), without decoding the states: the same input as from the states themselves.
    got, purchased = windows_from_bytes([encode_state(u) for u in batch], KNOWN, limit)
    assert got == windows(batch, KNOWN, limit)
    assert purchased == [u.purchased for u in batch]
