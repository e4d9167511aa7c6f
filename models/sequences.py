"""Turning histories into encoder tensors: left-padded item/kind/query-index batches, and user vectors."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from streamrec.models.data import PAD, Step
from streamrec.models.encoder import SequenceEncoder

log = logging.getLogger(__name__)

# encode_last's signature: (item vectors (B, L, dim), kinds (B, L), query vectors or None) -> (B, dim)
EncodeLast = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def pad_batch(
    seqs: Sequence[Sequence[Step]], max_len: int, query_index: dict[str, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(items, kinds, query ids), each (B, L) with L the longest kept sequence; newest event last."""
    length = max(1, min(max_len, max((len(s) for s in seqs), default=1)))
    items = np.zeros((len(seqs), length), dtype=np.int64)
    kinds = np.zeros((len(seqs), length), dtype=np.int64)
    queries = np.zeros((len(seqs), length), dtype=np.int64)
    for row, seq in enumerate(seqs):
        tail = seq[-length:]
        offset = length - len(tail)
        for col, step in enumerate(tail, start=offset):
            items[row, col] = step.item
            kinds[row, col] = step.kind
            if step.query is not None and query_index is not None:
                queries[row, col] = query_index.get(step.query, 0)
    return torch.from_numpy(items), torch.from_numpy(kinds), torch.from_numpy(queries)


def query_table(seqs: Sequence[Sequence[Step]], embed) -> tuple[dict[str, int], torch.Tensor]:
    """Every distinct query -> row of a text-vector table (row 0 = no query)."""
    queries = sorted({s.query for seq in seqs for s in seq if s.query is not None})
    index = {q: i + 1 for i, q in enumerate(queries)}
    if not queries:
        return index, torch.zeros(1, 1)
    vecs = embed(queries)
    table = np.zeros((len(queries) + 1, vecs.shape[1]), dtype=np.float32)
    table[1:] = vecs
    return index, torch.from_numpy(table)


def hidden_states(
    model: SequenceEncoder,
    items: torch.Tensor,
    kinds: torch.Tensor,
    qids: torch.Tensor,
    qtable: torch.Tensor | None,
    item_vecs: torch.Tensor,
    last: bool = False,
) -> torch.Tensor:
    """The encoder's hidden states (B, L, D); with ``last``, only the newest position's (B, D), computing only
    what it needs (serving)."""
    device = item_vecs.device
    items, kinds, qids = items.to(device), kinds.to(device), qids.to(device)
    qvecs = None
    if qtable is not None and model.config.text_dim and qtable.shape[1] == model.config.text_dim:
        qvecs = model.query_vectors(qtable.to(device))[qids]  # row 0, padding, is zero text: a zero vector
    encode = model.encode_last if last else model.encode
    return encode(item_vecs[items], kinds, qvecs)


# Users per encoder call at serving: a batch's intermediate tensors stay in the CPU's caches instead of
# streaming through memory (2,000 users of the Beauty model, one thread: 250 -> 140 us each in float32,
# 127 -> 71 in bfloat16, between 256 and 512 alike; 64 and less pay per-call overhead).
SERVING_CHUNK_USERS = 256
# The encoder's batch shapes at serving: a chunk's rows are padded up to the next of these, and its windows to
# one of ``window_buckets``' lengths, so that the encoder sees a few shapes, each built once (``warm_up``). In
# bfloat16 the CPU's kernels are built per shape on their first call: 15-45 ms more than the next call of the
# Beauty model for every new (users, window) pair (a ranking of 17 users: 33.7 ms the first time, 12.3 the
# next), which a worker at 1,000 events/s, whose micro-batches hold any number of users, paid again and again.
# At most half of a chunk's rows are padding (a copy of its first row), fewer above 16 users.
SERVING_ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, SERVING_CHUNK_USERS)


def row_bucket(rows: int) -> int:
    """The rows a chunk of ``rows`` users is padded to (``rows`` <= SERVING_CHUNK_USERS)."""
    return next(b for b in SERVING_ROW_BUCKETS if b >= rows)


# The shortest window a serving batch is trimmed to (see ``window_buckets``). Shorter is cheaper still
# (the production-shape model, compiled, one thread: 21 µs per user at 4 events, 15 at 2, 10 at 1), but a
# window of one event would be its own compiled graph, and two events' saving over four is small.
SHORTEST_WINDOW = 2


def window_buckets(window: int) -> tuple[int, ...]:
    """The window lengths a serving batch's users are encoded at: powers of two from SHORTEST_WINDOW below
    ``window``, then ``window``. A user is encoded at the shortest that holds their events, so the blocks
    do not run over padding: the encoder's work grows with the window (the production-shape model, compiled,
    one thread: 46 µs per user at 16 events, 31 at 8, 21 at 4; docs/performance.md, round 20), and a shop's
    active users include many with a few events (new users, first sessions)."""
    out = []
    length = SHORTEST_WINDOW
    while length < window:
        out.append(length)
        length *= 2
    return (*out, window)


