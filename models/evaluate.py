"""Offline evaluation, leave-one-out with full ranking over all items: HR@k, NDCG@k, coverage, for the
encoder and for two baselines (most-popular and item-to-item co-occurrence)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from streamrec.models import artifacts
from streamrec.models.data import PAD, Interactions, Step, leave_one_out, load
from streamrec.models.item_map import Precision, model_serve_len
from streamrec.models.sequences import (
    CompiledEncoder,
    can_compile,
    pad_batch,
    query_table,
    seen_items,
    serving_vectors,
    user_vectors,
)

KS = (10, 20)
Scorer = Callable[[Sequence[Sequence[Step]]], torch.Tensor]  # histories -> (n, num_items + 1) scores


def ranks(
    scores: torch.Tensor, targets: torch.Tensor, exclude: Sequence[Sequence[int]] | None = None
) -> torch.Tensor:
    """0-based rank of each target among all real items. Ties go to the lower item index, so constant
    scores cannot flatter a model. Excluded (seen) items drop out of the ranking, the target included."""
    scores = scores.clone().float()
    scores[:, PAD] = -torch.inf
    if exclude is not None:
        for row, seen in enumerate(exclude):
            if seen:
                scores[row, torch.as_tensor(list(seen), dtype=torch.long)] = -torch.inf
    rows = torch.arange(len(targets))
    target_scores = scores[rows, targets].unsqueeze(1)
    higher = (scores > target_scores).sum(1)
    idx = torch.arange(scores.shape[1]).unsqueeze(0)
    tied_before = ((scores == target_scores) & (idx < targets.unsqueeze(1))).sum(1)
    rank = higher + tied_before
    # An excluded target can never be recommended: count it as a miss.
    rank[torch.isinf(target_scores.squeeze(1))] = scores.shape[1]
    return rank


def metrics_from_ranks(rank: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    out: dict[str, float] = {}
    r = rank.double()
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = float(hit.double().mean()) if len(r) else 0.0
        out[f"ndcg@{k}"] = float((hit.double() / torch.log2(r + 2)).mean()) if len(r) else 0.0
    return out


def evaluate_scorer(
    scorer: Scorer,
    cases: dict[str, tuple[list[Step], int]],
    num_items: int,
    filter_seen: bool = False,
    batch_size: int = 1024,
) -> dict[str, float]:
    users = list(cases)
    all_ranks = []
    recommended = np.zeros(num_items + 1, dtype=bool)
    for start in range(0, len(users), batch_size):
        batch = [cases[u] for u in users[start : start + batch_size]]
        seqs = [b[0] for b in batch]
        targets = torch.tensor([b[1] for b in batch], dtype=torch.long)
        scores = scorer(seqs).float().cpu().clone()  # out of inference mode: masked in place below
        exclude = [seen_items(s) for s in seqs] if filter_seen else None
        all_ranks.append(ranks(scores, targets, exclude))
        scores[:, PAD] = -torch.inf
        if exclude is not None:
            for row, seen in enumerate(exclude):
                if seen:
                    scores[row, torch.as_tensor(seen)] = -torch.inf
        recommended[scores.topk(min(10, num_items), dim=1).indices.numpy().ravel()] = True
    out = metrics_from_ranks(torch.cat(all_ranks) if all_ranks else torch.zeros(0))
    out["coverage@10"] = float(recommended[1:].sum() / max(num_items, 1))
    out["users"] = len(users)
    return out


def popularity_scorer(train: dict[str, list[Step]], num_items: int) -> Scorer:
    counts = np.zeros(num_items + 1, dtype=np.float32)
    for seq in train.values():
        for s in seq:
            counts[s.item] += 1
    counts[PAD] = 0
    row = torch.from_numpy(counts)
    return lambda seqs: row.unsqueeze(0).expand(len(seqs), -1)


def itemknn_scorer(train: dict[str, list[Step]], num_items: int, recent: int = 50) -> Scorer:
    """Cosine co-occurrence of items within users' training histories; a user's score for an item sums its
    similarity to the user's recent items."""
    rows, cols = [], []
    for u, seq in enumerate(train.values()):
        for item in set(seen_items(seq)):
            rows.append(u)
            cols.append(item)
    x = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(train), num_items + 1))
    co = (x.T @ x).tocsr()
    co.setdiag(0)
    norm = np.sqrt(np.asarray(x.sum(0)).ravel()) + 1e-9
    co = sp.diags(1 / norm) @ co @ sp.diags(1 / norm)
    co = co.tocsr().astype(np.float32)

    def score(seqs: Sequence[Sequence[Step]]) -> torch.Tensor:
        h_rows, h_cols = [], []
        for r, seq in enumerate(seqs):
            for item in set(seen_items(seq)[-recent:]):
                h_rows.append(r)
                h_cols.append(item)
        h = sp.csr_matrix(
            (np.ones(len(h_rows), dtype=np.float32), (h_rows, h_cols)), shape=(len(seqs), num_items + 1)
        )
        return torch.from_numpy(np.asarray((h @ co).todense()))

    return score


def model_scorer(art: artifacts.Artifacts, seqs_for_queries: Sequence[Sequence[Step]]) -> Scorer:
    model = art.model
    embed = art.embedder.embed_queries if art.embedder is not None else None
    qindex, qtable = query_table(seqs_for_queries, embed) if embed else ({}, None)
    with torch.inference_mode():
        vecs = model.item_vectors()

    def score(seqs: Sequence[Sequence[Step]]) -> torch.Tensor:
        with torch.inference_mode():
            return user_vectors(model, seqs, qindex, qtable, item_vecs=vecs) @ vecs.T

    return score


