"""The per-user recommend() of round 1 (commit 2284c52), kept as the slow reference that the batched fast path
of streamrec.models.serving must equal: same items, scores, reasons, explanations and anchors. Search
steering (issue 26, ``SearchSteering``) is written here as a walk over each user's k slots."""

from __future__ import annotations

import numpy as np
import torch

from streamrec.models.data import PAD, Step
from streamrec.models.sequences import hidden_states, pad_batch, window_buckets
from streamrec.models.serving import Recommender
from streamrec.records import EventKind, RecommendedItem, UserState

_CLICK, _SEARCH, _PURCHASE = int(EventKind.CLICK), int(EventKind.SEARCH), int(EventKind.PURCHASE)

Candidate = tuple[int, float]  # (item index, score)


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
        return _search_item(rec, idx, score, anchor.query or "")
    title = rec._titles[anchor.item] or rec._ids[anchor.item - 1]
    anchor_id = rec._ids[anchor.item - 1]
    if anchor.kind == _PURCHASE:
        return RecommendedItem(
            item_id, score, "goes_with_purchase", f"Goes with {title} you bought", anchor_id
        )
    return RecommendedItem(item_id, score, "similar_to_recent", f"Because you viewed {title}", anchor_id)


def _search_item(rec: Recommender, idx: int, score: float, query: str) -> RecommendedItem:
    return RecommendedItem(
        rec._ids[idx - 1], score, "matches_search", f"Matches your search '{query}'", query
    )


def _steering_query(rec: Recommender, steps: list[Step], with_text: set[str]) -> str | None:
    """The newest search among the user's newest ``recent`` steps, if its query has a text vector."""
    if rec.search_steering.share <= 0 or rec._text_index is None:
        return None
    for step in reversed(steps[-rec.search_steering.recent :]):
        if step.kind == _SEARCH:
            return step.query if step.query in with_text else None
    return None


def _query_candidates(
    rec: Recommender, queries: set[str], qindex: dict[str, int], qtext: np.ndarray, fetch: int
) -> dict[str, list[Candidate]]:
    """Each steering query's most similar item texts, best first, all of them in one index search. Asked
    as the fast path asks (the same fetch, recommendable items only): items of the same text tie, and which
    of them a longer or unmasked search returns first is arbitrary."""
    if not queries or rec._text_index is None:
        return {}
    ordered = sorted(queries)
    vectors = np.stack([qtext[qindex[q]] for q in ordered])
    scores, found = rec._text_index.search(vectors, fetch, rec._in_stock)
    return {
        q: list(zip(row_found, row_scores, strict=True))
        for q, row_found, row_scores in zip(ordered, found.tolist(), scores.tolist(), strict=True)
    }


def _steered(
    rec: Recommender, ranked: list[Candidate], nearest: list[Candidate], user: np.ndarray, k: int
) -> list[tuple[Candidate, bool]]:
    """Slot by slot: the query's slots take its matches (of its nearest pool x k recommendable texts, those
    alike enough and not among the encoder's kept picks, its first k - slots) in the order of the user's
    scores, the other slots the encoder's picks in order; a list that runs out leaves its slots to the
    other. Per filled slot, the pick (with the user's score) and whether it is the query's."""
    slots = rec.search_steering.slots(k)
    kept = {idx for idx, _ in ranked[: k - slots]}
    alike = rec.search_steering.min_similarity
    pool = nearest[: rec.search_steering.pool * k]
    matches = [idx for idx, similarity in pool if idx not in kept and similarity >= alike]
    mine = (rec._vectors[matches] * user).sum(axis=1).tolist() if matches else []
    queue = sorted(zip(matches, mine, strict=True), key=lambda match: -match[1])[:slots]
    taken = {idx for idx, _ in queue}
    picks = [r for r in ranked if r[0] not in taken]
    out: list[tuple[Candidate, bool]] = []
    for slot in range(k):
        query_slot = (slot + 1) * slots // k > slot * slots // k
        if queue and (query_slot or not picks):
            out.append((queue.pop(0), True))
        elif picks:
            out.append((picks.pop(0), False))
    return out


