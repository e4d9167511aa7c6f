"""The serving API the worker calls: load a model directory, keep the item index in step with the
catalogue, and turn a micro-batch of user states into ranked, explained recommendations
(one encoder call, one index search per batch, and one more for the batch's recent searches)."""

from __future__ import annotations

import copy
import ctypes
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamrec.models import artifacts
from streamrec.models.data import PAD
from streamrec.models.encoder import SequenceEncoder
from streamrec.models.index import CompiledMaxima, ItemIndex, excluded_hits
from streamrec.models.item_map import (
    ItemMap,
    Precision,
    RankedArrays,
    RankInputs,
    ServesItemMap,
    model_serve_len,
)
from streamrec.models.sequences import CompiledEncoder, can_compile, serving_vectors, warm_up
from streamrec.models.text import MiniLMEmbedder
from streamrec.models.train import native_bf16, resolve_device
from streamrec.records import CatalogItem, EventKind, RankedBatch, Reason, RecommendedItem, UserState

log = logging.getLogger(__name__)

_PURCHASE_INT = int(EventKind.PURCHASE)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Cosine similarities of an anchor closer than this to the best are a tie (float32 rounding is ~1e-7).
ANCHOR_TIE = 1e-5

_threads = threading.local()  # per calling thread: whether FAISS's OpenMP thread count is set there
_serving_threads: int | None = None


def set_threads(threads: int) -> None:
    """CPU threads for serving: torch's intra-op pool (process-wide) and FAISS's OpenMP pool. OpenMP keeps the
    count per thread, so every thread that ranks sets it again before its first search."""
    global _serving_threads
    _serving_threads = max(1, threads)
    torch.set_num_threads(_serving_threads)
    _threads.faiss = None
    _faiss_threads_here()


# glibc's malloc gives a freed block of 128 KB or more back to the system (and trims the heap's free top), so
# every batch's large tensors came from fresh pages whose first writes cost time: 2,000 users' encoder and
# search took 8-12% longer (docs/performance.md, round 21). A serving process keeps freed blocks below
# 32 MB (glibc's largest threshold on 64-bit) and up to MALLOC_KEEP_TOP_BYTES of free heap.
MALLOC_MMAP_THRESHOLD_BYTES = 32 << 20
MALLOC_KEEP_TOP_BYTES = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for the next batch (see above); False where the C library is
    not glibc (no ``mallopt``), which changes nothing but speed."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_KEEP_TOP_BYTES)
    )


