"""Fine-tuning the served model on a recent window of behaviour, and judging it on the window's newest slice.

The window's events come in time order. Its newest ``eval_share`` is the temporal slice: it is never trained
on, and it scores both the candidate and the model it started from (its parent) on one item table, by
next-item prediction at every item event of the slice from the user's window before it (full ranking, seen
items excluded, HR@10, NDCG@10 and coverage). Items new since the parent was trained get rows in the item
table, set to the content vector the worker serves them with (their text through the parent's text tower,
scaled as serving scales it), so the parent is judged on them as it serves them and the candidate can
learn them. A candidate is promoted only if it beats its parent by the configured margin (``decide``).
"""

from __future__ import annotations

import copy
import random
import resource
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from streamrec.models import artifacts
from streamrec.models.data import PAD, Interactions, Step
from streamrec.models.encoder import SequenceEncoder
from streamrec.models.evaluate import evaluate_scorer
from streamrec.models.index import ItemIndex
from streamrec.models.sequences import query_table, user_vectors
from streamrec.models.text import TextEmbedder
from streamrec.models.train import (
    TrainConfig,
    build_model,
    length_batches,
    optimizer,
    resolve_device,
    seed_everything,
    text_digests,
    text_embedder,
    train_epoch,
    training_windows,
)
from streamrec.records import CatalogItem, Event, EventKind

METRICS = ("hr@10", "ndcg@10")


@dataclass
class TemporalData:
    """A window as training data: the item table (the parent's items first, in its order, then the new
    ones), each user's events before the slice, and the slice's cases (the user's window before an item
    event, and that item's index)."""

    item_ids: list[str]
    new_items: list[str]
    texts: dict[str, str]  # content text of the items the catalogue describes
    titles: dict[str, str]
    in_stock: dict[str, bool]
    train: dict[str, list[Step]]
    cases: dict[str, tuple[list[Step], int]]
    cut_time: int | None  # the slice starts at this event time (ms); None for an empty window
    counts: dict[str, int] = field(default_factory=dict)

    def interactions(self) -> Interactions:
        return Interactions(
            item_ids=self.item_ids, sequences=self.train, titles=self.titles, texts=self.texts
        )


def _step(event: Event, index: dict[str, int]) -> Step | None:
    if event.kind is EventKind.SEARCH:
        return Step(int(EventKind.SEARCH), PAD, event.query) if event.query else None
    idx = index.get(event.item_id or "")
    return Step(int(event.kind), idx) if idx else None


def temporal_split(
    events: Sequence[Event],
    known_items: Sequence[str],
    catalog: Mapping[str, CatalogItem],
    eval_share: float,
    max_cases: int,
    seed: int = 42,
) -> TemporalData:
    """``events`` in time order (oldest first). The newest ``eval_share`` of them (by count) is the slice;
    each of its clicks and purchases whose user has earlier events in the window is a case, at most
    ``max_cases`` of them (a seeded sample)."""
    known = set(known_items)
    new_items: list[str] = []
    for event in events:
        item = event.item_id
        if item is not None and item not in known:
            known.add(item)
            new_items.append(item)
    new_items += [i for i in catalog if i not in known]
    item_ids = [*known_items, *new_items]
    index = {item_id: i + 1 for i, item_id in enumerate(item_ids)}
    cut = min(len(events), int(len(events) * (1.0 - eval_share) + 0.5)) if events else 0
    sequences: dict[str, list[Step]] = {}
    train_len: dict[str, int] = {}
    at: list[tuple[str, int]] = []  # (user, position in the user's sequence) of every possible case
    for n, event in enumerate(events):
        step = _step(event, index)
        if step is None:
            continue
        seq = sequences.setdefault(event.user_id, [])
        if n < cut:
            train_len[event.user_id] = len(seq) + 1
        elif step.item != PAD and seq:
            at.append((event.user_id, len(seq)))
        seq.append(step)
    if len(at) > max_cases:
        at = sorted(random.Random(seed).sample(at, max_cases))
    cases = {f"{user}\x1f{pos}": (sequences[user][:pos], sequences[user][pos].item) for user, pos in at}
    train = {u: sequences[u][:n] for u, n in train_len.items()}
    return TemporalData(
        item_ids=item_ids,
        new_items=new_items,
        texts={i: c.text for i, c in catalog.items()},
        titles={i: c.title for i, c in catalog.items()},
        in_stock={i: c.in_stock for i, c in catalog.items()},
        train=train,
        cases=cases,
        cut_time=events[cut].timestamp if cut < len(events) else None,
        counts={
            "events": len(events),
            "train_events": cut,
            "slice_events": len(events) - cut,
            "users": len(sequences),
            "train_users": len(train),
            "cases": len(cases),
            "new_items": len(new_items),
        },
    )


