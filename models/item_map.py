"""A model's item indices without the model: which catalogue item is index i, what ranking reads of a batch's
user states (``RankInputs``) and what it gives (``RankedArrays``). ``Recommender`` keeps an item map beside
its encoder; a worker whose ranking runs in a child process (``STREAMREC_RANKING_PROCESS``) keeps only this,
in step with the child's, and so loads neither torch nor the model. No torch import here, for that reason."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from streamrec.records import CatalogItem, RankedBatch, Reason, RecommendedItem, UserState
from streamrec.windows import Windows, windows, windows_from_bytes

# Newest events fed to the encoder at serve time: cost grows with the window, quality saturates.
DEFAULT_SERVE_LEN = 16


def model_serve_len(metadata: dict, max_len: int, asked: int | None = None) -> int:
    """The newest events per user that a model is served with: ``asked``, else the window its training
    chose (metadata ``serve_len``; a model written before it had one: ``DEFAULT_SERVE_LEN``), at most its
    trained ``max_len``."""
    chosen = asked if asked is not None else int(metadata.get("serve_len", DEFAULT_SERVE_LEN))
    return max(1, min(chosen, max_len))


# The served encoder's precision (``serving.resolve_precision``); here, where no torch is imported.
Precision = Literal["auto", "float32", "bfloat16"]

_NOTHING: set[int] = set()  # shared: never modified


class RankInputs(NamedTuple):
    """What ranking reads of a batch's user states, taken at once (``ItemMap.inputs``): ranking them
    needs the states no more, so they may change meanwhile or live in another process."""

    warm: list[int]  # rows of the users with a history the model knows
    items: np.ndarray  # (warm users, L) item indices, left-padded, newest last
    kinds: np.ndarray
    qids: np.ndarray  # query id j is queries[j - 1]
    queries: list[str]
    excluded: list[set[int]]  # per user: item indices not to recommend (bought)
    seconds: float = 0.0  # how long taking them took


class RankedArrays(NamedTuple):
    """A batch's top-k as the ranking leaves it, in arrays (what a ranking process sends back); ``batch``
    makes the per-user lists the worker writes its records from."""

    users: int
    warm: list[int]  # as in RankInputs: rows j of the arrays are users warm[j]
    counts: list[int]  # per warm row: how many of its k picks are real (they come first)
    picked: np.ndarray  # (warm users, k) item indices, best first
    scores: np.ndarray
    codes: np.ndarray  # reason codes, keys of reasons
    reasons: dict[int, Reason]
    fills: list[list[RecommendedItem]]  # per user: the popularity fill of a short or cold row

    def batch(self, item_ids: list[str]) -> RankedBatch:
        """Row u is users[u]; item index i is item_ids[i - 1]."""
        empty: list[int] = []
        picked: list[list[int]] = [empty] * self.users
        scores: list[list[float]] = [[]] * self.users
        codes: list[list[int]] = [empty] * self.users
        rows = zip(
            self.warm,
            self.counts,
            self.picked.tolist(),
            self.scores.tolist(),
            self.codes.tolist(),
            strict=True,
        )
        for u, n, p, s, c in rows:
            picked[u], scores[u], codes[u] = p[:n], s[:n], c[:n]
        return RankedBatch(item_ids, picked, scores, codes, self.reasons, self.fills)


def merge_ranked(parts: list[RankedArrays]) -> RankedArrays:
    """One batch's arrays from those of its consecutive slices of users, ranked apart (by several ranking
    processes): users and rows follow on, and each part's reason codes are numbered anew, because a code
    means its reason within its own part only (a search's code names a query of that part's table)."""
    if len(parts) == 1:
        return parts[0]
    users = 0
    warm: list[int] = []
    counts: list[int] = []
    fills: list[list[RecommendedItem]] = []
    codes: list[np.ndarray] = []
    reasons: dict[int, Reason] = {}
    for part in parts:
        warm += [u + users for u in part.warm]
        counts += part.counts
        fills += part.fills
        keys = sorted(part.reasons)  # every code in the part's arrays is one of them
        if keys:
            found = np.searchsorted(np.asarray(keys, dtype=np.int64), part.codes)
            codes.append(np.minimum(found, len(keys) - 1) + len(reasons))
            reasons.update({len(reasons) + j: part.reasons[key] for j, key in enumerate(keys)})
        else:
            codes.append(np.zeros_like(part.codes))
        users += part.users
    return RankedArrays(
        users,
        warm,
        counts,
        np.concatenate([p.picked for p in parts]),
        np.concatenate([p.scores for p in parts]),
        np.concatenate(codes),
        reasons,
        fills,
    )


class ItemMap:
    """Item index i is ``ids[i - 1]`` (0 is padding). New catalogue items are appended in the order
    ``unknown`` gives them, so two maps that see the same upserts give every item the same index. Not
    thread-safe: its owner locks around ``add`` and ``inputs``."""

    def __init__(self, ids: list[str], serve_len: int, model_version: str, index_version: str) -> None:
        self.ids = list(ids)
        self.index_of = {item_id: i + 1 for i, item_id in enumerate(self.ids)}
        self.serve_len = serve_len
        self.model_version = model_version
        self._base_index_version = index_version
        self.index_version = index_version
        self._upserts = 0

    @classmethod
    def load(cls, model_dir: Path, serve_len: int | None = None) -> ItemMap:
        """The item map of a model directory (see ``models/artifacts.py``), read without loading the model."""
        directory = Path(model_dir)
        config = json.loads((directory / "config.json").read_text())
        metadata = json.loads((directory / "metadata.json").read_text())
        index = json.loads((directory / "index.json").read_text())
        ids = json.loads((directory / "items.json").read_text())["ids"]
        return cls(
            ids,
            model_serve_len(metadata, int(config["encoder"]["max_len"]), serve_len),
            str(metadata.get("version", "unversioned")),
            str(index["index_version"]),
        )

    def unknown(self, items: list[CatalogItem]) -> list[CatalogItem]:
        """The items of an upsert batch not in the map, each once (its last write), in order of first
        appearance."""
        fresh: dict[str, CatalogItem] = {}
        for item in items:
            if item.item_id not in self.index_of:
                fresh[item.item_id] = item
        return list(fresh.values())

    def add(self, fresh: list[CatalogItem]) -> list[bool]:
        """Append the items of ``unknown``'s answer that are still unknown (another upsert may have added
        some since); one upsert more in ``index_version``. Per item, whether it was appended."""
        added = [item.item_id not in self.index_of for item in fresh]
        for item, new in zip(fresh, added, strict=True):
            if new:
                self.ids.append(item.item_id)
                self.index_of[item.item_id] = len(self.ids)
        self._upserts += 1
        self.index_version = f"{self._base_index_version}+{self._upserts}"
        return added

    def upsert(self, items: list[CatalogItem]) -> None:
        """``add`` the unknown items of an upsert batch, as a ``Recommender`` does."""
        self.add(self.unknown(items))

    def inputs(self, users: list[UserState]) -> RankInputs:
        """Everything ranking reads of the users' states, row u being users[u]: the serving windows (warm
        rows, items, kinds, query ids, queries; each array (warm users, L), left-padded, newest event last;
        query id j is queries[j - 1], sorted, so a batch embeds its queries in one call in a fixed order)
        and the items each user bought."""
        started = time.perf_counter()
        batch = windows(users, self.index_of, self.serve_len)
        return self._inputs(batch, [self._excluded(u.purchased) for u in users], started)

    def inputs_from_bytes(self, states: list[bytes]) -> RankInputs:
        """``inputs`` of the users whose states are encoded in ``states`` (``encode_state_bytes``, what the
        worker writes to its changelog), read from the bytes without decoding the states."""
        started = time.perf_counter()
        batch, purchased = windows_from_bytes(states, self.index_of, self.serve_len)
        return self._inputs(batch, [self._excluded(p) for p in purchased], started)

    def _inputs(self, batch: Windows, excluded: list[set[int]], started: float) -> RankInputs:
        shape = (len(batch.rows), batch.length)
        item_arr = np.array(batch.items, dtype=np.int64).reshape(shape)
        kind_arr = np.array(batch.kinds, dtype=np.int64).reshape(shape)
        qid_arr = np.zeros(shape, dtype=np.int64)
        searches = batch.searches
        queries = sorted({q for _, _, q in searches})
        if searches:
            qindex = {q: j + 1 for j, q in enumerate(queries)}
            rows, cols, qids = zip(*searches, strict=True)
            qid_arr[list(rows), list(cols)] = [qindex[q] for q in qids]
        return RankInputs(
            batch.rows, item_arr, kind_arr, qid_arr, queries, excluded, time.perf_counter() - started
        )

    def _excluded(self, purchased: list[str]) -> set[int]:
        if not purchased:
            return _NOTHING
        index_of = self.index_of
        return {index_of[p] for p in purchased if p in index_of}


class ServesItemMap:
    """What a ranker says of its model through its item map: the versions its recommendations carry and
    which item is index i."""

    _items: ItemMap

    @property
    def model_version(self) -> str:
        return self._items.model_version

    @property
    def index_version(self) -> str:
        """The model's index version, and how many catalogue upserts it has had since (``v+3``)."""
        return self._items.index_version

    @property
    def item_ids(self) -> list[str]:
        """Item index i is item_ids[i - 1] (0 is padding); it grows with upserts."""
        return self._items.ids

    @property
    def serve_len(self) -> int:
        return self._items.serve_len
