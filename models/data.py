"""Interaction data for training and evaluation: readers for the ../shared/data formats and streamrec's native
events/catalog format, an item vocabulary, and the leave-one-out split."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

from streamrec.records import CatalogItem, EventKind

PAD = 0  # item index 0 is padding; real items are 1..num_items


@dataclass(slots=True)
class Step:
    """One history element as the encoder sees it: an item event (item > 0) or a search (query set)."""

    kind: int
    item: int = PAD
    query: str | None = None


@dataclass
class Interactions:
    """Users' time-ordered histories over an item vocabulary, with optional item content."""

    item_ids: list[str]  # item_ids[i - 1] is the id of item index i
    sequences: dict[str, list[Step]]
    titles: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # item id -> content text for the text embedder
    attributes: dict[str, list[int]] = field(default_factory=dict)  # item id -> attribute ids (1-based)
    catalog: dict[str, CatalogItem] = field(default_factory=dict)
    fingerprint: str = ""
    window: tuple[int, int] | None = None  # first/last event timestamp (ms), where known
    source: str = ""

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_attributes(self) -> int:
        return max((max(a) for a in self.attributes.values() if a), default=0)

    def index_of(self) -> dict[str, int]:
        return {item_id: i + 1 for i, item_id in enumerate(self.item_ids)}


@dataclass
class Split:
    """Leave-one-out: per user, the training prefix and the (input, target) pairs for validation and test."""

    train: dict[str, list[Step]]
    valid: dict[str, tuple[list[Step], int]]
    test: dict[str, tuple[list[Step], int]]


def leave_one_out(sequences: dict[str, list[Step]]) -> Split:
    """The last item event is the test target, the second-last the validation target, the rest is training.

    Searches are context, never targets. Users with fewer than three item events only train (as SASRec does).
    """
    train: dict[str, list[Step]] = {}
    valid: dict[str, tuple[list[Step], int]] = {}
    test: dict[str, tuple[list[Step], int]] = {}
    for user, steps in sequences.items():
        item_pos = [i for i, s in enumerate(steps) if s.item != PAD]
        if len(item_pos) < 3:
            train[user] = steps
            continue
        v, t = item_pos[-2], item_pos[-1]
        train[user] = steps[:v]
        valid[user] = (steps[:v], steps[v].item)
        test[user] = (steps[:t], steps[t].item)
    return Split(train, valid, test)


def _fingerprint(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


class _Vocab:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}

    def __call__(self, item_id: str) -> int:
        idx = self.index.get(item_id)
        if idx is None:
            self.ids.append(item_id)
            idx = self.index[item_id] = len(self.ids)
        return idx


def _read_text_file(path: Path, vocab: _Vocab) -> dict[str, list[Step]]:
    """`user item` per line (grouped, time-ordered) or `user item item ...` per line."""
    sequences: dict[str, list[Step]] = {}
    click = int(EventKind.CLICK)
    with path.open() as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            steps = sequences.setdefault(parts[0], [])
            steps.extend(Step(click, vocab(p)) for p in parts[1:])
    return sequences


def _pick_interaction_file(directory: Path) -> Path:
    candidates = [
        p
        for p in sorted(directory.glob("*.txt"))
        if "test" not in p.name and "README" not in p.name and "sample" not in p.name
    ]
    if not candidates:
        raise FileNotFoundError(f"no interaction file (*.txt) in {directory}")
    # Prefer the per-user-line file when a dataset ships both forms (they hold the same interactions).
    by_user_line = [p for p in candidates if "interactions" not in p.name]
    return (by_user_line or candidates)[0]


def _read_native(directory: Path) -> Interactions:
    vocab = _Vocab()
    catalog: dict[str, CatalogItem] = {}
    catalog_path = directory / "catalog.jsonl"
    if catalog_path.exists():
        names = {f.name for f in fields(CatalogItem)}
        with catalog_path.open() as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    item = CatalogItem(**{k: v for k, v in rec.items() if k in names})
                    item.item_id = str(item.item_id)
                    catalog[item.item_id] = item
                    vocab(item.item_id)
    kinds = {"click": EventKind.CLICK, "search": EventKind.SEARCH, "purchase": EventKind.PURCHASE}
    sequences: dict[str, list[Step]] = {}
    first = last = None
    with (directory / "events.jsonl").open() as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            kind = rec["kind"]
            kind = kinds[kind.lower()] if isinstance(kind, str) else EventKind(int(kind))
            ts = int(rec.get("timestamp", 0))
            first = ts if first is None else min(first, ts)
            last = ts if last is None else max(last, ts)
            steps = sequences.setdefault(str(rec["user_id"]), [])
            if kind is EventKind.SEARCH:
                if rec.get("query"):
                    steps.append(Step(int(kind), PAD, str(rec["query"])))
            elif rec.get("item_id") is not None:
                steps.append(Step(int(kind), vocab(str(rec["item_id"]))))
    titles = {i: c.title for i, c in catalog.items()}
    texts = {i: c.text for i, c in catalog.items()}
    paths = [p for p in (directory / "events.jsonl", catalog_path) if p.exists()]
    return Interactions(
        item_ids=vocab.ids,
        sequences=sequences,
        titles=titles,
        texts=texts,
        catalog=catalog,
        fingerprint=_fingerprint(paths),
        window=(first, last) if first is not None and last is not None else None,
        source=str(directory),
    )


def load(path: Path) -> Interactions:
    """Read a dataset directory (shared/data layout, or native events.jsonl + catalog.jsonl) or one file."""
    path = Path(path)
    if path.is_dir() and (path / "events.jsonl").exists():
        return _read_native(path)
    vocab = _Vocab()
    main = _pick_interaction_file(path) if path.is_dir() else path
    directory = main.parent
    sequences = _read_text_file(main, vocab)
    used = [main]
    data = Interactions(item_ids=vocab.ids, sequences=sequences, source=str(main))
    for attr_path in directory.glob("*item2attributes.json"):
        raw = json.loads(attr_path.read_text())
        data.attributes = {str(k): [int(a) for a in v] for k, v in raw.items()}
        used.append(attr_path)
    for items_path in directory.glob("*_items.tsv"):
        # MovieLens side table: item_id, movielens id, title, year, genres.
        with items_path.open() as f:
            header = f.readline().rstrip("\n").split("\t")
            col = {name: i for i, name in enumerate(header)}
            for line in f:
                row = line.rstrip("\n").split("\t")
                item_id = row[col["item_id"]]
                title = row[col["title"]] if "title" in col else item_id
                year = row[col["release_year"]] if "release_year" in col else ""
                genres = row[col["genres"]].replace("|", ", ") if "genres" in col else ""
                data.titles[item_id] = f"{title} ({year})" if year else title
                data.texts[item_id] = f"{title} ({year}) | {genres}" if genres else title
        used.append(items_path)
    data.fingerprint = _fingerprint(used)
    return data
