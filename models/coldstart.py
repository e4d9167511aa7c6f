"""Cold-start measurement: hold a share of items out of training entirely, train, then rank the test targets
that are held-out items using only their content vectors (text and/or attributes), as serving does."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import torch

from streamrec.models.data import Interactions, Split, Step, leave_one_out, load
from streamrec.models.encoder import SequenceEncoder
from streamrec.models.evaluate import evaluate_scorer
from streamrec.models.sequences import user_vectors
from streamrec.models.train import TrainConfig, fit


def content_scale(model: SequenceEncoder, warm: list[int]) -> float:
    """Mean length of warm item vectors over mean length of their content-only part."""
    with torch.inference_mode():
        full = model.item_vectors()[warm].norm(dim=1).mean()
        content = model.content_vectors()[warm].norm(dim=1).mean()
    return float(full / content.clamp(min=1e-9))


def _drop(seq: list[Step], held: set[int]) -> list[Step]:
    return [s for s in seq if s.item not in held]


def cold_start(
    data: Path | Interactions, config: TrainConfig, share: float = 0.05, seed: int = 7, progress: bool = False
) -> dict[str, object]:
    dataset = data if isinstance(data, Interactions) else load(Path(data))
    split = leave_one_out(dataset.sequences)
    rng = random.Random(seed)
    held = set(rng.sample(range(1, dataset.num_items + 1), int(share * dataset.num_items)))
    # Held-out items vanish from every input and training sequence; only their content remains.
    train_split = Split(
        train={u: _drop(s, held) for u, s in split.train.items()},
        valid={u: (_drop(s, held), t) for u, (s, t) in split.valid.items() if t not in held},
        test={u: (_drop(s, held), t) for u, (s, t) in split.test.items() if t not in held},
    )
    cold_cases = {u: (_drop(s, held), t) for u, (s, t) in split.test.items() if t in held}
    model, _, report = fit(
        dataset, replace(config, id_dropout=max(config.id_dropout, 0.1)), progress, train_split
    )
    model.eval()
    with torch.inference_mode():
        mask = torch.ones(dataset.num_items + 1)
        mask[list(held)] = 0.0  # serving gives a new item no ID part: content only
        vecs = model.item_vectors(mask)

    def score(seqs):  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            return user_vectors(model, seqs, {}, None, item_vecs=vecs) @ vecs.T

    cold = evaluate_scorer(score, cold_cases, dataset.num_items)
    # Content vectors are shorter than ID + content vectors, and the dot product rewards length: rescale a
    # cold item's content to the typical length of a warm item (what serving does, see content_scale()).
    scale = content_scale(model, sorted(set(range(1, dataset.num_items + 1)) - held))
    with torch.inference_mode():
        calibrated = vecs.clone()
        calibrated[list(held)] *= scale

    def score_calibrated(seqs):  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            return user_vectors(model, seqs, {}, None, item_vecs=vecs) @ calibrated.T

    cold_calibrated = evaluate_scorer(score_calibrated, cold_cases, dataset.num_items)
    # Reference: the same model with content switched off for held-out items (zero vectors).
    with torch.inference_mode():
        blank = vecs.clone()
        blank[list(held)] = 0.0

    def score_blank(seqs):  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            return user_vectors(model, seqs, {}, None, item_vecs=vecs) @ blank.T

    no_content = evaluate_scorer(score_blank, cold_cases, dataset.num_items)
    return {
        "held_out_items": len(held),
        "cold_test_users": len(cold_cases),
        "content_only": cold,
        "content_only_calibrated": cold_calibrated,
        "content_scale": scale,
        "zero_vector_reference": no_content,
        "chance_hr@10": 10 / dataset.num_items,
        "warm_test": report["test"],
        "training_seconds": report["training_seconds"],
        "has_text": bool(dataset.texts),
        "has_attributes": bool(dataset.attributes),
    }
