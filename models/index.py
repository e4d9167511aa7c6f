"""The item index: maximum-inner-product search over item vectors with FAISS (flat, HNSW or IVF), on the GPU
when faiss-gpu and CUDA are available."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch

IndexKind = Literal["flat", "hnsw", "ivf"]
log = logging.getLogger(__name__)
_faiss: Any = faiss  # its type stubs lack the search parameters' keyword arguments

# Up to this many items a flat index on the CPU is searched with one matrix product and torch.topk instead of
# FAISS's heap selection: the same exact answer, 7 against 12 ms for 1,400 users over 480 items (the bench
# model, one thread). Queries go in chunks of at most DENSE_CHUNK_SCORES scores: ~6 MB of float32, which
# the matrix product writes faster than 4M scores (12,101 items, 2,000 users, one thread: 36-40 against
# 51-61 µs per user for the whole search; 2M: 41-43, 1M: 38-41; docs/performance.md, round 19).
DENSE_MAX_ITEMS = 65_536
DENSE_CHUNK_SCORES = 3 << 19
# The dense table's rows come in blocks of this many items; a query's top k is taken from the k blocks with
# the best maxima (``top_k``): exact, and a top-k over k x BLOCK scores instead of all of them.
BLOCK = 64
# Where the CPU multiplies bfloat16 natively (AMX, AVX512-BF16; ``ItemIndex.coarse``), the dense search
# scores every item in bfloat16 first, about 4x cheaper than in float32, takes the best k + COARSE_ITEMS from
# the k + COARSE_BLOCKS blocks with the best maxima, scores those again in float32 and keeps the best k. A
# bound on bfloat16's error then proves, query by query, that no other item could beat them; a query it
# cannot settle is scored again in float32 in full. The answer is the float32 search's (docs/performance.md,
# round 22).
COARSE_BLOCKS = 2
COARSE_ITEMS = 14
# |exact - bfloat16 score| <= COARSE_ERROR x |query| x |item| + COARSE_ROUNDING x |bfloat16 score|: rounding
# the query and the item to bfloat16 (2^-8 of each term, with their product), float32 sums (of d terms:
# d x 2^-24, here and in the float32 scores it is compared with; under 1e-4 together up to COARSE_MAX_DIM),
# and the sum's rounding to bfloat16 (2^-8 of it: 2^-8 / (1 - 2^-8) of the bfloat16 score).
COARSE_ERROR = 2 * 2.0**-8 + 2 * 2.0**-16 + 1e-4
COARSE_ROUNDING = 2.0**-8 * (1 + 2.0**-7)
COARSE_MAX_DIM = 512


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)``'s values and columns, best first, for scores in whole blocks of BLOCK
    columns, looking closely only at the k blocks with the best maxima. It is exact: an item scoring above the
    k-th best block maximum lies in a block above it, and those k blocks hold k scores at least that high
    (between equal scores either may be taken). Beauty's 12,101 items, one thread: 53-55 against 67-73 µs per
    user for the whole search (docs/performance.md, round 16)."""
    rows, columns = scores.shape
    blocks = columns // BLOCK
    if k * BLOCK * 2 > columns or blocks * BLOCK != columns:  # too few blocks to leave any out
        return torch.topk(scores, k, dim=1)
    by_block = scores.view(rows, blocks, BLOCK)
    best = torch.topk(by_block.amax(dim=2), k, dim=1, sorted=False).indices  # (rows, k) block numbers
    candidates = by_block[torch.arange(rows).unsqueeze(1), best].reshape(rows, k * BLOCK)
    top = torch.topk(candidates, k, dim=1)
    columns_of = (best.unsqueeze(2) * BLOCK + torch.arange(BLOCK)).reshape(rows, k * BLOCK)
    return top.values, columns_of.gather(1, top.indices)