def content_scale(model: SequenceEncoder) -> float:
    """How much longer a trained item vector is than its content part, on average: serving scales a new
    item's content vector by it (models/serving.py), and so do the rows made for new items here."""
    with torch.inference_mode():
        full = float(model.item_vectors()[1:].norm(dim=1).mean())
        content = float(model.content_vectors()[1:].norm(dim=1).mean())
    return full / content if content > 0 else 1.0


def expand(
    model: SequenceEncoder, embedder: TextEmbedder | None, new_texts: Sequence[str | None]
) -> SequenceEncoder:
    """A copy of ``model`` with rows for new items appended to its item table, each the content vector the
    worker serves that item with (its text through the text tower, scaled); items without text get zero
    rows, as serving gives them. Every other weight is the model's."""
    old = model.config
    n_new = len(new_texts)
    bigger = SequenceEncoder(replace(old, num_items=old.num_items + n_new))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key in ("item_id.weight", "item_text", "item_attrs"):
        table = state[key]
        state[key] = torch.cat([table, table.new_zeros((n_new, *table.shape[1:]))])
    bigger.load_state_dict(state)
    with_text = [(old.num_items + 1 + i, t) for i, t in enumerate(new_texts) if t]
    if with_text and embedder is not None and bigger.text_proj is not None:
        scale = content_scale(model)
        rows = torch.tensor([r for r, _ in with_text])
        vectors = torch.from_numpy(embedder.embed_items([t for _, t in with_text]).astype(np.float32))
        with torch.no_grad():
            bigger.item_text[rows] = vectors
            bigger.item_id.weight[rows] = (scale - 1.0) * bigger.text_proj(vectors)
    return bigger.eval()


def rewrite_texts(
    model: SequenceEncoder,
    embedder: TextEmbedder | None,
    parent: artifacts.ItemTable,
    texts: Mapping[str, str],
) -> list[str | None]:
    """The text rows of the parent's items whose catalogue text (``texts``) is not the one their row was
    embedded from (the parent's ``text_digests``), embedded again in ``model`` in place: what a worker does
    when it loads the parent and reads the catalogue (``Recommender.upsert_items``), so the parent is judged,
    and the candidate trained, on the descriptions the shop shows. The item tower is linear in the text row,
    so a trained item keeps its ID and attribute parts. Items the catalogue does not describe, and a model
    without digests (the first text a worker sees stands for its own), keep their rows. Returns the
    digests of the rows as they are now."""
    digests = list(parent.text_digests or [None] * len(parent.ids))
    if embedder is None or parent.text_digests is None or not model.config.text_dim:
        return digests
    rewritten = [
        (row, texts[i])
        for row, (i, d) in enumerate(zip(parent.ids, parent.text_digests, strict=True), start=1)
        if d is not None and i in texts and artifacts.text_digest(texts[i]) != d
    ]
    if rewritten:
        rows = torch.tensor([r for r, _ in rewritten])
        vectors = embedder.embed_items([t for _, t in rewritten]).astype(np.float32)
        with torch.no_grad():
            model.item_text[rows] = torch.from_numpy(vectors)
        for row, text in rewritten:
            digests[row - 1] = artifacts.text_digest(text)
    return digests


