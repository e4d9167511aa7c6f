"""Serving cost of the models, measured without a broker: encoder and recommend() latency by batch size,
and item index build and query time and recall by catalogue size and index kind (random unit vectors)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from streamrec.models.encoder import EncoderConfig, SequenceEncoder
from streamrec.models.index import IndexKind, ItemIndex
from streamrec.models.serving import Recommender
from streamrec.records import UserState


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)


def recommend_timings(
    recommender: Recommender, users: Sequence[UserState], batch_sizes: Sequence[int], k: int = 10
) -> list[dict[str, Any]]:
    """recommend() for batches of real-looking users: total and per-phase milliseconds (median of runs)."""
    out = []
    for size in batch_sizes:
        batch = [users[i % len(users)] for i in range(size)]
        repeats = 5 if size <= 500 else 3
        phases: dict[str, list[float]] = {}
        total = []
        recommender.recommend(batch, k)
        for _ in range(repeats):
            started = time.perf_counter()
            recommender.recommend(batch, k)
            total.append(time.perf_counter() - started)
            for phase, seconds in recommender.last_timings.items():
                phases.setdefault(phase, []).append(seconds)
        total_ms = statistics.median(total) * 1000
        out.append(
            {
                "batch": size,
                "total_ms": round(total_ms, 3),
                "per_user_us": round(total_ms * 1000 / size, 1),
                **{f"{p}_ms": round(statistics.median(v) * 1000, 3) for p, v in phases.items()},
            }
        )
    return out


def encoder_timings(
    config: EncoderConfig,
    batch_sizes: Sequence[int],
    lengths: Sequence[int],
    device: torch.device,
    last_only: bool,
) -> list[dict[str, Any]]:
    """Encoder forward time for random inputs (weights need not be trained to be timed)."""
    torch.manual_seed(0)
    model = SequenceEncoder(config).to(device).eval()
    with torch.inference_mode():
        item_vecs = model.item_vectors()
    out = []
    for length in lengths:
        for size in batch_sizes:
            items = torch.randint(1, config.num_items + 1, (size, length), device=device)
            kinds = torch.ones(size, length, dtype=torch.long, device=device)

            def run(items: torch.Tensor = items, kinds: torch.Tensor = kinds) -> None:
                with torch.inference_mode():
                    if last_only:
                        model.encode_last(item_vecs[items], kinds)
                    else:
                        model.encode(item_vecs[items], kinds)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            ms = _median_ms(run, 5 if size <= 500 else 3)
            out.append({"batch": size, "length": length, "ms": ms, "per_user_us": round(ms * 1000 / size, 1)})
    return out


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The k best items (row numbers) of each query by inner product: a float64 numpy product and a full
    sort, sharing no code with any index, so recall measured against it can fail."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top k that the index found, over all queries."""
    hits = sum(len(set(f) & set(e)) for f, e in zip(found.tolist(), exact.tolist(), strict=True))
    return hits / exact.size


def index_timings(
    item_counts: Sequence[int],
    kinds: Sequence[IndexKind],
    batch_sizes: Sequence[int],
    dim: int = 64,
    k: int = 50,
    seed: int = 0,
    recall_queries: int = 200,
) -> list[dict[str, Any]]:
    """Build and query time per index kind and catalogue size, with recall@10 against an exact top 10
    computed by brute force in numpy (``exact_top_k``), and what answered the searches (``search``: a small
    flat index on the CPU is searched with a torch matrix product, not FAISS)."""
    rng = np.random.default_rng(seed)
    out = []
    for count in item_counts:
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = np.arange(1, count + 1, dtype=np.int64)
        queries = rng.standard_normal((max(batch_sizes), dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact = ids[exact_top_k(vectors, queries[:recall_queries], 10)]
        for kind in kinds:
            started = time.perf_counter()
            index = ItemIndex.build(vectors, ids, kind=kind)
            build_s = time.perf_counter() - started
            _, found = index.search(queries[:recall_queries], 10)
            row: dict[str, Any] = {
                "items": count,
                "kind": index.kind,
                "search": index.search_method,
                "build_s": round(build_s, 2),
                "recall_at_10": round(recall_at_k(found, exact), 4),
            }
            for size in batch_sizes:
                search = partial(index.search, queries[:size], k)
                ms = _median_ms(search, 5 if size <= 500 else 3)
                row[f"query_ms_batch_{size}"] = ms
            out.append(row)
    return out
