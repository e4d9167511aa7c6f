"""The per-user recommend() of round 1 (commit 2284c52), kept as the slow reference that the batched fast path
of streamrec.models.serving must equal: same items, scores, reasons, explanations and anchors."""

from __future__ import annotations

import numpy as np
import torch

from streamrec.models.data import PAD, Step
from streamrec.models.sequences import hidden_states, pad_batch
from streamrec.models.serving import Recommender
from streamrec.records import EventKind, RecommendedItem, UserState

_CLICK, _SEARCH, _PURCHASE = int(EventKind.CLICK), int(EventKind.SEARCH), int(EventKind.PURCHASE)


def _steps(rec: Recommender, user: UserState) -> list[Step]:
    steps: list[Step] = []
    for entry in reversed(user.history):
        if len(steps) >= rec.serve_len:
            break
        if entry.kind is EventKind.SEARCH:
            if entry.query:
                steps.append(Step(_SEARCH, PAD, entry.query))
        elif entry.item_id is not None:
            idx = rec._index_of.get(entry.item_id)
            if idx is not None:
                steps.append(Step(_PURCHASE if entry.kind is EventKind.PURCHASE else _CLICK, idx))
    steps.reverse()
    return steps


def _item(rec: Recommender, idx: int, score: float, steps: list[Step], position: int) -> RecommendedItem:
    item_id = rec._ids[idx - 1]
    anchor = steps[position]
    if anchor.item == PAD:
        q = anchor.query or ""
        return RecommendedItem(item_id, score, "matches_search", f"Matches your search '{q}'", q)
    title = rec._titles[anchor.item] or rec._ids[anchor.item - 1]
    anchor_id = rec._ids[anchor.item - 1]
    if anchor.kind == _PURCHASE:
        return RecommendedItem(
            item_id, score, "goes_with_purchase", f"Goes with {title} you bought", anchor_id
        )
    return RecommendedItem(item_id, score, "similar_to_recent", f"Because you viewed {title}", anchor_id)


def reference_recommend(rec: Recommender, users: list[UserState], k: int) -> list[list[RecommendedItem]]:
    steps = [_steps(rec, u) for u in users]
    warm = [i for i, s in enumerate(steps) if s]
    results: list[list[RecommendedItem]] = [[] for _ in users]
    excluded = [{rec._index_of[p] for p in u.purchased if p in rec._index_of} for u in users]
    if warm:
        warm_steps = [steps[i] for i in warm]
        queries = sorted({s.query for seq in warm_steps for s in seq if s.query is not None})
        qindex = {q: j + 1 for j, q in enumerate(queries)}
        qtable, qspace = rec._query_tables(queries)
        items, kinds, qids = pad_batch(warm_steps, rec.serve_len, qindex)
        length = items.shape[1]
        with torch.inference_mode():
            h = hidden_states(rec._model, items, kinds, qids, qtable, rec._vectors_t, last=True)
        user_vecs = h.float().cpu().numpy()
        n_out = int((~rec._in_stock[1:]).sum())
        most_excluded = max(len(excluded[i]) for i in warm)
        fetch = min(rec._index.size, k + most_excluded + min(n_out, 4 * k + 64) + 8)
        scores, found = rec._index.search(user_vecs, fetch)
        picked = np.full((len(warm), k), PAD, dtype=np.int64)
        picked_scores = np.zeros((len(warm), k), dtype=np.float32)
        out_of_stock = set(np.flatnonzero(~rec._in_stock).tolist())
        for row, (row_scores, row_found) in enumerate(zip(scores.tolist(), found.tolist(), strict=True)):
            skip = excluded[warm[row]]
            ranked = [
                (idx, score)
                for score, idx in zip(row_scores, row_found, strict=True)
                if idx > PAD and idx not in out_of_stock and idx not in skip
            ][:k]
            if ranked:
                picked[row, : len(ranked)] = [idx for idx, _ in ranked]
                picked_scores[row, : len(ranked)] = [score for _, score in ranked]
        anchors = rec._anchors(picked, items.numpy(), qids.numpy(), qspace)
        for row, (row_picked, row_scores, row_anchors) in enumerate(
            zip(picked.tolist(), picked_scores.tolist(), anchors.tolist(), strict=True)
        ):
            seq = warm_steps[row]
            shift = length - len(seq)
            results[warm[row]] = [
                _item(rec, idx, sc, seq, a - shift)
                for idx, sc, a in zip(row_picked, row_scores, row_anchors, strict=True)
                if idx != PAD
            ]
    for i in range(len(users)):
        if len(results[i]) < k:
            results[i].extend(rec._popular(k - len(results[i]), excluded[i], [r.item_id for r in results[i]]))
    return results
