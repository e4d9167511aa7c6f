"""Turning histories into encoder tensors: left-padded item/kind/query-index batches, and user vectors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from streamrec.models.data import PAD, Step
from streamrec.models.encoder import SequenceEncoder


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


def serving_vectors(
    model: SequenceEncoder,
    encoder: SequenceEncoder,
    items: torch.Tensor,
    kinds: torch.Tensor,
    qids: torch.Tensor,
    qtable: torch.Tensor | None,
    table: torch.Tensor,
) -> torch.Tensor:
    """The served user vectors, (B, dim) in float32: ``hidden_states(..., last=True)`` with the blocks run by
    ``encoder``, the model itself or a copy of it in another precision (``Recommender``'s bfloat16), in
    chunks of SERVING_CHUNK_USERS. Every batch, one user too, goes through ``encoder``: a user's vector must
    not depend on the batch it shares (`streamrec shadow` compares served lists exactly). ``table``: the
    item vectors in the encoder's precision; queries are projected by ``model`` and cast to it."""
    device = table.device
    items, kinds, qids = items.to(device), kinds.to(device), qids.to(device)
    qspace = None
    if qtable is not None and model.config.text_dim and qtable.shape[1] == model.config.text_dim:
        qspace = model.query_vectors(qtable.to(device)).to(table.dtype)
    out = torch.empty(len(items), model.config.dim, device=device)
    for start in range(0, len(items), SERVING_CHUNK_USERS):
        rows = slice(start, start + SERVING_CHUNK_USERS)
        qvecs = qspace[qids[rows]] if qspace is not None else None  # row 0, padding, is a zero vector
        out[rows] = encoder.encode_last(table[items[rows]], kinds[rows], qvecs)
    return out


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