# Through a ``CompiledEncoder``, a window length with fewer users than this in a batch is encoded with the
# next longer one: every encoder call costs ~1 ms however few users it holds (the production-shape model in
# bfloat16, compiled, one thread: 1.0-1.1 ms for one user; the linear layers' small products alone are
# ~30 µs each), more than what a short window saves for a few users (~25 µs each between 16 events and 4).
# A batch of 10 users in four lengths took 5.4 ms against 2.4 at one length; of 300, 17.4 against 20.8.
SERVING_MIN_GROUP = 64


def length_groups(events: torch.Tensor, window: int, min_group: int) -> list[tuple[torch.Tensor, int]]:
    """Per window length a batch's users are encoded at (``window_buckets``): (their rows, ascending; the
    length). A user's length is the shortest that holds their ``events``; with ``min_group`` > 1, a length
    held by fewer users than that (with those carried up to it) goes to the next longer one."""
    lengths = window_buckets(window)
    at = torch.bucketize(events, torch.tensor(lengths, device=events.device))
    if min_group > 1:
        counts = torch.bincount(at, minlength=len(lengths)).tolist()
        moved = list(range(len(lengths)))
        waiting: list[int] = []  # shorter lengths whose users wait to be encoded with a longer one
        for b in range(len(lengths)):
            waiting.append(b)
            if sum(counts[w] for w in waiting) >= min_group or b == len(lengths) - 1:
                for w in waiting:
                    moved[w] = b
                waiting = []
        at = torch.tensor(moved, device=events.device)[at]
    return [(torch.nonzero(at == b).flatten(), lengths[b]) for b in torch.unique(at).tolist()]


def can_compile(device: torch.device) -> bool:
    """Whether ``CompiledEncoder`` can be built here: torch.compile's CPU back-end (inductor) writes C++ and
    needs a compiler to build it; on a GPU it would need Triton, which the CPU wheels lack."""
    compiler = os.environ.get("CXX") or "g++"
    return device.type == "cpu" and any(shutil.which(c) for c in (compiler, "c++", "clang++"))


class CompiledEncoder:
    """``encoder.encode_last`` compiled with torch.compile, the batch dimension dynamic: inductor fuses the
    blocks' elementwise work (gates, SiLU, the residual adds, layer norms) into a few loops, where the eager
    encoder makes a pass over memory per operation (the production-shape model in bfloat16, one thread:
    49-60 against 69-79 us per user, docs/performance.md, round 19). Compiling takes ~22 s on 2 cores the
    first time (``warm_up`` does it), 7-9 s with inductor's disk cache from an earlier process. A compile
    that fails, then or at a new shape later, is logged once and the eager encoder answers from then on:
    compiling is a speed-up, never a reason to stop ranking."""

    def __init__(self, encoder: SequenceEncoder) -> None:
        self._eager: EncodeLast = encoder.encode_last
        self._compiled: EncodeLast = torch.compile(encoder.encode_last, dynamic=True)
        self.failed: str | None = None  # why the eager encoder answers, once compiling has failed

    def __call__(
        self, item_vecs: torch.Tensor, kinds: torch.Tensor, query_vecs: torch.Tensor | None
    ) -> torch.Tensor:
        if self.failed is None:
            try:
                # A fresh tensor: a view's base and an autograd key are guarded on, and would compile anew
                # for a batch whose kinds arrive as a slice, or made outside inference mode.
                return self._compiled(item_vecs, kinds.clone(), query_vecs)
            except Exception as exc:  # inductor's errors have no common base; any one means eager from now
                self.failed = f"{type(exc).__name__}: {str(exc)[:300]}"
                log.warning("compiling the serving encoder failed, serving it uncompiled: %s", self.failed)
        return self._eager(item_vecs, kinds, query_vecs)


