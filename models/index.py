"""The item index: maximum-inner-product search over item vectors with FAISS (flat, HNSW or IVF), on the GPU
when faiss-gpu and CUDA are available."""

from __future__ import annotations

import itertools
import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch

IndexKind = Literal["flat", "hnsw", "ivf"]
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


def _gpu_available() -> bool:
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except Exception:  # a CPU build without the symbol, or a broken driver: CPU it is
        return False


class ItemIndex:
    """Inner-product index keyed by item index (int64). Scores equal the encoder's training logits."""

    def __init__(self, dim: int, kind: IndexKind = "flat", index: faiss.Index | None = None) -> None:
        self.dim = dim
        self.kind = kind
        self._index = index if index is not None else self._empty(dim, kind)
        self._gpu_res: object | None = None
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None  # (vectors, ids) of a small flat index
        self._hidden: tuple[np.ndarray | None, torch.Tensor] | None = None  # the last allowed and its mask
        self._row_of = np.zeros(0, dtype=np.int64)  # item index -> the dense table's row (-1: none)

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
        self._dense = self._hidden = None
        self._row_of = np.zeros(0, dtype=np.int64)

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
        if self._dense is None:
            mapped: Any = faiss.downcast_index(self._index)
            flat: Any = faiss.downcast_index(mapped.index)
            n = flat.ntotal
            rows = -(-n // BLOCK) * BLOCK  # whole blocks: the last one padded with zero vectors, id -1
            stored = np.zeros((rows, flat.d), dtype=np.float32)
            stored[:n] = faiss.rev_swig_ptr(flat.get_xb(), n * flat.d).reshape(n, flat.d)
            padded_ids = np.full(rows, -1, dtype=np.int64)
            padded_ids[:n] = faiss.vector_to_array(mapped.id_map)
            self._dense = torch.from_numpy(stored), torch.from_numpy(padded_ids)
            self._row_of = np.full(int(padded_ids.max()) + 2, -1, dtype=np.int64)
            self._row_of[padded_ids[:n]] = np.arange(n)
        vectors, ids = self._dense
        hidden = self._hidden_rows(None if allowed is None else np.asarray(allowed, dtype=bool), ids)
        masked = self._excluded_cells(excluded, len(queries))
        scores = np.empty((len(queries), k), dtype=np.float32)
        found = np.empty((len(queries), k), dtype=np.int64)
        step = max(1, DENSE_CHUNK_SCORES // len(ids))
        with torch.inference_mode():
            # One score matrix for every chunk: a fresh one per chunk came from new pages of memory, and their
            # first writes made the product cost half as much again (docs/performance.md, round 21).
            chunk_scores = torch.empty(min(step, len(queries)), len(ids))
            for start in range(0, len(queries), step):
                chunk = torch.from_numpy(queries[start : start + step])
                product = torch.matmul(chunk, vectors.T, out=chunk_scores[: len(chunk)])
                product += hidden
                if masked is not None:
                    lo, hi = np.searchsorted(masked[0], [start, start + step])
                    cells = (torch.from_numpy(masked[0][lo:hi] - start), torch.from_numpy(masked[1][lo:hi]))
                    product[cells] = -torch.inf
                values, at = top_k(product, k)
                scores[start : start + step] = values.numpy()
                found[start : start + step] = ids[at].numpy()
        found[~np.isfinite(scores)] = -1  # fewer allowed items than asked for: as FAISS answers
        return scores, found

    def _excluded_cells(
        self, excluded: Sequence[Collection[int]] | None, n: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The score matrix's cells that ``excluded`` masks, as (query, table row) index arrays, queries in
        ascending order; None for none. Item indices the table lacks mask nothing."""
        if excluded is None or not any(excluded):
            return None
        if len(excluded) != n:
            raise ValueError(f"excluded has {len(excluded)} rows for {n} queries")
        lengths = np.fromiter(map(len, excluded), dtype=np.int64, count=n)
        items = np.fromiter(itertools.chain.from_iterable(excluded), dtype=np.int64, count=int(lengths.sum()))
        query = np.repeat(np.arange(n, dtype=np.int64), lengths)
        inside = (items >= 0) & (items < len(self._row_of))
        rows = np.full(len(items), -1, dtype=np.int64)
        rows[inside] = self._row_of[items[inside]]
        kept = rows >= 0
        return query[kept], rows[kept]

    def _hidden_rows(self, allowed: np.ndarray | None, ids: torch.Tensor) -> torch.Tensor:
        """-inf for each row of the dense table whose item may not be found (padding, or not ``allowed``),
        else 0: kept while ``allowed`` stays the same (a catalogue changes far less often than a one-user
        search runs: building it cost more than scoring one user)."""
        kept = self._hidden
        if kept is not None and (
            (allowed is None and kept[0] is None)
            or (allowed is not None and kept[0] is not None and np.array_equal(kept[0], allowed))
        ):
            return kept[1]
        rows = ids.numpy()
        ok = rows >= 0
        if allowed is not None:
            inside = ok & (rows < len(allowed))
            ok = np.zeros(len(rows), dtype=bool)
            ok[inside] = allowed[rows[inside]]
        hidden = torch.from_numpy(np.where(ok, 0.0, -np.inf).astype(np.float32))
        self._hidden = None if allowed is None else allowed.copy(), hidden
        return hidden

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