def block_maxima(scores: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """Each BLOCK columns' largest of bfloat16 ``scores`` (rows, columns in whole blocks), in float32 (exact),
    through a float32 copy in ``buffer`` (at least as many rows): torch's reductions over bfloat16 are
    three times slower than over float32, and a fresh copy per chunk would come from new pages."""
    rows = len(scores)
    copy = buffer[:rows]
    copy.copy_(scores)
    return copy.view(rows, -1, BLOCK).amax(dim=2)


def _fused_maxima(scores: torch.Tensor) -> torch.Tensor:
    return scores.view(scores.shape[0], -1, BLOCK).float().amax(dim=2)


class CompiledMaxima:
    """``block_maxima`` compiled with torch.compile: one pass that reads the bfloat16 scores and writes only
    the maxima, where the eager one copies every score to float32 first (12,101 items, one thread: 2.6
    against 5.3 µs per user; docs/performance.md, round 23). The same values (a maximum rounds nothing).
    Compiling takes a few seconds once (``Recommender.warm_up``); one that fails is logged and the eager
    ``block_maxima`` answers from then on."""

    def __init__(self) -> None:
        self._compiled = torch.compile(_fused_maxima, dynamic=True)
        self.failed: str | None = None

    def __call__(self, scores: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        if self.failed is None:
            try:
                return self._compiled(scores)
            except Exception as exc:  # inductor's errors have no common base; any one means eager from now
                self.failed = f"{type(exc).__name__}: {str(exc)[:300]}"
                log.warning("compiling the search's block maxima failed, eager from now: %s", self.failed)
        return block_maxima(scores, buffer)


Maxima = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def coarse_top_k(
    queries: torch.Tensor,
    table: torch.Tensor,
    coarse_table: torch.Tensor,
    longest: float,
    k: int,
    scores: torch.Tensor,
    coarse_scores: torch.Tensor,
    hide: Callable[[torch.Tensor], None],
    maxima: Maxima = block_maxima,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``top_k`` of ``queries @ table.T`` (float32, rows in whole blocks) from a bfloat16 product: values,
    columns and, per query, whether the answer is settled (proved to be float32's); a query that is not must
    be searched again exactly. ``coarse_table`` is ``table`` in bfloat16, ``longest`` its largest row norm,
    ``coarse_scores`` (bfloat16, at least as many rows as queries) is written, ``scores`` (float32, as many)
    is ``maxima``'s buffer, ``hide`` sets -inf in a score matrix where items may not be found.

    Settled: every item not scored again in float32 has a bfloat16 score at most ``unseen`` (the best block
    left out, or the best candidate left out), so its exact score is at most ``unseen`` plus the error bound
    (COARSE_ERROR); when the k-th exact score reaches that, nothing left out could beat it."""
    rows = len(queries)
    coarse = torch.matmul(queries.to(torch.bfloat16), coarse_table.T, out=coarse_scores[:rows])
    hide(coarse)
    block_max = maxima(coarse, scores)
    blocks = k + COARSE_BLOCKS
    best = torch.topk(block_max, blocks + 1, dim=1)  # best first: the last one is left out
    chosen = best.indices[:, :blocks].numpy()
    # The chosen blocks' scores, gathered as whole rows of BLOCK (numpy's take: a third of torch's indexing)
    # in their bfloat16 bits, made float32 by a shift (bfloat16 is float32's upper half: exact)
    per_row = block_max.shape[1]
    flat = (np.arange(rows)[:, None] * per_row + chosen).reshape(-1)
    bits = coarse.view(torch.int16).numpy().reshape(-1, BLOCK).take(flat, axis=0)
    candidates = (bits.astype(np.int32) << 16).view(np.float32).reshape(rows, blocks * BLOCK)
    # The best k + COARSE_ITEMS candidates in any order after the best one left out (numpy's partition:
    # a third of torch.topk's time here)
    split = candidates.shape[1] - k - COARSE_ITEMS - 1
    order = np.argpartition(candidates, split, axis=1)[:, split:]
    near = torch.from_numpy(np.take_along_axis(candidates, order, axis=1))
    picked = order[:, 1:]
    columns = np.take_along_axis(chosen, picked // BLOCK, axis=1) * BLOCK + picked % BLOCK
    exact = torch.bmm(torch.from_numpy(table.numpy().take(columns, axis=0)), queries.unsqueeze(2))
    exact = torch.where(torch.isfinite(near[:, 1:]), exact.squeeze(2), -torch.inf)  # hidden stays hidden
    top = torch.topk(exact, k, dim=1)
    unseen = torch.maximum(best.values[:, -1], near[:, 0])
    bound = COARSE_ERROR * longest * torch.linalg.vector_norm(queries, dim=1) + COARSE_ROUNDING * unseen.abs()
    kth = top.values[:, -1]
    settled = torch.isfinite(kth) & (kth >= unseen + bound)
    return top.values, torch.from_numpy(columns).gather(1, top.indices), settled


def excluded_hits(found: np.ndarray, excluded: Sequence[Collection[int]]) -> np.ndarray:
    """Per result of a search, (queries, k) item indices: whether its query's ``excluded`` holds it. The
    (query, item) pairs are one sorted int64 key each, looked up with searchsorted (np.isin: ~4x slower)."""
    if not any(excluded):
        return np.zeros(found.shape, dtype=bool)
    width = int(max(found.max(initial=0), max(max(skip) for skip in excluded if skip))) + 2
    banned = np.fromiter(
        (row * width + item for row, skip in enumerate(excluded) for item in skip if item >= 0),
        dtype=np.int64,
    )
    banned.sort()
    keys = np.arange(len(found), dtype=np.int64)[:, None] * width + np.where(found >= 0, found, 0)
    at = np.minimum(np.searchsorted(banned, keys), max(len(banned) - 1, 0))
    return (banned[at] == keys) if len(banned) else np.zeros(found.shape, dtype=bool)


def _drop_excluded(
    scores: np.ndarray, found: np.ndarray, excluded: Sequence[Collection[int]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """A wide search's first k results per query that its ``excluded`` does not hold, order kept; missing
    results have index -1 (score -inf), as FAISS answers."""
    keep = (found >= 0) & ~excluded_hits(found, excluded)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept first, in the search's order
    kept = np.take_along_axis(keep, order, axis=1)
    out_found = np.where(kept, np.take_along_axis(found, order, axis=1), -1)
    out_scores = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf).astype(np.float32)
    return out_scores, out_found


def _rows_of(
    cells: tuple[np.ndarray, np.ndarray] | None, rows: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The excluded ``cells`` (query, row; queries ascending) of ``rows`` (ascending) of n queries, renumbered
    as the queries of a search of those rows only."""
    if cells is None:
        return None
    renumbered = np.full(n, -1, dtype=np.int64)
    renumbered[rows] = np.arange(len(rows))
    query = renumbered[cells[0]]
    kept = query >= 0
    return query[kept], cells[1][kept]


def _gpu_available() -> bool:
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except Exception:  # a CPU build without the symbol, or a broken driver: CPU it is
        return False


@dataclass
class _DenseTable:
    """The items a dense search may find, in whole blocks of BLOCK rows: their vectors, then zero rows
    (padding, hidden in every search)."""

    allowed: np.ndarray | None  # what it was made for
    vectors: torch.Tensor  # (rows, d) float32
    ids: torch.Tensor  # (rows,) the item index of each row, -1 for padding
    items: int  # rows that hold an item; the rest are padding
    row_of: np.ndarray  # item index -> row (-1: none)
    coarse: torch.Tensor | None = None  # the vectors in bfloat16, for ``coarse_top_k``
    longest: float = 0.0  # the largest row norm, rounded up (with ``coarse`` only)

    @classmethod
    def of(
        cls, vectors: np.ndarray, ids: np.ndarray, allowed: np.ndarray | None, coarse: bool
    ) -> _DenseTable:
        """The rows of ``vectors`` (item indices ``ids``) that ``allowed`` allows (None: all of them)."""
        if allowed is not None:
            inside = (ids >= 0) & (ids < len(allowed))
            keep = np.zeros(len(ids), dtype=bool)
            keep[inside] = allowed[ids[inside]]
            vectors, ids = vectors[keep], ids[keep]
        n = len(ids)
        rows = max(1, -(-n // BLOCK)) * BLOCK
        stored = np.zeros((rows, vectors.shape[1]), dtype=np.float32)
        stored[:n] = vectors
        padded_ids = np.full(rows, -1, dtype=np.int64)
        padded_ids[:n] = ids
        row_of = np.full(int(padded_ids.max()) + 2, -1, dtype=np.int64)
        row_of[ids] = np.arange(n)
        table = torch.from_numpy(stored)
        dense = cls(
            None if allowed is None else allowed.copy(), table, torch.from_numpy(padded_ids), n, row_of
        )
        if coarse:  # the bound's norm only where it is used: a float64 pass over the table at every rebuild
            dense.coarse = table.to(torch.bfloat16)
            dense.longest = float(np.linalg.norm(stored.astype(np.float64), axis=1).max()) * (1 + 1e-6)
        return dense

    def hide(self, cells: tuple[torch.Tensor, torch.Tensor] | None, scores: torch.Tensor) -> None:
        """-inf in a chunk's scores for the padding rows (every query) and the excluded ``cells``."""
        if self.items < scores.shape[1]:
            scores[:, self.items :] = -torch.inf
        if cells is not None:
            scores[cells] = -torch.inf

    def exact_top_k(
        self,
        queries: torch.Tensor,
        k: int,
        scores: torch.Tensor,
        cells: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row scored in float32 into ``scores`` (at least as many rows as queries), then ``top_k``."""
        product = torch.matmul(queries, self.vectors.T, out=scores[: len(queries)])
        self.hide(cells, product)
        return top_k(product, k)

    def excluded_cells(
        self, excluded: Sequence[Collection[int]] | None, n: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The score matrix's cells that ``excluded`` masks, as (query, row) index arrays, queries in
        ascending order; None for none. Item indices the table lacks mask nothing."""
        if excluded is None or not any(excluded):
            return None
        if len(excluded) != n:
            raise ValueError(f"excluded has {len(excluded)} rows for {n} queries")
        lengths = np.fromiter(map(len, excluded), dtype=np.int64, count=n)
        items = np.fromiter(itertools.chain.from_iterable(excluded), dtype=np.int64, count=int(lengths.sum()))
        query = np.repeat(np.arange(n, dtype=np.int64), lengths)
        inside = (items >= 0) & (items < len(self.row_of))
        rows = np.full(len(items), -1, dtype=np.int64)
        rows[inside] = self.row_of[items[inside]]
        kept = rows >= 0
        return query[kept], rows[kept]


class ItemIndex:
    """Inner-product index keyed by item index (int64). Scores equal the encoder's training logits."""

    def __init__(self, dim: int, kind: IndexKind = "flat", index: faiss.Index | None = None) -> None:
        self.dim = dim
        self.kind = kind
        self._index = index if index is not None else self._empty(dim, kind)
        self._gpu_res: object | None = None
        # A small flat index on the CPU is searched as a dense table of the items that may be found, kept
        # while ``allowed`` stays the same (a catalogue changes far less often than a one-user search runs)
        self._dense: _DenseTable | None = None
        # Score in bfloat16 first, then settle in float32 (COARSE_ERROR): for CPUs that run bfloat16 natively
        self.coarse = False
        # How the bfloat16 search takes its block maxima: a ``CompiledMaxima`` where the encoder is compiled
        self.maxima: Maxima = block_maxima

    @staticmethod
    def _empty(dim: int, kind: IndexKind, nlist: int = 1) -> faiss.Index:
        if kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if kind == "hnsw":
            return faiss.IndexIDMap2(faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT))
        if kind == "ivf":
            quantizer = faiss.IndexFlatIP(dim)
            return faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        raise ValueError(f"unknown index kind {kind!r} (flat | hnsw | ivf)")

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, kind: IndexKind = "flat") -> ItemIndex:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        if kind == "ivf":
            # IVF needs enough points per list to train; a tiny catalogue gets an exact index instead.
            nlist = int(np.sqrt(len(vectors)))
            if nlist < 8:
                kind = "flat"
            else:
                index = cls._empty(dim, "ivf", nlist)
                index.train(vectors)
                faiss.extract_index_ivf(index).nprobe = max(1, nlist // 8)
                out = cls(dim, "ivf", index)
                out.add(vectors, ids)
                return out
        out = cls(dim, kind)
        if kind == "hnsw":
            hnsw: Any = faiss.downcast_index(faiss.downcast_index(out._index).index)  # type: ignore[attr-defined]
            hnsw.hnsw.efSearch = 128  # recall over speed: the catalogue index is small
        out.add(vectors, ids)
        return out

    def to_gpu_if_available(self) -> None:
        if self.kind == "flat" and _gpu_available():
            res = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(res, 0, self._index)
            self._gpu_res = res  # keep the GPU resources alive as long as the index

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self._index.add_with_ids(
            np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
        )
        self._dense = None

    def replace(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """New vectors for items the index holds (a rewritten item's): the old rows go, these take their
        ids. An HNSW graph cannot drop nodes, so it is built again from its vectors with these in place."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        leaving = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
        if self._gpu_res is not None:  # a GPU flat index cannot remove rows: replaced on the CPU
            resources: Any = self._gpu_res
            cpu = faiss.index_gpu_to_cpu(self._index)
            cpu.remove_ids(leaving)
            cpu.add_with_ids(vectors, ids)
            self._index = faiss.index_cpu_to_gpu(resources, 0, cpu)
        elif self.kind == "hnsw":
            mapped: Any = faiss.downcast_index(self._index)
            graph: Any = faiss.downcast_index(mapped.index)
            held_ids = faiss.vector_to_array(mapped.id_map)
            held = graph.reconstruct_n(0, graph.ntotal)
            row_of = {int(item): row for row, item in enumerate(held_ids)}
            held[[row_of[int(item)] for item in ids]] = vectors
            self._index = ItemIndex.build(held, held_ids, "hnsw")._index
        else:
            self._index.remove_ids(leaving)
            self._index.add_with_ids(vectors, ids)
        self._dense = None

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        excluded: Sequence[Collection[int]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item indices), both (n, k), best first; missing results have index -1. ``allowed``: a
        boolean per item index (True: may be found); items beyond its length are not found. ``excluded``: per
        query, item indices it may not find (a shopper's purchases), so that a query asks for k whatever
        their number: the dense table masks them in the scores, a FAISS index is searched wider and they are
        dropped."""
        k = max(1, min(k, self._index.ntotal))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._dense_search:
            return self._search_dense(queries, k, allowed, excluded)
        if excluded is not None and any(excluded):
            wide = min(self._index.ntotal, k + max(len(skip) for skip in excluded))
            return _drop_excluded(*self._search_faiss(queries, wide, allowed), excluded, k)
        return self._search_faiss(queries, k, allowed)

    def _search_faiss(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if allowed is None:
            return self._index.search(queries, k)
        bits = np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")
        selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))  # its size in bytes
        params: Any
        if self.kind == "hnsw":
            params = _faiss.SearchParametersHNSW(sel=selector, efSearch=128)
        elif self.kind == "ivf":
            params = _faiss.SearchParametersIVF(
                sel=selector, nprobe=faiss.extract_index_ivf(self._index).nprobe
            )
        else:
            params = _faiss.SearchParameters(sel=selector)
        return self._index.search(queries, k, params=params)

    @property
    def _dense_search(self) -> bool:
        return self.kind == "flat" and self._gpu_res is None and 0 < self._index.ntotal <= DENSE_MAX_ITEMS

    @property
    def search_method(self) -> str:
        """What answers ``search`` now: a torch matrix product and top-k for a small flat index on the CPU,
        else the FAISS index (its class, and its search parameters)."""
        if self._dense_search:
            if self.coarse:
                return "torch bfloat16 matmul, float32 rescoring + block-maxima top-k (exact)"
            return "torch matmul + block-maxima top-k (exact)"
        inner: Any = faiss.downcast_index(self._index)
        if isinstance(inner, faiss.IndexIDMap):
            inner = faiss.downcast_index(inner.index)
        name = f"FAISS {type(inner).__name__}"
        if self.kind == "hnsw":
            return f"{name} (M {inner.hnsw.nb_neighbors(1)}, efSearch {inner.hnsw.efSearch})"
        if self.kind == "ivf":
            return f"{name} ({inner.nlist} lists, {inner.nprobe} probed)"
        return f"{name} (exact)"

    def _search_dense(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        excluded: Sequence[Collection[int]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        table = self._dense_table(None if allowed is None else np.asarray(allowed, dtype=bool))
        masked = table.excluded_cells(excluded, len(queries))
        coarse = (
            table.coarse is not None
            and len(table.ids) >= 2 * BLOCK * (k + COARSE_BLOCKS + 1)
            and table.vectors.shape[1] <= COARSE_MAX_DIM
        )
        # The table holds only the allowed items (in whole blocks): k may be more than it has rows
        taken = min(k, len(table.ids))
        scores, found, unsettled = self._dense_pass(table, queries, taken, masked, coarse)
        if len(unsettled):
            # Searched again together: one float32 product for a few queries costs nearly what it costs for
            # a hundred (the table is read from memory either way)
            again = _rows_of(masked, unsettled, len(queries))
            scores[unsettled], found[unsettled], _ = self._dense_pass(
                table, queries[unsettled], taken, again, False
            )
        if taken < k:
            scores = np.pad(scores, ((0, 0), (0, k - taken)), constant_values=-np.inf)
            found = np.pad(found, ((0, 0), (0, k - taken)))
        found[~np.isfinite(scores)] = -1  # fewer allowed items than asked for: as FAISS answers
        return scores, found

    def _dense_pass(
        self,
        table: _DenseTable,
        queries: np.ndarray,
        k: int,
        masked: tuple[np.ndarray, np.ndarray] | None,
        coarse: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores and item indices of the best k, and (with ``coarse``) the queries left unsettled."""
        scores = np.empty((len(queries), k), dtype=np.float32)
        found = np.empty((len(queries), k), dtype=np.int64)
        unsettled: list[np.ndarray] = []
        step = max(1, DENSE_CHUNK_SCORES // len(table.ids))
        with torch.inference_mode():
            # One score matrix for every chunk: a fresh one per chunk came from new pages of memory, and their
            # first writes made the product cost half as much again (docs/performance.md, round 21).
            chunk_scores = torch.empty(min(step, len(queries)), len(table.ids))
            coarse_scores = torch.empty(chunk_scores.shape if coarse else 0, dtype=torch.bfloat16)
            for start in range(0, len(queries), step):
                chunk = torch.from_numpy(queries[start : start + step])
                cells = None
                if masked is not None:
                    lo, hi = np.searchsorted(masked[0], [start, start + step])
                    cells = (torch.from_numpy(masked[0][lo:hi] - start), torch.from_numpy(masked[1][lo:hi]))
                if coarse:
                    assert table.coarse is not None
                    values, at, settled = coarse_top_k(
                        chunk,
                        table.vectors,
                        table.coarse,
                        table.longest,
                        k,
                        chunk_scores,
                        coarse_scores,
                        partial(table.hide, cells),
                        self.maxima,
                    )
                    unsettled.append(start + np.flatnonzero(~settled.numpy()))
                else:
                    values, at = table.exact_top_k(chunk, k, chunk_scores, cells)
                scores[start : start + step] = values.numpy()
                found[start : start + step] = table.ids[at].numpy()
        return scores, found, np.concatenate(unsettled) if unsettled else np.zeros(0, dtype=np.int64)

    def _dense_table(self, allowed: np.ndarray | None) -> _DenseTable:
        """The dense table for ``allowed``: the one kept when it is the same, else a new one."""
        kept = self._dense
        if (
            kept is not None
            and (kept.coarse is not None) == self.coarse
            and (
                (allowed is None and kept.allowed is None)
                or (
                    allowed is not None and kept.allowed is not None and np.array_equal(kept.allowed, allowed)
                )
            )
        ):
            return kept
        mapped: Any = faiss.downcast_index(self._index)
        flat: Any = faiss.downcast_index(mapped.index)
        n = flat.ntotal
        vectors = faiss.rev_swig_ptr(flat.get_xb(), n * flat.d).reshape(n, flat.d)
        ids = faiss.vector_to_array(mapped.id_map)
        self._dense = _DenseTable.of(vectors, ids, allowed, self.coarse)
        return self._dense

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    def save(self, directory: Path, index_version: str) -> None:
        cpu = faiss.index_gpu_to_cpu(self._index) if self._gpu_res is not None else self._index
        faiss.write_index(cpu, str(directory / "index.faiss"))
        meta = {"index_version": index_version, "kind": self.kind, "dim": self.dim, "size": self.size}
        (directory / "index.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: Path) -> tuple[ItemIndex, str]:
        meta = json.loads((directory / "index.json").read_text())
        index = faiss.read_index(str(directory / "index.faiss"))
        return cls(int(meta["dim"]), meta["kind"], index), str(meta["index_version"])