def serving_vectors(
    model: SequenceEncoder,
    encoder: SequenceEncoder,
    items: torch.Tensor,
    kinds: torch.Tensor,
    qids: torch.Tensor,
    qtable: torch.Tensor | None,
    table: torch.Tensor,
    window: int | None = None,
    encode_last: EncodeLast | None = None,
) -> torch.Tensor:
    """The served user vectors, (B, dim) in float32: ``hidden_states(..., last=True)`` with the blocks run by
    ``encoder``, the model itself or a copy of it in another precision (``Recommender``'s bfloat16), in
    chunks of SERVING_CHUNK_USERS. Every batch, one user too, goes through ``encoder``: a user's vector must
    not depend on the batch it shares (`streamrec shadow` compares served lists exactly). The eager encoder
    gives the same bits in any batch; a ``CompiledEncoder``'s kernels round differently per batch shape, so
    through it a vector depends on the batch within bfloat16's rounding (lists, at near-ties). ``table``: the
    item vectors in the encoder's precision; queries are projected by ``model`` and cast to it.

    With ``window``, each user is encoded at the shortest of ``window_buckets(window)`` that holds their
    events (users grouped by it, input order kept within a group), their window left-padded to it, and
    every chunk's rows padded to a SERVING_ROW_BUCKETS size, so the encoder sees the shapes ``warm_up``
    built. Padding is masked: a user's vector is the same, up to float rounding, at any padded length.
    Through the eager encoder the length follows from the user's own events alone, so the bits do not
    depend on the batch; through a ``CompiledEncoder`` (whose bits depend on the batch already) a length
    with fewer than SERVING_MIN_GROUP users of the batch is encoded with a longer one (``length_groups``).
    ``encode_last``: what runs ``encoder``'s blocks (a ``CompiledEncoder`` of it); default,
    ``encoder.encode_last`` itself."""
    encode = encode_last or encoder.encode_last
    device = table.device
    items, kinds, qids = items.to(device), kinds.to(device), qids.to(device)
    if window is not None and items.shape[1] > window:
        raise ValueError(f"windows of {items.shape[1]} events for a serving window of {window}")
    if window is not None and items.shape[1] < window:
        pad = (window - items.shape[1], 0)
        items, kinds, qids = (nn.functional.pad(t, pad) for t in (items, kinds, qids))
    qspace = None
    if qtable is not None and model.config.text_dim and qtable.shape[1] == model.config.text_dim:
        qspace = model.query_vectors(qtable.to(device)).to(table.dtype)
    out = torch.empty(len(items), model.config.dim, device=device)
    if window is None:
        groups = [(torch.arange(len(items), device=device), items.shape[1])]
    else:
        # windows are left-padded: a user's events are the last (kinds > 0).sum() columns
        compiled = isinstance(encode_last, CompiledEncoder) and encode_last.failed is None
        min_group = SERVING_MIN_GROUP if compiled else 1
        groups = length_groups((kinds > 0).sum(dim=1), window, min_group)
    for members, length in groups:
        for start in range(0, len(members), SERVING_CHUNK_USERS):
            rows = members[start : start + SERVING_CHUNK_USERS]
            chunk_items, chunk_kinds, chunk_qids = (t[rows, -length:] for t in (items, kinds, qids))
            n = len(rows)
            if window is not None and (extra := row_bucket(n) - n):
                chunk_items, chunk_kinds, chunk_qids = (
                    torch.cat([t, t[:1].expand(extra, -1)]) for t in (chunk_items, chunk_kinds, chunk_qids)
                )
            qvecs = qspace[chunk_qids] if qspace is not None else None  # row 0, padding, is a zero vector
            out[rows] = encode(table[chunk_items], chunk_kinds, qvecs)[:n].to(out.dtype)
    return out


def warm_up(
    model: SequenceEncoder,
    encoder: SequenceEncoder,
    table: torch.Tensor,
    window: int,
    encode_last: EncodeLast | None = None,
) -> float:
    """Run ``encoder`` once at every serving shape (SERVING_ROW_BUCKETS users x ``window_buckets(window)``
    events), so that no ranking pays for building a shape's kernels (0.34 s per window length in bfloat16
    for the Beauty model, round 17), or, through a ``CompiledEncoder``, for compiling (a batch without
    searches and, with a text tower, one with them). Seconds taken."""
    start = time.perf_counter()
    qtables: list[torch.Tensor | None] = [None]
    if model.config.text_dim:
        qtables.append(torch.zeros(2, model.config.text_dim, device=table.device))
    with torch.inference_mode():
        for qtable in qtables:
            for length in reversed(window_buckets(window)):
                # Windows of exactly ``length`` events: each encoded at that length.
                ones = torch.ones(SERVING_CHUNK_USERS, window, dtype=torch.long)
                ones[:, : window - length] = 0
                # The largest first: a compiled graph, dynamic in the batch, covers all but one.
                for rows in (SERVING_CHUNK_USERS, *SERVING_ROW_BUCKETS):
                    r = ones[:rows]
                    serving_vectors(model, encoder, r, r, r * 0, qtable, table, window, encode_last)
    return time.perf_counter() - start


@torch.inference_mode()
def user_vectors(
    model: SequenceEncoder,
    seqs: Sequence[Sequence[Step]],
    qindex: dict[str, int],
    qtable: torch.Tensor | None,
    batch_size: int = 512,
    item_vecs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The encoder's last hidden state per sequence, in input order; batches grouped by length."""
    model.eval()
    if item_vecs is None:
        item_vecs = model.item_vectors()
    out = torch.zeros(len(seqs), model.config.dim, device=item_vecs.device)
    order = sorted(range(len(seqs)), key=lambda i: min(len(seqs[i]), model.config.max_len))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        items, kinds, qids = pad_batch([seqs[i] for i in rows], model.config.max_len, qindex)
        h = hidden_states(model, items, kinds, qids, qtable, item_vecs)
        out[torch.tensor(rows, device=out.device)] = h[:, -1]
    return out


def seen_items(seq: Sequence[Step]) -> list[int]:
    return [s.item for s in seq if s.item != PAD]
