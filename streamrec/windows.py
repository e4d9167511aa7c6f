"""Users' histories as the encoder's input: each user's newest usable events as item indices and event kinds,
left-padded to one length, and the searches whose queries the batch embeds. This is the per-event loop of the
serving batch (streamrec.models.serving), plain typed code so that it compiles with the hot path
(streamrec/native.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from streamrec.records import EventKind, UserState

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
