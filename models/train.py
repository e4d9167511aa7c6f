"""Training the sequence encoder: next-item prediction with full softmax cross-entropy over all items,
batches grouped by length, early stopping on validation NDCG@10, and a versioned model directory as output."""

from __future__ import annotations

import copy
import logging
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from streamrec.models import artifacts, registry
from streamrec.models.data import PAD, Interactions, Split, Step, leave_one_out, load
from streamrec.models.encoder import EncoderConfig, SequenceEncoder
from streamrec.models.evaluate import evaluate_scorer
from streamrec.models.index import IndexKind, ItemIndex
from streamrec.models.item_map import DEFAULT_SERVE_LEN
from streamrec.models.sequences import hidden_states, pad_batch, query_table, user_vectors
from streamrec.models.text import TextEmbedder, make_embedder

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    # The newest events per user that workers encode to serve this model (at most max_len; written to its
    # metadata, ``item_map.model_serve_len``): the encoder's cost per user grows with it
    serve_len: int = DEFAULT_SERVE_LEN
    dropout: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 0.0  # AdamW's decoupled decay of every weight, per step times lr
    batch_size: int = 128
    epochs: int = 200
    patience: int = 5  # epochs without validation improvement before stopping
    max_minutes: float = 25.0
    seed: int = 42
    text: str = "auto"  # auto (minilm when items have text) | minilm | hashing | none
    use_attributes: bool = True
    id_dropout: float = 0.1
    gated: bool = False  # LiGR-style gated residuals (see EncoderConfig.gated)
    ff: str = "gelu"  # feed-forward: gelu | swiglu (see EncoderConfig.ff)
    clip_norm: float = 0.0  # clip the gradient's global norm to this (0 = no clipping)
    # Multiply the learning rate by lr_decay after lr_decay_patience epochs without a validation gain
    # (1 = off)
    lr_decay: float = 1.0
    lr_decay_patience: int = 1
    # Train on a long history's older events too, as further max_len + 1 windows (False: only the newest
    # window, as SASRec does)
    all_windows: bool = False
    # Train on every prefix of each history (sub-sequence splitting, as BSARec's and DuoRec's trainers do):
    # a window ending at each event, its loss on its last position only, which is where serving predicts
    # (the newest event always sits at the last position). Every event after a history's first is a target
    # once; an epoch has about as many windows as events. The default recipe's for short histories.
    prefixes: bool = False
    negatives: int = 0  # 0 = full softmax over all items; n = sampled softmax with n shared uniform negatives
    # Train for new items, as the seen-excluded protocol measures: a target already in its window's prefix
    # is no training target, the prefix's items are no negatives for its positions, and early stopping
    # reads validation with seen items excluded.
    novel_only: bool = False
    # Matrix products of the training step in bfloat16 (autocast over the encoder, bf16 logits products in
    # the loss); weights, optimiser, softmax and loss stay fp32 and validation runs in fp32.
    bf16: bool = False
    index: IndexKind = "flat"
    device: str = "auto"
    threads: int = 2
    eval_users: int = 0  # validation users per epoch (0 = all)
    # Validate and keep an exponential moving average of the weights (this decay per step; 0 = off): the
    # raw weights' validation swings from epoch to epoch with the sampled negatives' noise. Training from
    # scratch only: a fine-tuning run's few hundred steps would leave the average near its parent
    ema: float = 0.0

    @classmethod
    def preset(cls, name: str, **overrides: object) -> TrainConfig:
        base = PRESETS[name]
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]

    @classmethod
    def for_data(cls, data: Interactions, **overrides: object) -> TrainConfig:
        """The default recipe: the full preset with the settings ``recipe`` picks for this data's shape;
        ``overrides`` (None: not given) win."""
        chosen = recipe(DataShape.of(data), native_bf16())
        return cls.preset("full", **(chosen | {k: v for k, v in overrides.items() if v is not None}))

    @classmethod
    def from_json(cls, raw: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @property
    def serving_window(self) -> int:
        """What the model's metadata names as its serving window (``serve_len``): at most ``max_len``."""
        return min(self.serve_len, self.max_len)


# LiGR-style blocks (gated residuals, SwiGLU) with clipped gradients, the base of the small and full
# presets: on Amazon Beauty, valid NDCG@10 .0468 -> .0494 and test (seen excluded) .0879/.0505 ->
# .0910/.0526 against plain GPT-2 blocks (models/MODEL_CARD.md).
_LIGR = TrainConfig(gated=True, ff="swiglu", clip_norm=1.0)

PRESETS: dict[str, TrainConfig] = {
    # Seconds on CPU: tests and the demo. Hashing text keeps MiniLM out of the loop.
    "tiny": TrainConfig(
        dim=32,
        layers=1,
        heads=1,
        max_len=20,
        dropout=0.1,
        lr=5e-3,
        epochs=15,
        patience=5,
        max_minutes=1.0,
        text="hashing",
        eval_users=2000,
    ),  # fmt: skip
    "small": replace(_LIGR, dropout=0.3, epochs=40, max_minutes=5.0),
    "full": _LIGR,
}


# --- the default recipe: settings picked from the data's shape ---------------------------------------------
# `streamrec train --data D` with no options trains with ``TrainConfig.for_data``: the full preset plus
# what the probes on Amazon Beauty, MovieLens-1M and Yelp chose by validation NDCG@10 (models/MODEL_CARD.md,
# docs/quality.md), as a rule on three measurements of the data rather than on a dataset's name.

# Median history longer than the full preset's 50-event window: MovieLens-1M (median 96) against Beauty,
# Yelp and Video Games (6-7).
LONG_HISTORY = 50
# Catalogues beyond this train with sampled softmax: a full softmax's cost grows with the catalogue.
# Beauty's 12,101 items converged with it inside 30 minutes and beat sampled negatives; on Yelp's 20,033
# it took 147 s an epoch on 2 cores, too slow for the budget.
LARGE_CATALOG = 16_384
# Share of events whose item is already in the user's history above which training is for new items only
# (Yelp's repeat visits, 3.7%; Beauty, Video Games and MovieLens-1M have none).
REPEATS = 0.01


@dataclass(frozen=True)
class DataShape:
    """The three measurements the default recipe reads."""

    items: int
    median_length: float
    repeat_share: float  # of all events: the item is already in the user's earlier history

    @classmethod
    def of(cls, data: Interactions) -> DataShape:
        lengths = sorted(len(s) for s in data.sequences.values())
        events = repeats = 0
        for steps in data.sequences.values():
            seen: set[int] = set()
            for step in steps:
                if step.item == PAD:
                    continue
                events += 1
                repeats += step.item in seen
                seen.add(step.item)
        n = len(lengths)
        median = 0.0 if not n else (lengths[n // 2] + lengths[(n - 1) // 2]) / 2
        return cls(data.num_items, median, repeats / events if events else 0.0)


def native_bf16() -> bool:
    """Whether bfloat16 matrix products run natively here (a CUDA device with them; a CPU with AMX or
    AVX-512 BF16): elsewhere bf16 training is slower than fp32."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def recipe(shape: DataShape, bf16_native: bool) -> dict[str, Any]:
    """The settings on top of the full preset that the default takes for data of this shape."""
    # Width 128 at half the learning rate: valid NDCG@10 .0503 -> .0514 on Beauty, .1223 -> .1386 on
    # MovieLens-1M; AdamW weight decay 0.1 against Beauty's overfitting after epoch 14 (.0494 -> .0503).
    chosen: dict[str, Any] = {"dim": 128, "lr": 5e-4, "weight_decay": 0.1, "max_minutes": 28.0}
    if shape.median_length > LONG_HISTORY:
        # MovieLens-1M's recipe, as measured (no weight decay): a 200-event window (SASRec's and HSTU's for
        # ML-1M) over every window of a long history, 32 windows a batch (about the positions 64 windows of
        # 100 held), less dropout, the rate x0.3 after an epoch without a validation gain; bfloat16 products
        # where native (1.96x faster steps, the same validation NDCG@10), so that it converges inside an
        # hour on 2 cores. Windows of 200 against 100: validation NDCG@10 .1386 -> .1512 on ML-1M, seed 42,
        # early-stopped in 41 minutes (docs/quality.md). Served from the newest 50 events (what a worker's
        # state keeps by default) rather than 16: the served NDCG@10's loss against the full window, ML-1M,
        # three seeds, 7.7-12.4% -> 0.8-2.3% (docs/quality.md).
        chosen |= {
            "max_len": 200,
            "serve_len": 50,
            "all_windows": True,
            "dropout": 0.2,
            "batch_size": 32,
            "lr_decay": 0.3,
            "lr_decay_patience": 1,
            "weight_decay": 0.0,
            "bf16": bf16_native,
            "max_minutes": 55.0,
        }
    else:
        # Short histories train on every prefix, the loss where serving predicts (the newest event's
        # position): validation NDCG@10 as early stopping reads it, Beauty .0513 -> .0557, Yelp .0232 ->
        # .0231 (a tie), Video Games .0460 -> .0526, each inside its time limit (docs/quality.md).
        chosen["prefixes"] = True
    if shape.items <= LARGE_CATALOG and shape.median_length <= LONG_HISTORY:
        # The full softmax on short histories (Beauty): the rate x0.3 after an epoch without a validation
        # gain, as ML-1M's recipe does. Beauty, seed 42, 30 minutes: valid NDCG@10 .0557 -> .0589 (the
        # first cut after epoch 13: .0540 -> .0576), test .1038 / .0608 -> .1066 / .0636. The large
        # catalogues' sampled-softmax runs end at their time limit still rising: not measured there.
        chosen |= {"lr_decay": 0.3, "lr_decay_patience": 1}
    if shape.items > LARGE_CATALOG:
        # Yelp, seen-excluded validation NDCG@10: .0220 with 2,048 shared negatives, .0221 with 4,096,
        # .0232 with 8,192 (~78 s an epoch).
        chosen["negatives"] = 8192
        # Validated and kept as a moving average of the weights (0.999 a step: about half an epoch): the
        # raw weights' validation swings by ~.002 from epoch to epoch with the sampled negatives. Seed 42,
        # validation NDCG@10: Yelp .0256 -> .0284, rising every epoch up to its peak; Video Games .0584
        # against the raw weights' .0541 / .0531 (seeds 43 / 44) (docs/quality.md, "A moving average").
        # Beauty (full softmax, already cut on a plateau): .0588 against .0589, a tie, so not there.
        chosen["ema"] = 0.999
        if "prefixes" in chosen:
            # Windows of the 16 events the worker serves: sampled-softmax prefix epochs are slow and these
            # runs end at the time limit; validation NDCG@10 Yelp .0231 -> .0235, Video Games .0526 -> .0529
            # (Beauty, full softmax and early-stopped, .0556 -> .0554: it keeps 50; docs/quality.md).
            chosen["max_len"] = DEFAULT_SERVE_LEN
    if shape.repeat_share > REPEATS:
        # Train for what the seen-excluded protocol measures, a next item the user has not had: Yelp's
        # test .0375 -> .0389 HR@10 (the run before it early-stopped on seen-kept validation, so there is
        # no like-for-like validation figure; models/MODEL_CARD.md).
        chosen["novel_only"] = True
    return chosen


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Multithreaded CPU kernels otherwise accumulate gradients in varying order (1e-9 differences that grow).
    torch.use_deterministic_algorithms(True, warn_only=True)


def text_embedder(data: Interactions, config: TrainConfig) -> TextEmbedder | None:
    has_text = bool(data.texts) or any(s.query for seq in data.sequences.values() for s in seq)
    if config.text == "none" or (config.text == "auto" and not has_text):
        return None
    name = "minilm" if config.text == "auto" else config.text
    return make_embedder(name, dim=artifacts.HASHING_DIM)


def text_digests(data: Interactions, embedder: TextEmbedder | None) -> list[str | None] | None:
    """What ``build_model`` embedded each item's text row from (``artifacts.text_digest``; no text: a zero
    row); None without a text model."""
    if embedder is None:
        return None
    return [artifacts.text_digest(data.texts.get(item)) for item in data.item_ids]


def build_model(data: Interactions, config: TrainConfig, embedder: TextEmbedder | None) -> SequenceEncoder:
    attrs = data.attributes if config.use_attributes else {}
    max_attrs = min(max((len(v) for v in attrs.values()), default=0), 16)
    enc = EncoderConfig(
        num_items=data.num_items,
        dim=config.dim,
        layers=config.layers,
        heads=config.heads,
        max_len=config.max_len,
        dropout=config.dropout,
        text_dim=embedder.dim if embedder is not None else 0,
        num_attributes=max((max(v) for v in attrs.values() if v), default=0),
        max_attributes=max_attrs,
        id_dropout=config.id_dropout,
        gated=config.gated,
        ff=config.ff,
        text_embedder=embedder.name if embedder is not None else "hashing",
    )
    model = SequenceEncoder(enc)
    with torch.no_grad():
        if embedder is not None and data.texts:
            with_text = [
                (i + 1, data.texts[item]) for i, item in enumerate(data.item_ids) if item in data.texts
            ]
            vecs = embedder.embed_items([t for _, t in with_text])
            model.item_text[torch.tensor([i for i, _ in with_text])] = torch.from_numpy(vecs)
        if attrs:
            table = np.zeros((data.num_items + 1, max(max_attrs, 1)), dtype=np.int64)
            for i, item in enumerate(data.item_ids):
                a = attrs.get(item, [])[:max_attrs]
                table[i + 1, : len(a)] = a
            model.item_attrs.copy_(torch.from_numpy(table))
    return model


def training_windows(
    seqs: list[list[Step]], max_len: int, all_windows: bool, prefixes: bool = False
) -> list[list[Step]]:
    """The training sequences: each history's newest max_len + 1 events (SASRec's window). With
    all_windows, a longer history also gives its older events as further windows, each ending on the event
    the next one starts from, so every event after a history's first is a target exactly once. With
    prefixes, a window (of at most max_len + 1 events) ends at every event after a history's first."""
    windows = []
    for seq in seqs:
        if prefixes:
            windows += [seq[max(0, end - max_len - 1) : end] for end in range(2, len(seq) + 1)]
            continue
        end = len(seq)
        while end >= 2:
            windows.append(seq[max(0, end - max_len - 1) : end])
            if not all_windows:
                break
            end -= max_len
    return windows


def optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (Adam when weight decay is 0) with the fused kernel: one pass over each parameter instead of a
    dozen element-wise ops per parameter and step (on CPU the default is a loop over parameters: 13 of a
    Yelp step's 86 ms; fused 79-81 against 86-88 ms a step). The same update up to rounding."""
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def length_batches(seqs: list[list[Step]], batch_size: int, rng: random.Random) -> list[list[list[Step]]]:
    # Group similar lengths so padding is trimmed per batch (~3x faster epochs than one global length).
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), rng.random()))
    batches = [[seqs[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def train_epoch(
    model: SequenceEncoder,
    opt: torch.optim.Optimizer,
    batches: Iterable[list[list[Step]]],
    qindex: dict[str, int],
    qtable: torch.Tensor | None,
    blocked: torch.Tensor | None,
    config: TrainConfig,
    deadline: float,
    averaged: AveragedModel | None = None,
) -> tuple[float, int]:
    """One pass of optimiser steps over ``batches``, cut at ``deadline`` (perf_counter); (summed loss,
    steps), with ``averaged`` (``config.ema``'s average) moved after each step. Training from scratch and
    fine-tuning share it."""
    total, steps = 0.0, 0
    for batch in batches:
        loss = train_step_loss(
            model,
            batch,
            qindex,
            qtable,
            blocked,
            config.negatives,
            config.bf16,
            config.novel_only,
            last_only=config.prefixes,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        opt.step()
        if averaged is not None:
            averaged.update_parameters(model)
        total += loss.item()
        steps += 1
        if time.perf_counter() > deadline:
            break
    return total, steps


def train_step_loss(
    model: SequenceEncoder,
    batch: list[list[Step]],
    qindex: dict[str, int],
    qtable: torch.Tensor | None,
    blocked: torch.Tensor | None = None,
    negatives: int = 0,
    low_precision: bool = False,
    novel_only: bool = False,
    last_only: bool = False,
) -> torch.Tensor:
    """Mean next-item cross-entropy of a batch; with ``low_precision`` the encoder runs under bfloat16
    autocast and the full-softmax logits products in bfloat16. With ``novel_only`` a position whose target
    already occurs earlier in its sequence is left out, and each position's earlier items are no negatives
    for it (training for the seen-excluded protocol). With ``last_only`` only each sequence's last target
    counts (prefix training: the position serving predicts from)."""
    device = model.item_id.weight.device
    items, kinds, qids = pad_batch(batch, model.config.max_len + 1, qindex)
    items = items.to(device)
    targets = items[:, 1:]
    id_mask = None
    if model.config.id_dropout > 0:
        id_mask = (torch.rand(model.config.num_items + 1, device=device) >= model.config.id_dropout).float()
    n_items = model.config.num_items
    sampled_softmax = 0 < negatives < n_items
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=low_precision)
    # With sampled negatives, the vectors of the batch's items only (and, below, of its negatives): the whole
    # table's, forward and backward, were ~40% of a prefix-training step on Yelp (20,033 items, 128 windows
    # a batch). ``at`` is each item's row in ``vecs``.
    # The negatives' vectors come from the same call: one gather and one gradient of the ID table per step
    # instead of two (each a dense table of zeros written and summed; with Yelp's 20,033 items ~4 ms of a
    # 78 ms step).
    sampled = torch.randint(1, n_items + 1, (negatives,), device=device) if sampled_softmax else None
    present, at = torch.unique(items, return_inverse=True) if sampled_softmax else (None, items)
    with autocast():
        if present is not None and sampled is not None:
            table = model.item_vectors(id_mask, rows=torch.cat([present, sampled]))
            vecs, negative_vecs = table[: len(present)], table[len(present) :]
        else:
            vecs = model.item_vectors(id_mask)
        h = hidden_states(model, at[:, :-1], kinds[:, :-1], qids[:, :-1], qtable, vecs)
    targets_at = at[:, 1:]
    h, vecs = h.float(), vecs.float()
    valid = targets != PAD
    if last_only:
        valid[:, :-1] = False  # left-padded: every sequence's last target is in the last column
    prefix = None
    if novel_only:
        # prefix[b, t, s]: input s is a real item at or before position t, so seen when predicting t + 1
        inputs = items[:, :-1]
        prefix = torch.ones(inputs.shape[1], inputs.shape[1], dtype=torch.bool, device=device).tril()
        prefix = prefix.unsqueeze(0) & (inputs != PAD).unsqueeze(1)
        valid &= ~((targets.unsqueeze(2) == inputs.unsqueeze(1)) & prefix).any(2)
    rows = valid.nonzero(as_tuple=True)
    h, targets, targets_at = h[rows], targets[rows], targets_at[rows]
    if len(targets) == 0:
        return h.sum() * 0.0  # every target a repeat: nothing to learn from this batch
    if sampled is not None:
        # Sampled softmax: the positive against n negatives shared by the batch, drawn uniformly (a constant
        # proposal, so no logQ correction is needed); a negative equal to a row's positive is masked out.
        pos = (h * vecs[targets_at]).sum(-1, keepdim=True)
        neg = h @ negative_vecs.float().T
        neg = neg.masked_fill(sampled.unsqueeze(0) == targets.unsqueeze(1), -torch.inf)
        if blocked is not None:
            neg = neg.masked_fill(torch.isin(sampled, blocked).unsqueeze(0), -torch.inf)
        if prefix is not None:
            # each (row, earlier item) pair masks every column that drew that item (duplicates are rare)
            pair_rows, pair_items = _seen_pairs(items, prefix, valid, rows)
            values, order = sampled.sort()
            lo = torch.searchsorted(values, pair_items)
            hi = torch.searchsorted(values, pair_items, right=True)
            seen = torch.zeros_like(neg, dtype=torch.bool)
            for extra in range(int((hi - lo).max()) if len(lo) else 0):
                hit = lo + extra < hi
                seen[pair_rows[hit], order[lo[hit] + extra]] = True
            neg = neg.masked_fill(seen, -torch.inf)
        logits = torch.cat([pos, neg], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=device))
    excluded = torch.zeros(n_items + 1, dtype=torch.bool, device=device)
    excluded[PAD] = True
    if blocked is not None:
        excluded[blocked] = True  # items that do not exist yet are no negatives either
    seen_pairs = _seen_pairs(items, prefix, valid, rows) if prefix is not None else None
    return softmax_cross_entropy(h, vecs, targets, excluded, low_precision, seen_pairs)


def _seen_pairs(
    items: torch.Tensor, prefix: torch.Tensor, valid: torch.Tensor, rows: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) pairs of every kept position's earlier items, rows numbered as the loss's rows."""
    row_of = torch.full(valid.shape, -1, dtype=torch.long, device=items.device)
    row_of[rows] = torch.arange(len(rows[0]), device=items.device)
    b, t, s = (prefix & valid.unsqueeze(2)).nonzero(as_tuple=True)
    return row_of[b, t], items[b, s]


# Logits the fused loss holds at once (twice as many with bf16 products): ~2 MB of fp32, so a chunk's
# logits stay in cache between the product that makes them and the softmax that reads them.
_LOSS_CHUNK_ELEMENTS = 1 << 19


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Full softmax cross-entropy of h @ vecs.T, fused and chunked by rows: each chunk's logits are made,
    turned into softmax gradients in place and consumed at once, so the (positions, items) logits never
    exist whole. Backward only scales the gradients computed in forward (the loss is always the last op)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: torch.Tensor,  # (N, D)
        vecs: torch.Tensor,  # (I, D)
        targets: torch.Tensor,  # (N,)
        excluded: torch.Tensor,  # (I,) bool: columns that are no candidates (padding, blocked items)
        low_precision: bool,
        seen_rows: torch.Tensor | None,  # (P,) with seen_cols: (row, column) logits that are no candidates
        seen_cols: torch.Tensor | None,
    ) -> torch.Tensor:
        n = h.shape[0]
        dtype = torch.bfloat16 if low_precision else h.dtype
        hl, vl = h.to(dtype), vecs.to(dtype)
        grad_h = torch.empty_like(h)
        grad_vecs = torch.zeros_like(vecs)
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        rows = max(16, _LOSS_CHUNK_ELEMENTS * (2 if low_precision else 1) // max(vecs.shape[0], 1))
        bounds = None
        if seen_rows is not None and seen_cols is not None:
            order = seen_rows.argsort()
            seen_rows, seen_cols = seen_rows[order], seen_cols[order]
            starts = torch.arange(0, n + rows, rows, device=h.device)
            bounds = torch.searchsorted(seen_rows, starts).tolist()
        for chunk, start in enumerate(range(0, n, rows)):
            hc, tc = hl[start : start + rows], targets[start : start + rows]
            logits = (hc @ vl.T).float().masked_fill_(excluded, -torch.inf)
            if bounds is not None:
                lo, hi = bounds[chunk], bounds[chunk + 1]
                logits[seen_rows[lo:hi] - start, seen_cols[lo:hi]] = -torch.inf  # type: ignore[index]
            lse = torch.logsumexp(logits, dim=1)
            total += (lse - logits.gather(1, tc.unsqueeze(1)).squeeze(1)).sum(dtype=torch.float64)
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax; its gradient is softmax - one-hot
            probs[torch.arange(len(tc), device=h.device), tc] -= 1.0
            g = probs.to(dtype)
            grad_h[start : start + rows] = (g @ vl).float()
            grad_vecs += (g.T @ hc).float()
        ctx.save_for_backward(grad_h.div_(n), grad_vecs.div_(n))
        return (total / n).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_vecs = ctx.saved_tensors
        return grad_h * grad, grad_vecs * grad, None, None, None, None, None


def softmax_cross_entropy(
    h: torch.Tensor,
    vecs: torch.Tensor,
    targets: torch.Tensor,
    excluded: torch.Tensor,
    low_precision: bool = False,
    seen_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """F.cross_entropy(h @ vecs.T with excluded columns at -inf, targets) with its gradients, ~1.7x faster
    on CPU at ML-1M's size (the full logits tensor is never allocated); ``low_precision`` runs its products
    in bfloat16. ``seen_pairs`` (rows, columns) are further logits at -inf, each in its own row only. Call it
    for training only: it computes the gradients even where none are needed."""
    seen_rows, seen_cols = seen_pairs if seen_pairs is not None else (None, None)
    loss: torch.Tensor = _SoftmaxCrossEntropy.apply(
        h, vecs, targets, excluded, low_precision, seen_rows, seen_cols
    )
    return loss


def _validate(
    model: SequenceEncoder,
    cases: dict[str, tuple[list[Step], int]],
    qindex: dict[str, int],
    qtable: torch.Tensor | None,
    filter_seen: bool = False,
) -> dict[str, float]:
    model.eval()
    with torch.inference_mode():
        vecs = model.item_vectors()

    def score(seqs):  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            return user_vectors(model, seqs, qindex, qtable, item_vecs=vecs) @ vecs.T

    return evaluate_scorer(score, cases, model.config.num_items, filter_seen=filter_seen)


def fit(
    data: Interactions,
    config: TrainConfig,
    progress: bool = True,
    split: Split | None = None,
    blocked_items: list[int] | None = None,
) -> tuple[SequenceEncoder, TextEmbedder | None, dict]:
    """Train on the leave-one-out training split (or a given split); returns the model that was best on
    validation, and a report with its validation and test metrics."""
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    split = split or leave_one_out(data.sequences)
    embedder = text_embedder(data, config)
    model = build_model(data, config, embedder).to(device)
    all_seqs = list(data.sequences.values())
    if embedder is not None:
        if hasattr(embedder, "add_words"):
            embedder.add_words(list(data.texts.values()))
        qindex, qtable = query_table(all_seqs, embedder.embed_queries)
        qtable = qtable.to(device)
    else:
        qindex, qtable = {}, None
    train_seqs = training_windows(
        list(split.train.values()), config.max_len, config.all_windows, config.prefixes
    )
    valid = split.valid
    if config.eval_users and len(valid) > config.eval_users:
        keys = random.Random(config.seed).sample(sorted(valid), config.eval_users)
        valid = {k: valid[k] for k in keys}
    blocked = torch.tensor(blocked_items, device=device) if blocked_items else None
    # AdamW: weight decay decoupled from the gradient (with weight_decay 0 it is Adam, step for step).
    opt = optimizer(model, config)
    plateau = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", factor=config.lr_decay, patience=config.lr_decay_patience
        )
        if config.lr_decay < 1.0
        else None
    )
    rng = random.Random(config.seed)
    # The weights validated and kept: the model's, or their moving average (parameters only: the buffers,
    # item texts and attribute ids, stay the model's)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema)) if config.ema else None
    kept = cast(SequenceEncoder, averaged.module) if averaged is not None else model
    best: dict[str, float] = {"ndcg@10": -1.0}
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, history = 0, []
    stopped = "epochs"  # what ended training: all the epochs, early stopping, or the time limit
    start = time.perf_counter()
    deadline = start + config.max_minutes * 60
    for epoch in range(1, config.epochs + 1):
        model.train()
        batches = length_batches(train_seqs, config.batch_size, rng)
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=not progress, leave=False, unit="batch")
        total, steps = train_epoch(model, opt, bar, qindex, qtable, blocked, config, deadline, averaged)
        metrics = _validate(kept, valid, qindex, qtable, config.novel_only)
        entry = {"epoch": epoch, "loss": total / max(steps, 1), **metrics, "lr": opt.param_groups[0]["lr"]}
        if plateau is not None:
            plateau.step(metrics["ndcg@10"])
        entry["seconds"] = round(time.perf_counter() - start, 1)
        history.append(entry)
        tqdm.write(
            f"epoch {epoch} loss {entry['loss']:.4f} valid hr@10 {metrics['hr@10']:.4f} "
            f"ndcg@10 {metrics['ndcg@10']:.4f} ({entry['seconds']}s)",
            file=sys.stderr,
        )
        if metrics["ndcg@10"] > best["ndcg@10"]:
            best, best_epoch = metrics, epoch
            best_state = copy.deepcopy(kept.state_dict())
        elif epoch - best_epoch >= config.patience:
            stopped = "early_stopping"
            break
        if time.perf_counter() > deadline:
            stopped = "time_limit"
            break
    note = cut_short(stopped, history, config.max_minutes)
    if note:
        log.warning("%s", note)
    model.load_state_dict(best_state)
    model.eval()
    seconds = time.perf_counter() - start
    report = {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_by": stopped,
        "training_seconds": round(seconds, 1),
        "valid": best,
        "history": history,
        "device": str(device),
        "filter_seen": config.novel_only,  # of the validation and test figures here
    }
    test = _validate(model, split.test, qindex, qtable, config.novel_only)
    report["test"] = test
    return model, embedder, report


def cut_short(stopped: str, history: list[dict[str, Any]], max_minutes: float) -> str | None:
    """What to tell the user when the time limit ended a run whose validation NDCG@10 was still rising
    (its last epoch its best): more time would likely give a better model. None otherwise."""
    if stopped != "time_limit" or len(history) < 2:
        return None
    before, last = history[-2]["ndcg@10"], history[-1]["ndcg@10"]
    if last <= max(h["ndcg@10"] for h in history[:-1]):
        return None
    return (
        f"training stopped at its {max_minutes:g}-minute limit after {len(history)} epochs with validation "
        f"NDCG@10 still rising ({before:.4f} -> {last:.4f}): a longer --max-minutes would likely give a "
        "better model"
    )


def popularity(data: Interactions) -> np.ndarray:
    counts = np.zeros(data.num_items + 1, dtype=np.float32)
    for seq in leave_one_out(data.sequences).train.values():
        for s in seq:
            counts[s.item] += 1
    counts[PAD] = 0
    return counts


def train(
    data: Path | Interactions,
    out: Path | None = None,
    config: TrainConfig | None = None,
    registry_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Train and write a model directory (``out``, or a new version under ``registry_dir``); its path."""
    config = config or TrainConfig()
    dataset = data if isinstance(data, Interactions) else load(Path(data))
    version = registry.new_version()
    parent = registry.current(registry_dir) if registry_dir is not None else None
    if out is None:
        if registry_dir is None:
            raise ValueError("give an output directory or a registry")
        out = Path(registry_dir) / version
    model, embedder, report = fit(dataset, config, progress=progress)
    model = model.cpu()
    index_version = f"{version}.0"
    metadata = {
        "version": version,
        "parent_version": parent.name if parent is not None else None,
        "index_version": index_version,
        "data_source": dataset.source,
        "data_fingerprint": dataset.fingerprint,
        "data_window": list(dataset.window) if dataset.window else None,
        "num_users": len(dataset.sequences),
        "num_items": dataset.num_items,
        "metrics": {"valid": report["valid"], "test": report["test"], "filter_seen": report["filter_seen"]},
        "training_seconds": report["training_seconds"],
        "best_epoch": report["best_epoch"],
        "epochs_run": report["epochs_run"],
        "stopped_by": report["stopped_by"],
        "history": report["history"],
        "device": report["device"],
        "seed": config.seed,
        "serve_len": config.serving_window,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    titles = [dataset.titles.get(i, f"item {i}") for i in dataset.item_ids]
    in_stock = [dataset.catalog[i].in_stock if i in dataset.catalog else True for i in dataset.item_ids]
    out = Path(out)
    artifacts.save(
        out,
        model,
        asdict(config),
        metadata,
        artifacts.ItemTable(list(dataset.item_ids), titles, in_stock, text_digests(dataset, embedder)),
        popularity(dataset),
        embedder,
    )
    with torch.inference_mode():
        vecs = model.item_vectors()[1:].numpy()
    ItemIndex.build(vecs, np.arange(1, dataset.num_items + 1), config.index).save(out, index_version)
    return out