def reference_recommend(rec: Recommender, users: list[UserState], k: int) -> list[list[RecommendedItem]]:
    steps = [_steps(rec, u) for u in users]
    warm = [i for i, s in enumerate(steps) if s]
    results: list[list[RecommendedItem]] = [[] for _ in users]
    excluded = [{rec._index_of[p] for p in u.purchased if p in rec._index_of} for u in users]
    if warm:
        warm_steps = [steps[i] for i in warm]
        queries = sorted({s.query for seq in warm_steps for s in seq if s.query is not None})
        qindex = {q: j + 1 for j, q in enumerate(queries)}
        qtable, qspace, qtext = rec._query_tables(queries)
        items, kinds, qids = pad_batch(warm_steps, rec.serve_len, qindex)
        # every window as long as the serving window, as served (the padding is masked) ...
        pad = (rec.serve_len - items.shape[1], 0)
        items, kinds, qids = (torch.nn.functional.pad(t, pad) for t in (items, kinds, qids))
        length = items.shape[1]
        # ... and encoded at the shortest serving length that holds their events: users of one length together
        cuts = [next(b for b in window_buckets(rec.serve_len) if b >= int((row > 0).sum())) for row in kinds]
        h = torch.zeros(len(warm), rec._model.config.dim)
        with torch.inference_mode():
            for cut in set(cuts):
                rows = torch.tensor([r for r, c in enumerate(cuts) if c == cut])
                some = [t[rows, length - cut :] for t in (items, kinds, qids)]
                h[rows] = hidden_states(rec._model, *some, qtable, rec._vectors_t, last=True).float()
        user_vecs = h.cpu().numpy()
        n_out = int((~rec._in_stock[1:]).sum())
        most_excluded = max(len(excluded[i]) for i in warm)
        fetch = min(rec._index.size, k + most_excluded + min(n_out, 4 * k + 64) + 8)
        scores, found = rec._index.search(user_vecs, fetch)
        with_text = {q for q, j in qindex.items() if qtext[j].any()}
        steering = [_steering_query(rec, seq, with_text) for seq in warm_steps]
        steered = [excluded[u] for u, q in zip(warm, steering, strict=True) if q]
        pool = rec.search_steering.pool * k
        text_fetch = (
            min(rec._text_index.size, pool + max(map(len, steered))) if steered and rec._text_index else 0
        )
        candidates = _query_candidates(rec, {q for q in steering if q}, qindex, qtext, text_fetch)
        out_of_stock = set(np.flatnonzero(~rec._in_stock).tolist())
        rows: list[list[tuple[Candidate, bool]]] = []
        for row, (row_scores, row_found) in enumerate(zip(scores.tolist(), found.tolist(), strict=True)):
            skip = excluded[warm[row]]

            def usable(found_scores: list[Candidate], skip: set[int] = skip) -> list[Candidate]:
                return [
                    (i, s) for i, s in found_scores if i > PAD and i not in out_of_stock and i not in skip
                ]

            ranked = usable(list(zip(row_found, row_scores, strict=True)))[:k]
            query = steering[row]
            if query is None or not rec.search_steering.slots(k):
                rows.append([(pick, False) for pick in ranked])
            else:
                rows.append(_steered(rec, ranked, usable(candidates[query]), user_vecs[row], k))
        picked = np.full((len(warm), k), PAD, dtype=np.int64)
        for row, slots in enumerate(rows):
            picked[row, : len(slots)] = [idx for (idx, _), _ in slots]
        anchors = rec._anchors(picked, items.numpy(), qids.numpy(), qspace)
        for row, (slots, row_anchors) in enumerate(zip(rows, anchors.tolist(), strict=True)):
            seq = warm_steps[row]
            shift = length - len(seq)
            results[warm[row]] = [
                _search_item(rec, idx, score, steering[row] or "")
                if from_query
                else _item(rec, idx, score, seq, a - shift)
                for ((idx, score), from_query), a in zip(slots, row_anchors, strict=False)
            ]
    for i in range(len(users)):
        if len(results[i]) < k:
            results[i].extend(rec._popular(k - len(results[i]), excluded[i], [r.item_id for r in results[i]]))
    return results