def fresh_weights(model: SequenceEncoder, seed: int) -> SequenceEncoder:
    """A full retrain's start: the same architecture and item content (texts, attributes), new weights."""
    torch.manual_seed(seed)
    fresh = SequenceEncoder(model.config)
    with torch.no_grad():
        fresh.item_text.copy_(model.item_text)
        fresh.item_attrs.copy_(model.item_attrs)
    return fresh


def score_slice(
    model: SequenceEncoder,
    cases: dict[str, tuple[list[Step], int]],
    qindex: dict[str, int],
    qtable: torch.Tensor | None,
) -> dict[str, float]:
    """HR@10/20, NDCG@10/20 and coverage@10 on the slice: full ranking, seen items excluded. Also
    ``kept_hr@10`` and ``kept_ndcg@10``, with the user's earlier items left in the ranking as the worker
    serves them (it excludes only purchases): on data where shoppers go back to what they saw (sessions),
    that is the figure live traffic judges."""
    model.eval()
    with torch.inference_mode():
        vecs = model.item_vectors()

    def score(seqs: Sequence[Sequence[Step]]) -> torch.Tensor:
        with torch.inference_mode():
            return user_vectors(model, seqs, qindex, qtable, item_vecs=vecs) @ vecs.T

    result = evaluate_scorer(score, cases, model.config.num_items, filter_seen=True)
    kept = evaluate_scorer(score, cases, model.config.num_items, filter_seen=False)
    result |= {f"kept_{m}": kept[m] for m in METRICS}
    return {k: round(float(v), 5) for k, v in result.items()}


@dataclass
class FineTuneResult:
    model: SequenceEncoder
    embedder: TextEmbedder | None
    config: TrainConfig
    mode: str  # fine_tune | full_retrain | first_model
    candidate: dict[str, float]  # on the slice
    parent: dict[str, float] | None  # the parent's, as it serves, on the same slice and item table
    report: dict[str, object]
    # what each item's text row was embedded from (``artifacts.ItemTable.text_digests``)
    text_digests: list[str | None] | None = None


def fine_tune(
    data: TemporalData,
    parent_dir: Path | None,
    config: TrainConfig,
    full_retrain: bool = False,
) -> FineTuneResult:
    """Train a candidate on ``data.train``: from the parent's weights (warm start), or from fresh weights of
    its architecture (``full_retrain``), or, without a parent, a first model of ``config``'s preset. Runs
    ``config.epochs`` passes over every window of the users' histories, or until ``config.max_minutes``."""
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    parent_model: SequenceEncoder | None = None
    if parent_dir is not None:
        art = artifacts.load(parent_dir)
        embedder = art.embedder
        start = expand(art.model, embedder, [data.texts.get(i) for i in data.new_items])
        # the parent's text rows, with the descriptions rewritten since embedded again (as a worker serving
        # the parent does), and the new items' catalogue texts
        parents = rewrite_texts(start, embedder, art.items, data.texts)
        news = [artifacts.text_digest(data.texts.get(i)) for i in data.new_items]
        digests = None if embedder is None else [*parents, *news]
        parent_model = copy.deepcopy(start)  # the parent as a worker serves it
        mode = "full_retrain" if full_retrain else "fine_tune"
        if full_retrain:
            start = fresh_weights(start, config.seed)
    else:
        mode = "first_model"
        embedder = text_embedder(data.interactions(), config)
        start = build_model(data.interactions(), config, embedder)
        digests = text_digests(data.interactions(), embedder)
    model = start.to(device)
    every = [*data.train.values(), *(prefix for prefix, _ in data.cases.values())]
    if embedder is not None:
        qindex, qtable = query_table(every, embedder.embed_queries)
        qtable = qtable.to(device)
    else:
        qindex, qtable = {}, None
    parent_metrics = None
    if parent_model is not None:
        parent_metrics = score_slice(parent_model.to(device), data.cases, qindex, qtable)
        del parent_model
    prepared = time.perf_counter()
    history = _train(model, list(data.train.values()), config, qindex, qtable, started=prepared)
    trained = time.perf_counter()
    candidate = score_slice(model, data.cases, qindex, qtable)
    model = model.cpu().eval()
    report: dict[str, object] = {
        "mode": mode,
        "epochs": history,
        "prepare_seconds": round(prepared - started, 2),
        "training_seconds": round(trained - prepared, 2),
        "seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(_cpu_seconds() - cpu_started, 2),
        "device": str(device),
    }
    return FineTuneResult(model, embedder, config, mode, candidate, parent_metrics, report, digests)


