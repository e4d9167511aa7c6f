"""The serving API the worker calls: load a model directory, keep the item index in step with the
catalogue, and turn a micro-batch of user states into ranked, explained recommendations
(one encoder call, one index search per batch)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch

from streamrec.models import artifacts
from streamrec.models.data import PAD, Step
from streamrec.models.index import ItemIndex
from streamrec.models.sequences import last_hidden_state, pad_batch
from streamrec.models.text import MiniLMEmbedder
from streamrec.models.train import resolve_device
from streamrec.records import CatalogItem, EventKind, RecommendedItem, UserState

_SEARCH, _PURCHASE = EventKind.SEARCH, EventKind.PURCHASE
_CLICK_INT, _SEARCH_INT, _PURCHASE_INT = int(EventKind.CLICK), int(EventKind.SEARCH), int(EventKind.PURCHASE)

# Newest events fed to the encoder at serve time: cost grows with the window, quality saturates.
DEFAULT_SERVE_LEN = 16


class Recommender:
    """Thread-safe: ``recommend`` and ``upsert_items`` may run in different threads (one lock; upserts do
    their slow text embedding before taking it)."""

    model_version: str
    index_version: str

    def __init__(
        self,
        art: artifacts.Artifacts,
        index: ItemIndex,
        index_version: str,
        device: torch.device,
        serve_len: int,
    ) -> None:
        self._model = art.model.to(device).eval()
        self._device = device
        self._embedder = art.embedder
        self.model_version = str(art.metadata.get("version", "unversioned"))
        self._base_index_version = index_version
        self.index_version = index_version
        self._upserts = 0
        self.serve_len = min(serve_len, art.config.max_len)
        self._ids: list[str] = list(art.items.ids)
        self._index_of = {item_id: i + 1 for i, item_id in enumerate(self._ids)}
        self._titles: list[str] = [""] + list(art.items.titles)
        self._in_stock = np.array([False] + list(art.items.in_stock), dtype=bool)
        with torch.inference_mode():
            vecs = self._model.item_vectors()
        self._vectors = vecs.cpu().numpy().astype(np.float32)
        self._vectors_t = vecs
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
        self._lock = threading.RLock()
        self.last_timings: dict[str, float] = {}  # seconds per phase of the last recommend() call

    # --- loading --------------------------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: Path, device: str = "auto", serve_len: int = DEFAULT_SERVE_LEN) -> Recommender:
        dev = resolve_device(device)
        art = artifacts.load(Path(model_dir), device=str(dev))
        index, index_version = ItemIndex.load(Path(model_dir))
        if isinstance(art.embedder, MiniLMEmbedder):
            art.embedder.warm()
        index.to_gpu_if_available() if dev.type == "cuda" else None
        return cls(art, index, index_version, dev, serve_len)

    def _rank_popular(self) -> np.ndarray:
        order = np.argsort(-self._popularity, kind="stable")
        return order[order != PAD]

    # --- catalogue ------------------------------------------------------------------------------------
    def knows_item(self, item_id: str) -> bool:
        return item_id in self._index_of

    @property
    def num_items(self) -> int:
        return len(self._ids)

    def item_vector(self, item_id: str) -> np.ndarray:
        return self._vectors[self._index_of[item_id]].copy()

    def _content_vectors(self, items: list[CatalogItem]) -> np.ndarray:
        """Cold start: a new item is its content (text through the model's text projection), no ID part."""
        dim = self._model.config.dim
        if not items or self._embedder is None or not self._model.config.text_dim:
            return np.zeros((len(items), dim), dtype=np.float32)
        text = torch.from_numpy(self._embedder.embed_items([i.text for i in items])).to(self._device)
        with torch.inference_mode():
            content = self._model.query_vectors(text) * self._content_scale
        return content.cpu().numpy().astype(np.float32)

    def upsert_items(self, items: list[CatalogItem]) -> None:
        known = [i for i in items if i.item_id in self._index_of]
        fresh: dict[str, CatalogItem] = {}
        for item in items:
            if item.item_id not in self._index_of:
                fresh[item.item_id] = item  # last write of a batch wins
        new_items = list(fresh.values())
        vectors = self._content_vectors(new_items)  # slow part, outside the lock
        with self._lock:
            for item in known:
                idx = self._index_of[item.item_id]
                self._titles[idx] = item.title
                self._in_stock[idx] = bool(item.in_stock)
            new_items = [i for i in new_items if i.item_id not in self._index_of]
            if new_items:
                vectors = vectors[-len(new_items) :] if len(vectors) != len(new_items) else vectors
                first = len(self._vectors)
                ids = np.arange(first, first + len(new_items), dtype=np.int64)
                for item in new_items:
                    self._ids.append(item.item_id)
                    self._titles.append(item.title)
                    self._index_of[item.item_id] = len(self._ids)
                # Swap-on-write for the arrays recommend() reads.
                self._in_stock = np.concatenate([self._in_stock, [bool(i.in_stock) for i in new_items]])
                self._vectors = np.concatenate([self._vectors, vectors])
                self._vectors_t = torch.from_numpy(self._vectors).to(self._device)
                self._unit = _unit(self._vectors)
                self._popularity = np.concatenate([self._popularity, np.zeros(len(new_items), np.float32)])
                self._popular_order = self._rank_popular()
                self._index.add(vectors, ids)
            self._upserts += 1
            self.index_version = f"{self._base_index_version}+{self._upserts}"

    # --- recommending ---------------------------------------------------------------------------------
    def _steps(self, user: UserState) -> list[Step]:
        # Runs for every changed user in every micro-batch: locals and plain ints, no enum lookups.
        steps: list[Step] = []
        index_of, limit = self._index_of, self.serve_len
        for entry in reversed(user.history):
            if len(steps) >= limit:
                break
            kind = entry.kind
            if kind is _SEARCH:
                if entry.query:
                    steps.append(Step(_SEARCH_INT, PAD, entry.query))
            elif entry.item_id is not None:
                idx = index_of.get(entry.item_id)
                if idx is not None:
                    steps.append(Step(_PURCHASE_INT if kind is _PURCHASE else _CLICK_INT, idx))
        steps.reverse()
        return steps

    def recommend(self, users: list[UserState], k: int) -> list[list[RecommendedItem]]:
        """Top-k per user, in input order: one encoder call and one index search for the whole batch."""
        if not users:
            return []
        with self._lock:
            return self._recommend(users, k)

    def _recommend(self, users: list[UserState], k: int) -> list[list[RecommendedItem]]:
        clock = time.perf_counter
        t0 = clock()
        steps = [self._steps(u) for u in users]
        warm = [i for i, s in enumerate(steps) if s]
        results: list[list[RecommendedItem]] = [[] for _ in users]
        excluded = [{self._index_of[p] for p in u.purchased if p in self._index_of} for u in users]
        if warm:
            warm_steps = [steps[i] for i in warm]
            queries = sorted({s.query for seq in warm_steps for s in seq if s.query is not None})
            qindex = {q: j + 1 for j, q in enumerate(queries)}
            qtable = None
            qspace = np.zeros((len(queries) + 1, self._model.config.dim), dtype=np.float32)
            if queries and self._embedder is not None and self._model.config.text_dim:
                text = np.zeros((len(queries) + 1, self._model.config.text_dim), dtype=np.float32)
                text[1:] = self._embedder.embed_queries(queries)
                qtable = torch.from_numpy(text).to(self._device)
                with torch.inference_mode():
                    qspace = self._model.query_vectors(qtable).cpu().numpy()
            items, kinds, qids = pad_batch(warm_steps, self.serve_len, qindex)
            length = items.shape[1]
            t1 = clock()
            with torch.inference_mode():
                h = last_hidden_state(self._model, items, kinds, qids, qtable, self._vectors_t)
            user_vecs = h.float().cpu().numpy()
            t2 = clock()
            n_out = int((~self._in_stock[1:]).sum())
            most_excluded = max(len(excluded[i]) for i in warm)
            fetch = min(self._index.size, k + most_excluded + min(n_out, 4 * k + 64) + 8)
            scores, found = self._index.search(user_vecs, fetch)
            t3 = clock()
            picked = np.full((len(warm), k), PAD, dtype=np.int64)
            picked_scores = np.zeros((len(warm), k), dtype=np.float32)
            out_of_stock = set(np.flatnonzero(~self._in_stock).tolist())  # includes PAD (0)
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
            anchors = self._anchors(picked, items.numpy(), qids.numpy(), qspace)
            for row, (row_picked, row_scores, row_anchors) in enumerate(
                zip(picked.tolist(), picked_scores.tolist(), anchors.tolist(), strict=True)
            ):
                seq = warm_steps[row]
                shift = length - len(seq)
                results[warm[row]] = [
                    self._item(idx, sc, seq, a - shift)
                    for idx, sc, a in zip(row_picked, row_scores, row_anchors, strict=True)
                    if idx != PAD
                ]
            t4 = clock()
            self.last_timings = {"inputs": t1 - t0, "encoder": t2 - t1, "search": t3 - t2, "rank": t4 - t3}
        for i in range(len(users)):
            if len(results[i]) < k:
                results[i].extend(self._popular(k - len(results[i]), excluded[i], results[i]))
        return results

    def _anchors(
        self, picked: np.ndarray, items: np.ndarray, qids: np.ndarray, qspace: np.ndarray
    ) -> np.ndarray:
        """For every recommended item, the position of the history element (item or query) most similar to it
        in embedding space, for the whole batch at once: (users, k) positions into the padded history."""
        unit = self._unit
        qunit = qspace / (np.linalg.norm(qspace, axis=1, keepdims=True) + 1e-9)
        history = np.where((items > PAD)[..., None], unit[items], qunit[qids])  # (n, L, d)
        sims = np.einsum("nkd,nld->nkl", unit[picked], history)
        sims[np.broadcast_to(((items == PAD) & (qids == 0))[:, None, :], sims.shape)] = -np.inf
        # Among equally similar anchors prefer the newest: it is what the user is doing now.
        return sims.shape[2] - 1 - np.argmax(sims[:, :, ::-1], axis=2)

    def _item(self, idx: int, score: float, steps: list[Step], position: int) -> RecommendedItem:
        item_id = self._ids[idx - 1]
        anchor = steps[position]
        if anchor.item == PAD:
            q = anchor.query or ""
            return RecommendedItem(item_id, score, "matches_search", f"Matches your search '{q}'", q)
        title = self._titles[anchor.item] or self._ids[anchor.item - 1]
        anchor_id = self._ids[anchor.item - 1]
        if anchor.kind == _PURCHASE_INT:
            explanation = f"Goes with {title} you bought"
            return RecommendedItem(item_id, score, "goes_with_purchase", explanation, anchor_id)
        return RecommendedItem(item_id, score, "similar_to_recent", f"Because you viewed {title}", anchor_id)

    def _popular(self, n: int, excluded: set[int], already: list[RecommendedItem]) -> list[RecommendedItem]:
        taken = {r.item_id for r in already}
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


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-9)