def _faiss_threads_here() -> None:
    if _serving_threads is not None and getattr(_threads, "faiss", None) != _serving_threads:
        import faiss

        faiss.omp_set_num_threads(_serving_threads)
        _threads.faiss = _serving_threads


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype:
    """The served encoder's precision. ``auto``: bfloat16 on a CPU whose matrix units run it natively (AMX or
    AVX-512 BF16), else float32: docs/performance.md, round 16, gives its speed and its cost in NDCG@10. On
    CUDA ``auto`` stays float32: no GPU was lent to measure it. Item scores are float32 either way."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and native_bf16() else torch.float32
    return _DTYPES[precision]


@dataclass(frozen=True)
class SearchSteering:
    """How a recent search steers a user's top k (issue 26). The encoder maps a search for what it was trained
    on toward those items, but nothing maps an unseen query toward items it never saw ("camping tent" in a
    shop of new items). Query and items share one text space, the text embedder's, where the query's words
    meet the items' titles and descriptions whether the model trained on them or not. So when a search is
    among a user's ``recent`` newest window events, the newest such query is also matched against the items'
    texts (one index search per batch, of its distinct steering queries). Of its nearest ``pool`` x k texts
    of items the user may be recommended (in stock, not bought), those at least ``min_similarity`` alike
    (cosine) are its matches, and the user's own scores (the encoder's, as for every pick) choose which of
    them fill ``slots(k)`` of the k slots, reason ``matches_search``: the encoder's first k - slots(k) picks
    keep their order, and the matches are interleaved with them, evenly, the encoder's pick first. A search
    for what the shop does not sell matches nothing and leaves its slots to the encoder; a window without a
    recent search is ranked exactly as without steering; ``share`` 0 turns steering off. A model directory
    may set its own (metadata ``search_steering``, as ``{"share": 0.3, "recent": 3}``). The figures behind
    the defaults: ``benchmarks/search_steering.py``."""

    share: float = 0.3  # of the k slots, the query's matches take this share, rounded half up
    recent: int = 3  # a search steers while it is one of the user's newest `recent` window events
    min_similarity: float = 0.4  # a match's least cosine similarity to the query, in the text space
    pool: int = 3  # the query's nearest pool x k recommendable item texts are its candidates

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0 or self.recent < 1 or self.pool < 1:
            raise ValueError(f"search steering needs 0 <= share <= 1, recent >= 1 and pool >= 1, not {self}")

    @classmethod
    def of(cls, metadata: Mapping[str, Any]) -> SearchSteering:
        """A model's steering: its metadata's ``search_steering``, the defaults for what it does not set."""
        raw = metadata.get("search_steering") or {}
        return cls(
            float(raw.get("share", cls.share)),
            int(raw.get("recent", cls.recent)),
            float(raw.get("min_similarity", cls.min_similarity)),
            int(raw.get("pool", cls.pool)),
        )

    def slots(self, k: int) -> int:
        return min(k, int(self.share * k + 0.5))

    def query_slots(self, k: int) -> np.ndarray:
        """(k,) bool: the slots of a top k that the query's matches take, spread evenly (slot i is the
        query's where (i + 1) * slots // k steps up)."""
        return np.diff(np.arange(k + 1) * self.slots(k) // max(k, 1)) > 0


class Recommender(ServesItemMap):
    """Thread-safe: ``recommend`` and ``upsert_items`` may run in different threads (one lock; upserts do
    their slow text embedding before taking it)."""

    def __init__(
        self,
        art: artifacts.Artifacts,
        index: ItemIndex,
        index_version: str,
        device: torch.device,
        serve_len: int,
        precision: torch.dtype = torch.float32,
    ) -> None:
        self._model = art.model.to(device).eval()
        self._device = device
        self.precision = precision
        self._encoder = self.serving_encoder(self._model, precision)
        self._compiled: CompiledEncoder | None = None  # compile_encoder()'s; None: the eager encoder
        self._embedder = art.embedder
        self._items = ItemMap(
            art.items.ids,
            min(serve_len, art.config.max_len),
            str(art.metadata.get("version", "unversioned")),
            index_version,
        )
        self._ids = self._items.ids  # the map's own list and dict: they grow with it
        self._index_of = self._items.index_of
        self._titles: list[str] = [""] + list(art.items.titles)
        # Whether each item may be recommended: in stock, and once a catalogue record has arrived, in the
        # catalogue (the model's own items that the shop never published are not). Index 0 is padding.
        self._in_stock = np.array([False] + list(art.items.in_stock), dtype=bool)
        self._catalogue_seen = False
        with torch.inference_mode():
            vecs = self._model.item_vectors()
        self._vectors = vecs.cpu().numpy().astype(np.float32)
        self._vectors_t = vecs
        self._table_t = vecs.to(precision)  # the encoder's input table
        self._unit = _unit(self._vectors)
        # Content-only vectors are shorter than trained ones and dot products reward length, so a new item's
        # content is scaled to a trained item's typical length (Beauty cold targets: HR@10 0 -> .08).
        with torch.inference_mode():
            content_norm = self._model.content_vectors()[1:].norm(dim=1).mean()
        full_norm = float(vecs[1:].norm(dim=1).mean())
        self._content_scale = full_norm / float(content_norm) if float(content_norm) > 0 else 1.0
        pop = np.zeros(len(self._vectors), dtype=np.float32)
        pop[: len(art.popularity)] = art.popularity
        self._popularity = pop
        self._popular_order = self._rank_popular()
        self._index = index
        # bfloat16 products settled in float32 where the CPU runs bfloat16 natively: the same answers
        coarse = precision == torch.bfloat16 and device.type == "cpu"
        index.coarse = coarse
        # The items' texts as the text embedder sees them, for searches to be matched against (None without
        # a text model). Rows are item indices; an item without text has a zero row and matches nothing.
        self._text_index: ItemIndex | None = None
        if self._embedder is not None and art.config.text_dim:
            texts = self._model.item_text[1:].cpu().numpy().astype(np.float32)
            self._text_index = ItemIndex.build(texts, np.arange(1, len(texts) + 1, dtype=np.int64))
            self._text_index.coarse = coarse
        # The text each item's vectors and text row were made from (``artifacts.text_digest``): a catalogue
        # record with another text is a rewritten description, embedded again (``upsert_items``). The
        # model's digests where it recorded them; otherwise the first catalogue text seen stands for it.
        self._text_digests: dict[str, str] = {}
        if self._text_index is not None and art.items.text_digests is not None:
            self._text_digests = {
                i: d for i, d in zip(art.items.ids, art.items.text_digests, strict=True) if d is not None
            }
        self._trained_items = art.config.num_items  # item indices up to this have a trained ID row
        self.search_steering = SearchSteering.of(art.metadata)
        self._lock = threading.RLock()
        self.last_timings: dict[str, float] = {}  # seconds per phase of the last recommend() call

    @staticmethod
    def serving_encoder(model: SequenceEncoder, precision: torch.dtype) -> SequenceEncoder:
        """The blocks that encode users, in the serving precision: the model itself, or a copy of it (the
        float32 model still makes the item, content and query vectors)."""
        return model if precision == torch.float32 else copy.deepcopy(model).to(precision)

    # --- loading --------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model_dir: Path,
        device: str = "auto",
        serve_len: int | None = None,
        precision: Precision = "auto",
    ) -> Recommender:
        """``serve_len``: the newest events per user it encodes; default: the model's own
        (``item_map.model_serve_len``)."""
        dev = resolve_device(device)
        art = artifacts.load(Path(model_dir), device=str(dev))
        index, index_version = ItemIndex.load(Path(model_dir))
        if isinstance(art.embedder, MiniLMEmbedder):
            art.embedder.warm()
        index.to_gpu_if_available() if dev.type == "cuda" else None
        window = model_serve_len(art.metadata, art.config.max_len, serve_len)
        return cls(art, index, index_version, dev, window, resolve_precision(precision, dev))

    def compile_encoder(self) -> bool:
        """Serve users through the encoder compiled (``sequences.CompiledEncoder``; the ``serving_compile``
        setting), where this machine can compile it: whether it will be. ``warm_up`` compiles it."""
        if self._device.type != "cpu":
            return False  # torch.compile on a GPU needs Triton, which is not a dependency: eager there
        if not can_compile(self._device):
            log.warning(
                "serving the encoder uncompiled: no C++ compiler (g++, c++, clang++ or $CXX) for "
                "torch.compile's CPU back-end; install one, or set STREAMREC_SERVING_COMPILE=false"
            )
            return False
        with self._lock:
            self._compiled = CompiledEncoder(self._encoder)
            # The bfloat16 search's block maxima too (``index.CompiledMaxima``): one for both indexes
            if self._index.coarse:
                maxima = CompiledMaxima()
                self._index.maxima = maxima
                if self._text_index is not None:
                    self._text_index.maxima = maxima
        return True

    @property
    def encoder_compiled(self) -> bool:
        """Whether users go through the compiled encoder (asked for, and compiling has not failed)."""
        return self._compiled is not None and self._compiled.failed is None

    def warm_up(self) -> None:
        """Build the encoder's kernels for every serving shape now, before the first ranking needs them
        (``sequences.warm_up``), compiling it if ``compile_encoder`` asked: what a worker does once it has
        loaded a model it is about to serve."""
        with self._lock:
            seconds = warm_up(self._model, self._encoder, self._table_t, self.serve_len, self._compiled)
            if isinstance(self._index.maxima, CompiledMaxima):
                # compiled at one query and at two: torch.compile specialises a dimension of size 1; over
                # the items in stock, as rankings search, so the dense table built here is the one they use
                for rows in (1, 2):
                    queries = np.zeros((rows, self._index.dim), dtype=np.float32)
                    self._index.search(queries, 10, self._in_stock)
        if self._compiled is not None:
            how = "compiled" if self.encoder_compiled else "uncompiled (compiling failed)"
            log.info("serving encoder %s, warmed up in %.1f s", how, seconds)

    def _rank_popular(self) -> np.ndarray:
        order = np.argsort(-self._popularity, kind="stable")
        return order[order != PAD]

    # --- catalogue ------------------------------------------------------------------------------------
    def knows_item(self, item_id: str) -> bool:
        return item_id in self._index_of

    @property
    def num_items(self) -> int:
        return len(self._ids)

    @property
    def recommendable(self) -> int:
        """Items that may be recommended now (see ``upsert_items``)."""
        return int(self._in_stock.sum())

    def item_vector(self, item_id: str) -> np.ndarray:
        return self._vectors[self._index_of[item_id]].copy()

    def _content_vectors(self, items: list[CatalogItem]) -> tuple[np.ndarray, np.ndarray | None]:
        """Cold start: a new item is its content (text through the model's text projection), no ID part.
        Also the items' text vectors, which searches are matched against (None without a text model)."""
        dim = self._model.config.dim
        if self._embedder is None or not self._model.config.text_dim:
            return np.zeros((len(items), dim), dtype=np.float32), None
        texts = self._embedder.embed_items([i.text for i in items]).astype(np.float32)
        with torch.inference_mode():
            content = (
                self._model.query_vectors(torch.from_numpy(texts).to(self._device)) * self._content_scale
            )
        return content.cpu().numpy().astype(np.float32), texts

    def upsert_items(self, items: list[CatalogItem]) -> None:
        """Catalogue records, in order. The first one makes the catalogue the only source of recommendable
        items: until then the model's own items (as trained) are served; from then on only items the
        catalogue holds and has in stock. Items new to the model get their content vectors. A known item
        whose text (title, category, description) is not the one its vectors were made from is embedded
        again: its text row, which searches are matched against, becomes the new text's; a new item's
        vector becomes its new content vector, and a trained item's keeps its ID and attribute parts with
        the new text's part in place of the old (the model's item tower on the new text)."""
        known = [i for i in items if i.item_id in self._index_of]
        # each known item's last write, and the digest of its text (a text model only)
        latest = {item.item_id: item for item in known}
        digests = (
            {i: artifacts.text_digest(item.text) for i, item in latest.items()}
            if self._text_index is not None
            else {}
        )
        fresh = self._items.unknown(items)
        rewritten = [latest[i] for i, d in digests.items() if self._text_digests.get(i, d) != d]
        vectors, texts = self._content_vectors(fresh + rewritten)  # slow part, outside the lock
        with self._lock:
            if items and not self._catalogue_seen:
                self._catalogue_seen = True
                self._in_stock[:] = False
            for item in known:
                idx = self._index_of[item.item_id]
                self._titles[idx] = item.title
                self._in_stock[idx] = bool(item.in_stock)
            # a model without digests: the first text seen stands for it; a rewritten item's is its new one
            self._text_digests |= {i: self._text_digests.get(i, d) for i, d in digests.items()}
            if rewritten:
                assert texts is not None  # only a text model has digests, and it embeds texts
                n = len(fresh)
                self._rewrite(rewritten, vectors[n:], texts[n:])
                self._text_digests |= {item.item_id: digests[item.item_id] for item in rewritten}
                vectors, texts = vectors[:n], texts[:n]
            added = self._items.add(fresh)
            new_items = [item for item, new in zip(fresh, added, strict=True) if new]
            if new_items:
                vectors = vectors[np.array(added, dtype=bool)]
                first = len(self._vectors)
                ids = np.arange(first, first + len(new_items), dtype=np.int64)
                self._titles.extend(item.title for item in new_items)
                # Swap-on-write for the arrays recommend() reads.
                self._in_stock = np.concatenate([self._in_stock, [bool(i.in_stock) for i in new_items]])
                self._set_vectors(np.concatenate([self._vectors, vectors]))
                self._popularity = np.concatenate([self._popularity, np.zeros(len(new_items), np.float32)])
                self._popular_order = self._rank_popular()
                self._index.add(vectors, ids)
                if self._text_index is not None and texts is not None:
                    self._text_index.add(texts[np.array(added, dtype=bool)], ids)
                    for item in new_items:
                        self._text_digests[item.item_id] = artifacts.text_digest(item.text)

    def _rewrite(self, items: list[CatalogItem], content: np.ndarray, texts: np.ndarray) -> None:
        """Rewritten items' vectors and text rows (``upsert_items``, under the lock): ``content`` is each new
        text's content vector, ``texts`` its text embedding."""
        assert self._text_index is not None  # only a text model rewrites
        rows = np.array([self._index_of[item.item_id] for item in items], dtype=np.int64)
        vectors = self._vectors.copy()
        trained = rows <= self._trained_items
        vectors[rows[~trained]] = content[~trained]
        if trained.any():
            at = torch.from_numpy(rows[trained]).to(self._device)
            new_text = torch.from_numpy(texts[trained]).to(self._device)
            with torch.inference_mode():
                # The item tower is linear in the text row: swap the old text's part for the new one's
                old_part = self._model.query_vectors(self._model.item_text[at])
                delta = self._model.query_vectors(new_text) - old_part
                self._model.item_text[at] = new_text
            vectors[rows[trained]] += delta.cpu().numpy().astype(np.float32)
        self._set_vectors(vectors)
        self._index.replace(vectors[rows], rows)
        self._text_index.replace(texts, rows)
        log.info("%d rewritten catalogue items embedded again", len(items))

    def _set_vectors(self, vectors: np.ndarray) -> None:
        """A new item table for recommend() to read (swap-on-write: a ranking in flight keeps the old)."""
        self._vectors = vectors
        self._vectors_t = torch.from_numpy(vectors).to(self._device)
        self._table_t = self._vectors_t.to(self.precision)
        self._unit = _unit(vectors)

    # --- recommending ---------------------------------------------------------------------------------
    def recommend(self, users: list[UserState], k: int) -> list[list[RecommendedItem]]:
        """Top-k per user, in input order: one encoder call and one index search for the whole batch."""
        return self.rank(users, k).all_items()

    def rank(self, users: list[UserState], k: int) -> RankedBatch:
        """``recommend`` in arrays (what the worker writes its records from): row u is users[u]."""
        return self.prepare(users, k)()

    def prepare(self, users: list[UserState], k: int) -> Callable[[], RankedBatch]:
        """``rank`` in two steps: this call reads the users' states (their serving windows and purchases);
        the call it returns ranks them without reading the states again, so they may change meanwhile."""
        if not users:
            return lambda: RankedBatch.of([])
        inputs = self.inputs(users)
        return lambda: self.rank_inputs(inputs, k)

    def inputs(self, users: list[UserState]) -> RankInputs:
        """Everything ranking reads of the users' states (row u is users[u]; see ``ItemMap.inputs``)."""
        with self._lock:
            return self._items.inputs(users)

    def inputs_from_bytes(self, states: list[bytes]) -> RankInputs:
        """``inputs`` of the users whose states are encoded in ``states`` (``encode_state_bytes``: what the
        worker writes to its changelog), read from the bytes (see ``ItemMap.inputs_from_bytes``)."""
        with self._lock:
            return self._items.inputs_from_bytes(states)

    def rank_inputs(self, inputs: RankInputs, k: int) -> RankedBatch:
        """The top-k of every user whose inputs these are (see ``rank``)."""
        return self.rank_arrays(inputs, k).batch(self._ids)

    def rank_arrays(self, inputs: RankInputs, k: int) -> RankedArrays:
        """``rank_inputs`` as the ranking leaves it, in arrays (what a ranking process sends back)."""
        _faiss_threads_here()
        with self._lock:
            return self._rank_arrays(inputs, k)

    def _rank_arrays(self, inputs: RankInputs, k: int) -> RankedArrays:
        clock = time.perf_counter
        t0 = clock()
        warm, items, kinds, qids, queries, excluded, inputs_s = inputs
        n_users = len(excluded)
        picked = np.zeros((0, k), dtype=np.int64)
        picked_scores = np.zeros((0, k), dtype=np.float32)
        codes = np.zeros((0, k), dtype=np.int64)
        counts: list[int] = []
        reasons: dict[int, Reason] = {}
        if warm:
            qtable, qspace, qtext = self._query_tables(queries)
            t1 = clock()
            with torch.inference_mode():
                h = serving_vectors(
                    self._model,
                    self._encoder,
                    torch.from_numpy(items),
                    torch.from_numpy(kinds),
                    torch.from_numpy(qids),
                    qtable,
                    self._table_t,
                    window=self.serve_len,
                    encode_last=self._compiled,
                )
            user_vecs = h.cpu().numpy()
            t2 = clock()
            warm_excluded = [excluded[u] for u in warm]
            # recommendable items only: in stock and not bought (the search masks both)
            fetch = min(self._index.size, k + 8)
            scores, found = self._index.search(user_vecs, fetch, self._in_stock, excluded=warm_excluded)
            t3 = clock()
            picked, picked_scores = _first(found, scores, found > PAD, k)  # the search left out the rest
            t4 = clock()
            config = self.search_steering  # read once: it may be replaced meanwhile
            steering = self._steering_queries(qids, qtext, config)
            picked, picked_scores, from_query = self._steer(
                picked, picked_scores, steering, qtext, user_vecs, warm_excluded, k, config
            )
            t5 = clock()
            anchors = self._anchors(picked, items, qids, qspace)
            codes = self._reason_codes(picked, anchors, items, kinds, qids)
            codes = np.where(from_query, -steering[:, None], codes)  # the query's matches: its reason
            reasons = {c: self._reason(c, queries) for c in np.unique(codes).tolist()}
            counts = (picked != PAD).sum(axis=1).tolist()  # the valid ones come first in every row
            t6 = clock()
            self.last_timings = {
                "inputs": inputs_s + t1 - t0,
                "encoder": t2 - t1,
                "search": t3 - t2,
                "steer": t5 - t4,
                "rank": t4 - t3 + t6 - t5,
            }
        # The popularity fill of every user with fewer than k items ranked (all of a cold user's k).
        fills: list[list[RecommendedItem]] = [[] for _ in range(n_users)]
        ranked = {u: (j, n) for j, (u, n) in enumerate(zip(warm, counts, strict=True))}  # row: (warm row, n)
        ids = self._ids
        for u in range(n_users):
            j, n = ranked.get(u, (-1, 0))
            if n < k:
                already = [ids[i - 1] for i in picked[j, :n].tolist()] if n else []
                fills[u] = self._popular(k - n, excluded[u], already)
        return RankedArrays(n_users, warm, counts, picked, picked_scores, codes, reasons, fills)

    def _query_tables(self, queries: list[str]) -> tuple[torch.Tensor | None, np.ndarray, np.ndarray]:
        """Row j + 1 is query j: its text vector (the encoder's input; None without a text model), its
        vector in item space (for reasons; zeros without a text model) and its text vector in numpy (for
        search steering; zeros without a text model). Row 0 is padding."""
        qspace = np.zeros((len(queries) + 1, self._model.config.dim), dtype=np.float32)
        text = np.zeros((len(queries) + 1, self._model.config.text_dim), dtype=np.float32)
        if not (queries and self._embedder is not None and self._model.config.text_dim):
            return None, qspace, text
        text[1:] = self._embedder.embed_queries(queries)
        qtable = torch.from_numpy(text).to(self._device)
        with torch.inference_mode():
            qspace = self._model.query_vectors(qtable).cpu().numpy()
        return qtable, qspace, text

    def _recommendable(self, found: np.ndarray, excluded: list[set[int]]) -> np.ndarray:
        """Per candidate: real, in stock and not excluded from its row."""
        valid = found > PAD  # FAISS answers -1 when it has fewer than asked
        valid &= self._in_stock[np.where(valid, found, PAD)]  # in_stock[PAD] is False
        return valid & ~excluded_hits(found, excluded)

    def _steering_queries(self, qids: np.ndarray, qtext: np.ndarray, config: SearchSteering) -> np.ndarray:
        """Per warm row, the id of the query that steers it (``SearchSteering``), 0 for none: the newest
        search among its ``recent`` newest events, unless its query has no text vector (no known word)."""
        if config.share <= 0 or self._text_index is None or not qtext.any():  # off, no text, no search
            return np.zeros(len(qids), dtype=np.int64)
        recent = qids[:, -config.recent :]  # a query id sits at a search's position, 0 elsewhere
        newest = recent.shape[1] - 1 - np.argmax(recent[:, ::-1] > 0, axis=1)
        chosen = recent[np.arange(len(recent)), newest]
        has_text = np.any(qtext != 0, axis=1)  # row 0, no query, is zeros
        return np.where(has_text[chosen], chosen, 0)

    def _steer(
        self,
        picked: np.ndarray,
        picked_scores: np.ndarray,
        steering: np.ndarray,
        qtext: np.ndarray,
        user_vecs: np.ndarray,
        excluded: list[set[int]],
        k: int,
        config: SearchSteering,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows with a steering query get its matches in their share of the k slots (see
        ``SearchSteering``). Returns picked, scores and, per slot, whether the query's search filled it."""
        from_query = np.zeros(picked.shape, dtype=bool)
        rows = np.flatnonzero(steering)
        slots = config.slots(k)
        if not len(rows) or not slots:
            return picked, picked_scores, from_query
        kept = picked[rows, : k - slots]  # the encoder's picks that keep their places
        matches, match_scores = self._query_matches(
            steering[rows], qtext, user_vecs[rows], [excluded[r] for r in rows.tolist()], kept, k, config
        )
        picked, picked_scores = picked.copy(), picked_scores.copy()
        picked[rows], picked_scores[rows], from_query[rows] = _interleave(
            picked[rows], picked_scores[rows], matches, match_scores, config.query_slots(k)
        )
        return picked, picked_scores, from_query

    def _query_matches(
        self,
        qids: np.ndarray,
        qtext: np.ndarray,
        user_vecs: np.ndarray,
        excluded: list[set[int]],
        kept: np.ndarray,
        k: int,
        config: SearchSteering,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per steered user (their query id, user vector, bought items, the encoder's kept picks): the
        query's matches that take its slots, (users, slots) item indices (PAD where fewer) and the user's
        scores of them. One search of the items' texts for the distinct queries, recommendable items only."""
        assert self._text_index is not None  # no text model: no steering query
        queries, at = np.unique(qids, return_inverse=True)
        fetch = min(self._text_index.size, config.pool * k + max(len(e) for e in excluded))
        similarity, found = self._text_index.search(qtext[queries], fetch, self._in_stock)
        found, similarity = found[at], similarity[at]
        # Each row's pool: its query's nearest pool x k recommendable texts. The search went wider, by the
        # most purchases of a steered user in the batch, so that a row has them after dropping its own
        # purchases; what lies beyond them is not this row's, or a user's list would depend on the batch.
        recommendable = self._recommendable(found, excluded)
        pooled = recommendable & (np.cumsum(recommendable, axis=1) <= config.pool * k)
        valid = pooled & (similarity >= config.min_similarity)
        valid &= ~(found[:, :, None] == kept[:, None, :]).any(axis=2)
        # Which of them: this user's, as the encoder scores every item for them.
        mine = (self._vectors[np.maximum(found, PAD)] * user_vecs[:, None, :]).sum(axis=2)
        order = np.argsort(np.where(valid, -mine, np.inf), axis=1, kind="stable")
        return _first(
            np.take_along_axis(found, order, 1),
            np.take_along_axis(mine, order, 1),
            np.take_along_axis(valid, order, 1),
            config.slots(k),
        )

    def _reason_codes(
        self, picked: np.ndarray, anchors: np.ndarray, items: np.ndarray, kinds: np.ndarray, qids: np.ndarray
    ) -> np.ndarray:
        """One code per distinct reason, for the whole batch (see ``_reason``): 2 * item (+1 when bought)
        for an item anchor, -query id for a search anchor; 0 where nothing was picked."""
        anchor_items = np.take_along_axis(items, anchors, axis=1)
        anchor_kinds = np.take_along_axis(kinds, anchors, axis=1)
        anchor_qids = np.take_along_axis(qids, anchors, axis=1)
        codes = np.where(anchor_items > PAD, 2 * anchor_items + (anchor_kinds == _PURCHASE_INT), -anchor_qids)
        codes[picked == PAD] = 0
        return codes

    def _reason(self, code: int, queries: list[str]) -> tuple[str, str, str | None]:
        """(reason code, explanation, anchor) of a reason code made by _reason_codes."""
        if code <= 0:
            q = queries[-code - 1] if code < 0 else ""
            return "matches_search", f"Matches your search '{q}'", q
        item, bought = divmod(code, 2)
        title = self._titles[item] or self._ids[item - 1]
        if bought:
            return "goes_with_purchase", f"Goes with {title} you bought", self._ids[item - 1]
        return "similar_to_recent", f"Because you viewed {title}", self._ids[item - 1]

    def _anchors(
        self, picked: np.ndarray, items: np.ndarray, qids: np.ndarray, qspace: np.ndarray
    ) -> np.ndarray:
        """For every recommended item, the position of the history element (item or query) most similar to it
        in embedding space, for the whole batch at once: (users, k) positions into the padded history."""
        unit = self._unit
        qunit = qspace / (np.linalg.norm(qspace, axis=1, keepdims=True) + 1e-9)
        history = unit[items]  # (n, L, d): the items' rows, then a search's query where it has no item
        asked = (items == PAD) & (qids > 0)
        history[asked] = qunit[qids[asked]]  # (np.where over both gathers: 5.0 against 2.9 µs per user)
        sims = unit[picked] @ history.transpose(0, 2, 1)  # (n, k, L); a batched matmul, ~5x einsum's speed
        np.copyto(sims, -np.inf, where=((items == PAD) & (qids == 0))[:, None, :])  # neither: padding
        # Among equally similar anchors prefer the newest: it is what the user is doing now. "Equally" allows
        # for rounding: the matmul may sum one item's product at two positions (a click, then the purchase of
        # the same item) in different orders, a last-bit difference that depends on the batch's shape.
        tied = sims >= sims.max(axis=2, keepdims=True) - ANCHOR_TIE
        return sims.shape[2] - 1 - np.argmax(tied[:, :, ::-1], axis=2)

    def _popular(self, n: int, excluded: set[int], already: list[str]) -> list[RecommendedItem]:
        taken = set(already)
        top = float(self._popularity.max()) or 1.0
        out: list[RecommendedItem] = []
        for idx in self._popular_order:
            if len(out) == n:
                break
            idx = int(idx)
            item_id = self._ids[idx - 1]
            if idx in excluded or not self._in_stock[idx] or item_id in taken:
                continue
            out.append(
                RecommendedItem(
                    item_id, float(self._popularity[idx]) / top, "popular", "Popular right now", None
                )
            )
        return out


def _first(found: np.ndarray, scores: np.ndarray, valid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k valid candidates of each row, in their order: (rows, k) item indices (PAD where fewer)
    and their scores (0 there)."""
    rows = found.shape[0]
    take = min(k, found.shape[1])
    order = np.argsort(~valid, axis=1, kind="stable")[:, :take]  # valid first, order kept
    kept = np.take_along_axis(valid, order, axis=1)
    picked = np.full((rows, k), PAD, dtype=np.int64)
    picked_scores = np.zeros((rows, k), dtype=np.float32)
    picked[:, :take] = np.where(kept, np.take_along_axis(found, order, axis=1), PAD)
    picked_scores[:, :take] = np.where(kept, np.take_along_axis(scores, order, axis=1), 0.0)
    return picked, picked_scores


def _interleave(
    picked: np.ndarray,
    scores: np.ndarray,
    matches: np.ndarray,
    match_scores: np.ndarray,
    query_slots: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The encoder's picks (rows, k) and a query's matches (rows, slots) in one top k: the matches in the
    query's slots (``SearchSteering.query_slots``), the encoder's picks without them in the others, in
    order. A row with fewer matches than slots gives its later query slots back to the encoder; a short row
    ends with PAD. Returns items, scores and, per slot, whether a match fills it."""
    take = np.take_along_axis
    others = ~(picked[:, :, None] == matches[:, None, :]).any(axis=2) & (picked != PAD)
    encoder, encoder_scores = _first(picked, scores, others, picked.shape[1])
    query = query_slots[None, :] & (np.cumsum(query_slots)[None, :] <= (matches != PAD).sum(axis=1)[:, None])
    nth_match = np.maximum(np.cumsum(query, axis=1) - 1, 0)
    nth_pick = np.maximum(np.cumsum(~query, axis=1) - 1, 0)
    merged = np.where(query, take(matches, nth_match, 1), take(encoder, nth_pick, 1))
    merged_scores = np.where(query, take(match_scores, nth_match, 1), take(encoder_scores, nth_pick, 1))
    order = np.argsort(merged == PAD, axis=1, kind="stable")  # close a short row's gaps: valid ones first
    return take(merged, order, 1), take(merged_scores, order, 1), take(query, order, 1)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-9)