@dataclass
class ServedScorer:
    """``served_scorer``'s scorer, and the compiled encoder it tries first (None: not asked for, or no
    compiler here)."""

    score: Scorer
    compiled: CompiledEncoder | None

    def __call__(self, seqs: Sequence[Sequence[Step]]) -> torch.Tensor:
        return self.score(seqs)

    @property
    def served_compiled(self) -> bool:
        """Whether the compiled encoder answered: not when its compile failed and the eager one took over."""
        return self.compiled is not None and self.compiled.failed is None


def served_scorer(
    art: artifacts.Artifacts,
    seqs_for_queries: Sequence[Sequence[Step]],
    serve_len: int,
    dtype: torch.dtype,
    compile_encoder: bool = False,
) -> ServedScorer:
    """The model as the worker serves it (``Recommender``): the newest ``serve_len`` events only, the last
    position's vector through the encoder in ``dtype`` (``resolve_precision``'s), compiled if asked and
    possible here (``CompiledEncoder``, the ``serving_compile`` setting)."""
    from streamrec.models.serving import Recommender  # serving imports train, which imports us

    model = art.model
    encoder = Recommender.serving_encoder(model, dtype)
    device = next(model.parameters()).device
    compiled = CompiledEncoder(encoder) if compile_encoder and can_compile(device) else None
    embed = art.embedder.embed_queries if art.embedder is not None else None
    qindex, qtable = query_table(seqs_for_queries, embed) if embed else ({}, None)
    window = min(serve_len, model.config.max_len)
    with torch.inference_mode():
        vecs = model.item_vectors()
    table = vecs.to(dtype)

    def score(seqs: Sequence[Sequence[Step]]) -> torch.Tensor:
        items, kinds, qids = pad_batch([s[-window:] for s in seqs], window, qindex)
        with torch.inference_mode():
            return (
                serving_vectors(model, encoder, items, kinds, qids, qtable, table, window, compiled) @ vecs.T
            )

    return ServedScorer(score, compiled)


def _remap(data: Interactions, model_ids: list[str]) -> Interactions:
    """Express the dataset in the model's item indices (items the model never saw become padding)."""
    index = {item_id: i + 1 for i, item_id in enumerate(model_ids)}
    if data.item_ids == model_ids:
        return data
    to_model = [PAD] + [index.get(i, PAD) for i in data.item_ids]
    seqs = {
        u: [Step(s.kind, to_model[s.item], s.query) for s in seq if s.item != PAD or s.query is not None]
        for u, seq in data.sequences.items()
    }
    return Interactions(item_ids=model_ids, sequences=seqs, fingerprint=data.fingerprint, source=data.source)


def evaluate(
    data: Path | Interactions,
    model_dir: Path | None = None,
    baselines: Sequence[str] = ("popular", "itemknn"),
    filter_seen: bool = False,
    split: str = "test",
    device: str = "cpu",
    as_served: bool = True,
    serve_len: int | None = None,
    precision: Precision = "auto",
    compile_encoder: bool = False,
) -> dict[str, object]:
    """Metrics of the model (if given) and each baseline on the test (or valid) split, as one dict. With
    ``as_served``, also the model as the worker serves it (``served_scorer``: its serving window, the
    model's own unless ``serve_len`` is given, and precision) as ``model_as_served``, and what that costs
    in NDCG@10 against the full model (``served_ndcg_loss``, a share of the full model's)."""
    dataset = data if isinstance(data, Interactions) else load(Path(data))
    result: dict[str, object] = {
        "data": dataset.source,
        "data_fingerprint": dataset.fingerprint,
        "split": split,
        "protocol": "leave-one-out, full ranking over all items",
        "filter_seen": filter_seen,
    }
    art = artifacts.load(model_dir, device=device) if model_dir is not None else None
    if art is not None:
        dataset = _remap(dataset, art.items.ids)
    split_data = leave_one_out(dataset.sequences)
    cases = split_data.test if split == "test" else split_data.valid
    result["users"] = len(cases)
    result["items"] = dataset.num_items
    scorers: dict[str, Scorer] = {}
    if art is not None:
        scorers["model"] = model_scorer(art, [c[0] for c in cases.values()])
        if as_served:
            from streamrec.models.serving import resolve_precision  # serving imports train, which imports us

            dtype = resolve_precision(precision, torch.device(device))
            seqs = [c[0] for c in cases.values()]
            window = model_serve_len(art.metadata, art.config.max_len, serve_len)
            served = scorers["model_as_served"] = served_scorer(art, seqs, window, dtype, compile_encoder)
            result["served"] = {
                "serve_len": window,
                "precision": str(dtype).removeprefix("torch."),
                "compiled": False,  # whether the compiled encoder answered: known once it has
            }
        result["model_version"] = art.metadata.get("version")
    if "popular" in baselines:
        scorers["popular"] = popularity_scorer(split_data.train, dataset.num_items)
    if "itemknn" in baselines:
        scorers["itemknn"] = itemknn_scorer(split_data.train, dataset.num_items)
    for name, scorer in scorers.items():
        start = time.perf_counter()
        metrics = evaluate_scorer(scorer, cases, dataset.num_items, filter_seen=filter_seen)
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        result[name] = metrics
    if "model_as_served" in result:
        result["served"]["compiled"] = served.served_compiled  # type: ignore[index]
        full, as_served = result["model"]["ndcg@10"], result["model_as_served"]["ndcg@10"]  # type: ignore[index]
        result["served_ndcg_loss"] = round(1 - as_served / full, 4) if full else 0.0
    return result