def _train(
    model: SequenceEncoder,
    seqs: list[list[Step]],
    config: TrainConfig,
    qindex: dict[str, int],
    qtable: torch.Tensor | None,
    started: float,
) -> list[dict[str, float]]:
    """Every window of every history (a short window of recent behaviour is all there is), in length
    batches, for ``config.epochs`` epochs or ``config.max_minutes``; no early stopping: the slice that
    judges the result must not choose it."""
    windows = training_windows(seqs, config.max_len, all_windows=True)
    if not windows:
        return []
    opt = optimizer(model, config)
    rng = random.Random(config.seed)
    stop_at = started + config.max_minutes * 60
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        batches = length_batches(windows, config.batch_size, rng)
        total, steps = train_epoch(model, opt, batches, qindex, qtable, None, config, stop_at)
        history.append({"epoch": epoch, "loss": round(total / max(steps, 1), 4), "steps": steps})
        if time.perf_counter() > stop_at:
            break
    model.eval()
    return history


def _cpu_seconds() -> float:
    """CPU time of this process and the threads it runs (torch's pool included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def decide(
    candidate: Mapping[str, float], parent: Mapping[str, float] | None, metric: str, margin: float
) -> tuple[bool, str]:
    """Promote only a candidate whose ``metric`` on the slice beats its parent's by ``margin`` (relative:
    0.02 = 2% better), and never on an empty slice. Returns (promote, the reason in words)."""
    if not candidate.get("users"):
        return False, "no evaluation cases in the newest slice of the window"
    ours = float(candidate[metric])
    if parent is None:
        return True, f"first model: {metric} {ours:.4f} on the slice"
    theirs = float(parent[metric])
    needed = theirs * (1.0 + margin)
    if ours > theirs and ours >= needed:
        gain = f"+{(ours / theirs - 1) * 100:.1f}%" if theirs > 0 else "from 0"
        return (
            True,
            f"{metric} {ours:.4f} beats the serving model's {theirs:.4f} ({gain}, margin {margin:.1%})",
        )
    return False, (
        f"{metric} {ours:.4f} does not beat the serving model's {theirs:.4f} by the {margin:.1%} margin "
        f"(needs more than {max(needed, theirs):.4f})"
    )


def save_candidate(
    out: Path,
    result: FineTuneResult,
    data: TemporalData,
    metadata: dict,
) -> Path:
    """The candidate's model directory, as ``train`` writes one (state_dict, JSON config, metadata, item
    table, popularity over the window's training events, the item index built from its vectors)."""
    out = Path(out)
    model = result.model.cpu().eval()
    counts = np.zeros(len(data.item_ids) + 1, dtype=np.float32)
    for seq in data.train.values():
        for s in seq:
            counts[s.item] += 1
    counts[PAD] = 0
    titles = [data.titles.get(i, i) for i in data.item_ids]
    in_stock = [data.in_stock.get(i, True) for i in data.item_ids]
    artifacts.save(
        out,
        model,
        asdict(result.config),
        metadata,
        artifacts.ItemTable(list(data.item_ids), titles, in_stock, result.text_digests),
        counts,
        result.embedder,
    )
    with torch.inference_mode():
        vecs = model.item_vectors()[1:].numpy()
    ItemIndex.build(vecs, np.arange(1, len(data.item_ids) + 1), result.config.index).save(
        out, metadata["index_version"]
    )
    return out
