"""Users' histories as the encoder's input: each user's newest usable events as item indices and event kinds,
left-padded to one length, and the searches whose queries the batch embeds. This is the per-event loop of the
serving batch (streamrec.models.serving), plain typed code so that it compiles with the hot path
(streamrec/native.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from streamrec.records import EventKind, UserState
from streamrec.state import read_block, read_long, read_optional, read_string

PAD: Final = 0  # the item index of padding and of a search's position (streamrec.models.data.PAD)
_SEARCH: Final = EventKind.SEARCH
_PURCHASE: Final = EventKind.PURCHASE
# Read once here: an enum member's value is slow to read per event.
_CLICK_CODE: Final = int(EventKind.CLICK)
_SEARCH_CODE: Final = int(EventKind.SEARCH)
_PURCHASE_CODE: Final = int(EventKind.PURCHASE)


@dataclass(slots=True)
class Windows:
    """A batch's encoder input. ``items`` and ``kinds`` are row-major (len(rows), length) tables; row r is
    users[rows[r]] (users with no usable event have no row). ``searches`` are (row, position, query), the
    position counted in the padded row."""

    rows: list[int]
    length: int
    items: list[int]
    kinds: list[int]
    searches: list[tuple[int, int, str]]


def windows(users: list[UserState], index_of: dict[str, int], limit: int) -> Windows:
    """Each user's newest ``limit`` usable events, oldest first: an item the model knows (its index, kind
    click or purchase) or a search with a query (PAD, kind search). Other events are skipped and the window
    reaches further back instead."""
    rows: list[int] = []
    row_items: list[list[int]] = []
    row_kinds: list[list[int]] = []
    back: list[tuple[int, int, str]] = []  # (row, steps back from the newest, query)
    for u, user in enumerate(users):
        history = user.history
        items: list[int] = []
        kinds: list[int] = []
        i = len(history) - 1
        while i >= 0 and len(items) < limit:
            entry = history[i]
            i -= 1
            kind = entry.kind
            if kind is _SEARCH:
                query = entry.query
                if query:
                    back.append((len(rows), len(items), query))
                    items.append(PAD)
                    kinds.append(_SEARCH_CODE)
            else:
                item_id = entry.item_id
                if item_id is not None:
                    idx = index_of.get(item_id, -1)
                    if idx >= 0:
                        items.append(idx)
                        kinds.append(_PURCHASE_CODE if kind is _PURCHASE else _CLICK_CODE)
        if items:
            rows.append(u)
            row_items.append(items)
            row_kinds.append(kinds)
    return _assemble(rows, row_items, row_kinds, back)


def windows_from_bytes(
    datas: list[bytes], index_of: dict[str, int], limit: int
) -> tuple[Windows, list[list[str]]]:
    """``windows`` of the states encoded in ``datas`` (``encode_state_bytes``), and each one's purchased
    items, read straight from the bytes: what a ranking process does with the states the worker has just
    encoded for its changelog. The history entries are only stepped over, and those the window takes
    decoded, newest first; the seen event ids and the counters after the purchased list are not read."""
    rows: list[int] = []
    row_items: list[list[int]] = []
    row_kinds: list[list[int]] = []
    back: list[tuple[int, int, str]] = []
    purchased_lists: list[list[str]] = []
    for u, data in enumerate(datas):
        size, pos = read_long(data, 0)
        pos += size  # the user id
        starts: list[int] = []
        count, pos = read_block(data, pos)
        while count:
            for _ in range(count):
                starts.append(pos)
                pos = _skip_long(data, pos)  # kind
                pos = _skip_optional(data, pos)  # item id
                pos = _skip_optional(data, pos)  # query
                pos = _skip_long(data, pos)  # timestamp
            count, pos = read_block(data, pos)
        purchased: list[str] = []
        count, pos = read_block(data, pos)
        while count:
            for _ in range(count):
                item_id, pos = read_string(data, pos)
                purchased.append(item_id)
            count, pos = read_block(data, pos)
        purchased_lists.append(purchased)
        items: list[int] = []
        kinds: list[int] = []
        i = len(starts) - 1
        while i >= 0 and len(items) < limit:
            kind, at = read_long(data, starts[i])
            i -= 1
            if kind == _SEARCH_CODE:
                query, _ = read_optional(data, _skip_optional(data, at))
                if query:
                    back.append((len(rows), len(items), query))
                    items.append(PAD)
                    kinds.append(_SEARCH_CODE)
            else:
                entry_item, _ = read_optional(data, at)
                if entry_item is not None:
                    idx = index_of.get(entry_item, -1)
                    if idx >= 0:
                        items.append(idx)
                        kinds.append(_PURCHASE_CODE if kind == _PURCHASE_CODE else _CLICK_CODE)
        if items:
            rows.append(u)
            row_items.append(items)
            row_kinds.append(kinds)
    return _assemble(rows, row_items, row_kinds, back), purchased_lists


def _skip_long(buf: bytes, pos: int) -> int:
    while buf[pos] & 0x80:
        pos += 1
    return pos + 1


def _skip_optional(buf: bytes, pos: int) -> int:
    if buf[pos] == 0:
        return pos + 1
    size, pos = read_long(buf, pos + 1)
    return pos + size


def _assemble(
    rows: list[int], row_items: list[list[int]], row_kinds: list[list[int]], back: list[tuple[int, int, str]]
) -> Windows:
    """The rows, each collected newest first, left-padded to one length in row-major tables."""
    length = 1
    for items in row_items:
        if len(items) > length:
            length = len(items)
    flat_items: list[int] = []
    flat_kinds: list[int] = []
    for r in range(len(rows)):
        items = row_items[r]
        kinds = row_kinds[r]
        pad = length - len(items)
        for _ in range(pad):
            flat_items.append(PAD)
            flat_kinds.append(PAD)
        for j in range(len(items) - 1, -1, -1):  # collected newest first
            flat_items.append(items[j])
            flat_kinds.append(kinds[j])
    searches = [(row, length - 1 - steps, query) for row, steps, query in back]
    return Windows(rows, length, flat_items, flat_kinds, searches)
