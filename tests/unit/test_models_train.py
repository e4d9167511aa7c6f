"""Training: determinism with a seed, both losses learn a clear pattern, the fused loss equals the plain
one, bfloat16 steps stay deterministic and learn, the model directory's contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

from streamrec.models import synthetic
from streamrec.models import train as train_module
from streamrec.models.data import PAD, Interactions, Step, load
from streamrec.models.encoder import FastDropout
from streamrec.models.evaluate import evaluate_scorer
from streamrec.models.sequences import hidden_states, pad_batch
from streamrec.models.train import (
    DataShape,
    TrainConfig,
    build_model,
    optimizer,
    recipe,
    softmax_cross_entropy,
    train,
    train_step_loss,
    training_windows,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write(tmp_path_factory.mktemp("data"), users=400)


def quick(**overrides: object) -> TrainConfig:
    return TrainConfig.preset("tiny", **({"epochs": 6, "max_minutes": 10.0} | overrides))


def test_same_seed_same_model(data_dir: Path, tmp_path: Path) -> None:
    a = train(data_dir, tmp_path / "a", quick(), progress=False)
    b = train(data_dir, tmp_path / "b", quick(), progress=False)
    sa = torch.load(a / "model.pt", weights_only=True)
    sb = torch.load(b / "model.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_training_dropout_drops_its_share_and_keeps_the_mean(p: float) -> None:
    """The encoder's dropout (uniform draws against p, not a Bernoulli mask) zeroes a share p of the values
    and scales the rest by 1 / (1 - p), so a hidden state's expected value is unchanged; at inference, and
    with p = 0, it passes values through untouched."""
    torch.manual_seed(3)
    drop = FastDropout(p).train()
    x = torch.rand(256, 16, 128) + 0.5
    y = drop(x)
    zeroed = (y == 0).float().mean().item()
    assert abs(zeroed - p) < 0.01
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.01
    assert drop.eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))


def test_every_dropout_in_the_encoder_is_the_fast_one(data_dir: Path) -> None:
    """GPT-2's dropouts (embedding, attention, residual, feed-forward) are all replaced, each with the
    encoder's rate; plain and gated blocks alike."""
    data = load(data_dir)
    for gated in (False, True):
        model = build_model(data, quick(gated=gated, dropout=0.3), None)
        drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert drops and all(type(m) is FastDropout and m.p == 0.3 for m in drops)


def test_the_optimiser_is_fused_adamw_with_the_configured_rate_and_decay(data_dir: Path) -> None:
    """Training's AdamW runs the fused kernel on CPU (one pass per parameter) and steps as the loop
    implementation does, up to rounding."""
    data = load(data_dir)
    config = quick(weight_decay=0.1, lr=0.01)
    models = [build_model(data, config, None) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = optimizer(models[0], config)
    loop = torch.optim.AdamW(models[1].parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] and fused.defaults["lr"] == 0.01 and fused.defaults["weight_decay"] == 0.1
    for _ in range(3):
        for model, opt in zip(models, (fused, loop), strict=True):
            for param in model.parameters():
                param.grad = torch.ones_like(param) * 0.01
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_with_ema_the_model_kept_is_the_moving_average_of_the_weights_stepped_through(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decay = 0.9
    steps: list[dict[str, torch.Tensor]] = []  # each step's parameters, as the optimiser left them

    def recording(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
        opt = optimizer(model, config)
        step = opt.step

        def recorded(*args: object, **kwargs: object) -> object:
            out = step(*args, **kwargs)  # type: ignore[arg-type]
            steps.append({k: v.detach().clone() for k, v in model.named_parameters()})
            return out

        opt.step = recorded  # type: ignore[method-assign]
        return opt

    monkeypatch.setattr(train_module, "optimizer", recording)
    out = train(data_dir, tmp_path / "m", quick(ema=decay, epochs=1), progress=False)
    saved = torch.load(out / "model.pt", weights_only=True)
    assert len(steps) > 3
    for name in steps[0]:
        expected = steps[0][name]
        for later in steps[1:]:
            expected = decay * expected + (1 - decay) * later[name]
        torch.testing.assert_close(saved[name], expected, rtol=1e-4, atol=1e-5)
    moved = [name for name in steps[0] if not torch.equal(steps[0][name], steps[-1][name])]
    assert moved and all(not torch.allclose(saved[name], steps[-1][name]) for name in moved), "not the last"


def test_the_model_says_what_ended_its_training(data_dir: Path, tmp_path: Path) -> None:
    every = json.loads(
        (train(data_dir, tmp_path / "a", quick(epochs=2), progress=False) / "metadata.json").read_text()
    )
    timed = json.loads(
        (
            train(data_dir, tmp_path / "b", quick(max_minutes=0.0), progress=False) / "metadata.json"
        ).read_text()
    )
    assert (every["stopped_by"], every["epochs_run"]) == ("epochs", 2)
    assert (timed["stopped_by"], timed["epochs_run"]) == ("time_limit", 1)


def test_a_run_the_time_limit_cut_while_still_rising_is_reported() -> None:
    rising = [{"ndcg@10": 0.02}, {"ndcg@10": 0.025}, {"ndcg@10": 0.031}]
    note = train_module.cut_short("time_limit", rising, 28.0)
    assert note is not None and "28-minute limit after 3 epochs" in note and "0.0250 -> 0.0310" in note
    past_its_peak = [{"ndcg@10": 0.02}, {"ndcg@10": 0.031}, {"ndcg@10": 0.030}]
    assert train_module.cut_short("time_limit", past_its_peak, 28.0) is None
    assert train_module.cut_short("early_stopping", rising, 28.0) is None
    assert train_module.cut_short("time_limit", rising[:1], 28.0) is None  # one epoch: no trend to read


def test_model_directory_is_state_dict_and_json(data_dir: Path, tmp_path: Path) -> None:
    out = train(data_dir, tmp_path / "m", quick(), progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"model.pt", "config.json", "metadata.json", "items.json", "index.faiss", "index.json"} <= names
    meta = json.loads((out / "metadata.json").read_text())
    for key in (
        "version",
        "parent_version",
        "data_fingerprint",
        "data_window",
        "metrics",
        "training_seconds",
    ):
        assert key in meta
    assert json.loads((out / "index.json").read_text())["index_version"] == meta["index_version"]
    state = torch.load(out / "model.pt", weights_only=True)  # plain tensors, loadable without pickled code
    assert all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.mark.parametrize("negatives", [0, 30])
def test_full_and_sampled_softmax_learn_the_pattern(data_dir: Path, tmp_path: Path, negatives: int) -> None:
    out = train(data_dir, tmp_path / "m", quick(negatives=negatives, epochs=15, patience=15), progress=False)
    valid = json.loads((out / "metadata.json").read_text())["metrics"]["valid"]
    assert valid["hr@10"] > 0.8  # popularity scores ~0.1 on this data


@given(
    lengths=st.lists(st.integers(0, 260), max_size=8),
    max_len=st.integers(1, 60),
    all_windows=st.booleans(),
)
def test_training_windows_cover_each_target_once(lengths: list[int], max_len: int, all_windows: bool) -> None:
    # Events are numbered per history so a window's targets (all but its first event) can be traced back.
    seqs = [[(h, i) for i in range(n)] for h, n in enumerate(lengths)]
    windows = training_windows(seqs, max_len, all_windows)  # type: ignore[arg-type]
    assert all(2 <= len(w) <= max_len + 1 for w in windows)
    assert all(list(w) == seqs[w[0][0]][w[0][1] : w[-1][1] + 1] for w in windows)  # contiguous slices
    targets = sorted(step for w in windows for step in w[1:])
    if all_windows:
        assert targets == sorted((h, i) for h, n in enumerate(lengths) for i in range(1, n))
    else:
        newest = [(h, i) for h, n in enumerate(lengths) if n >= 2 for i in range(max(1, n - max_len), n)]
        assert targets == sorted(newest)


@given(lengths=st.lists(st.integers(0, 120), max_size=8), max_len=st.integers(1, 60))
def test_prefix_windows_end_at_every_event_once(lengths: list[int], max_len: int) -> None:
    """Prefix training: one window ends at each event after a history's first, each the newest events
    before it (at most max_len + 1), so each event is the last target of exactly one window."""
    seqs = [[(h, i) for i in range(n)] for h, n in enumerate(lengths)]
    windows = training_windows(seqs, max_len, all_windows=False, prefixes=True)  # type: ignore[arg-type]
    assert all(2 <= len(w) <= max_len + 1 for w in windows)
    assert all(list(w) == seqs[w[0][0]][w[0][1] : w[-1][1] + 1] for w in windows)  # contiguous slices
    assert all(len(w) == max_len + 1 or w[0][1] == 0 for w in windows)  # as long as the history allows
    ends = sorted(w[-1] for w in windows)
    assert ends == sorted((h, i) for h, n in enumerate(lengths) for i in range(1, n))


def test_prefix_training_learns_from_each_windows_last_position_only(data_dir: Path) -> None:
    data = load(data_dir)
    config = quick(dropout=0.0, id_dropout=0.0, text="none", use_attributes=False)
    model = build_model(data, config, None).eval()
    c = [Step(0, i) for i in range(1, 12)]
    batch = [[c[0], c[1], c[2], c[3]], [c[4], c[5]], [c[6], c[7], c[8], c[9], c[10]]]
    got = train_step_loss(model, batch, {}, None, last_only=True)
    items, kinds, qids = pad_batch(batch, model.config.max_len + 1)
    vecs = model.item_vectors()
    h = hidden_states(model, items[:, :-1], kinds[:, :-1], qids[:, :-1], None, vecs)[:, -1]
    logits = h @ vecs[1:].T  # every item but padding
    want = torch.nn.functional.cross_entropy(logits, items[:, -1] - 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert abs(train_step_loss(model, batch, {}, None).item() - want.item()) > 1e-3


@pytest.mark.parametrize("rows", [1, 7, 300])  # one row, one chunk of rows, several
def test_fused_softmax_cross_entropy_equals_the_plain_one(rows: int) -> None:
    torch.manual_seed(rows)
    h = torch.randn(rows, 8, requires_grad=True)
    vecs = torch.randn(50_000, 8, requires_grad=True)  # wide enough for several chunks of rows
    excluded = torch.zeros(50_000, dtype=torch.bool)
    excluded[[0, 3, 9]] = True  # padding and two blocked items
    targets = torch.randint(10, 50_000, (rows,))
    plain = F.cross_entropy((h @ vecs.T).masked_fill(excluded, -torch.inf), targets)
    want = torch.autograd.grad(plain * 3, (h, vecs))
    fused = softmax_cross_entropy(h, vecs, targets, excluded)
    got = torch.autograd.grad(fused * 3, (h, vecs))
    torch.testing.assert_close(fused, plain)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)  # sums over 50k items in another order
    assert torch.all(got[1][excluded] == 0)  # excluded items are no negatives
    low = softmax_cross_entropy(h, vecs, targets, excluded, low_precision=True)
    torch.testing.assert_close(low, plain, rtol=2e-2, atol=2e-2)


def test_fused_softmax_cross_entropy_masks_seen_pairs_in_their_own_rows() -> None:
    torch.manual_seed(0)
    h = torch.randn(40, 8, requires_grad=True)
    vecs = torch.randn(30_000, 8, requires_grad=True)  # several chunks of rows: pairs cross chunk bounds
    excluded = torch.zeros(30_000, dtype=torch.bool)
    excluded[0] = True
    targets = torch.randint(1, 30_000, (40,))
    rows = torch.randint(0, 40, (300,))
    cols = torch.randint(1, 30_000, (300,))
    keep = cols != targets[rows]  # a row's own target is never among its seen items
    rows, cols = rows[keep], cols[keep]
    logits = (h @ vecs.T).masked_fill(excluded, -torch.inf)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[rows, cols] = True
    plain = F.cross_entropy(logits.masked_fill(mask, -torch.inf), targets)
    want = torch.autograd.grad(plain, (h, vecs))
    fused = softmax_cross_entropy(h, vecs, targets, excluded, seen_pairs=(rows, cols))
    got = torch.autograd.grad(fused, (h, vecs))
    torch.testing.assert_close(fused, plain)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def _novel_only_reference(model, batch, negatives: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The novel-only loss position by position: targets seen earlier skipped, earlier items no negatives."""
    items, kinds, qids = pad_batch(batch, model.config.max_len + 1)
    vecs = model.item_vectors()
    h = hidden_states(model, items[:, :-1], kinds[:, :-1], qids[:, :-1], None, vecs)
    n = model.config.num_items
    sampled = torch.randint(1, n + 1, (negatives,)) if negatives else None
    losses = []
    for b in range(items.shape[0]):
        for t in range(items.shape[1] - 1):
            target = int(items[b, t + 1])
            earlier = {int(i) for i in items[b, : t + 1] if i != PAD}
            if target == PAD or target in earlier:
                continue
            if sampled is None:
                candidates = [i for i in range(1, n + 1) if i == target or i not in earlier]
            else:
                candidates = [target] + [
                    int(i) for i in sampled if int(i) != target and int(i) not in earlier
                ]
            logits = h[b, t] @ vecs[candidates].T
            losses.append(torch.logsumexp(logits, 0) - logits[candidates.index(target)])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("negatives", [0, 90])  # 90 of 100 items: many drawn twice
def test_novel_only_loss_skips_repeat_targets_and_seen_negatives(data_dir: Path, negatives: int) -> None:
    data = load(data_dir)
    config = quick(dropout=0.0, id_dropout=0.0, text="none", use_attributes=False)
    model = build_model(data, config, None).eval()
    c = [Step(0, i) for i in range(1, 12)]
    batch = [
        [c[0], c[1], c[0], c[2], c[1], c[3]],  # two repeat targets among five
        [c[3], c[5], c[6], c[4]],
        [c[7], c[7], c[7]],  # only repeats: no position of its own
        [c[8], c[9], c[10], c[9], c[8], c[10], c[1]],
    ]
    if negatives:  # the draw below has an earlier item twice: both of its columns must be masked
        torch.manual_seed(1)
        drawn = torch.randint(1, data.num_items + 1, (negatives,)).tolist()
        assert any(drawn.count(s.item) > 1 for seq in batch for s in seq[:-1])
    torch.manual_seed(1)
    got = train_step_loss(model, batch, {}, None, negatives=negatives, novel_only=True)
    torch.manual_seed(1)
    want = _novel_only_reference(model, batch, negatives)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = train_step_loss(model, batch, {}, None, negatives=0)
    assert abs(plain.item() - want.item()) > 1e-3  # the option changes what is learned
    only_repeats = train_step_loss(
        model, [[c[7], c[7], c[7]]], {}, None, negatives=negatives, novel_only=True
    )
    assert only_repeats.item() == 0.0 and only_repeats.requires_grad  # a loss backward() accepts


@pytest.mark.parametrize("novel_only", [False, True])
@pytest.mark.parametrize("last_only", [False, True])
def test_sampled_softmax_computes_only_the_items_it_uses_with_the_whole_tables_numbers(
    data_dir: Path, novel_only: bool, last_only: bool
) -> None:
    """A sampled-softmax step computes the vectors of its batch's items and negatives alone, and gets the
    loss and every gradient it got from the whole item table (attributes, id dropout and dropout on)."""
    data = load(data_dir)
    data.attributes = {item: [1 + n % 5, 6 + n % 3][: 1 + n % 2] for n, item in enumerate(data.item_ids)}
    model = build_model(data, quick(use_attributes=True), None).train()
    assert model.attr is not None
    c = [Step(1, i) for i in range(1, 30)]
    batch = [[c[0], c[1], c[0], c[2], c[5]], [c[3], c[5], c[6], c[4]], [c[20], c[21], c[22], c[28]]]

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        loss = train_step_loss(
            model, batch, {}, None, negatives=40, novel_only=novel_only, last_only=last_only
        )
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    rows_asked: list[int] = []
    vectors = model.item_vectors

    def recording(id_mask: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows_asked.append(model.config.num_items + 1 if rows is None else len(rows))
        return vectors(id_mask, rows)

    def whole_table(id_mask: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        table = vectors(id_mask)
        return table if rows is None else table[rows]

    model.item_vectors = recording  # type: ignore[method-assign]
    got_loss, got_grads = step()
    model.item_vectors = whole_table  # type: ignore[method-assign]
    want_loss, want_grads = step()
    # one call: the batch's items (padding included) and then its 40 negatives
    assert rows_asked == [len({s.item for seq in batch for s in seq} | {PAD}) + 40]
    assert data.num_items > 40 + sum(map(len, batch))  # fewer rows than the table: the point of it
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_novel_only_training_selects_and_stops_on_seen_excluded_validation(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """novel_only trains for unseen next items, so every validation that picks the best epoch and stops the
    training ranks with the user's seen items excluded (and so does its test figure). The kept model is the
    epoch best by those figures, and the run stopped after `patience` epochs without a gain."""
    novel_only = True
    evaluations: list[tuple[bool, dict]] = []  # (filter_seen, figures): each epoch's validation, then test

    def recorded(*args: object, filter_seen: bool = False, **kwargs: object) -> dict:
        figures = evaluate_scorer(*args, filter_seen=filter_seen, **kwargs)  # type: ignore[arg-type]
        evaluations.append((filter_seen, figures))
        return figures

    monkeypatch.setattr(train_module, "evaluate_scorer", recorded)
    config = quick(novel_only=novel_only, epochs=15, patience=3)
    meta = json.loads((train(data_dir, tmp_path / "m", config, progress=False) / "metadata.json").read_text())
    *validations, test = evaluations
    assert [seen for seen, _ in evaluations] == [novel_only] * (meta["epochs_run"] + 1)
    ndcg = [figures["ndcg@10"] for _, figures in validations]
    assert meta["best_epoch"] == ndcg.index(max(ndcg)) + 1
    assert meta["metrics"]["valid"] == validations[meta["best_epoch"] - 1][1]
    assert meta["metrics"]["test"] == test[1] and meta["metrics"]["filter_seen"] is novel_only
    assert meta["epochs_run"] == 15 or meta["epochs_run"] - meta["best_epoch"] == config.patience
    assert meta["metrics"]["valid"]["hr@10"] > 0.8


def test_bf16_training_is_deterministic_and_learns(data_dir: Path, tmp_path: Path) -> None:
    config = quick(bf16=True, epochs=15, patience=15)
    a = train(data_dir, tmp_path / "a", config, progress=False)
    b = train(data_dir, tmp_path / "b", config, progress=False)
    sa = torch.load(a / "model.pt", weights_only=True)
    sb = torch.load(b / "model.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(v.dtype != torch.bfloat16 for v in sa.values())  # weights stay fp32
    valid = json.loads((a / "metadata.json").read_text())["metrics"]["valid"]
    assert valid["hr@10"] > 0.8


# --- the default recipe (`streamrec train --data D` with no options) ----------------------------------------

# The settings behind docs/quality.md's figures, as benchmarks/quality.py set them per dataset before the
# recipe became a rule on the data's shape, with the shapes of ../shared/data's files (items, median history,
# repeat share) and the time budgets they ran in.
MEASURED = {
    "amazon-beauty": (
        DataShape(12_101, 6.0, 0.0),
        {
            "weight_decay": 0.1,
            "dim": 128,
            "lr": 5e-4,
            "max_minutes": 28.0,
            "prefixes": True,
            "lr_decay": 0.3,
            "lr_decay_patience": 1,
        },
    ),
    "amazon-video-games": (
        DataShape(23_715, 6.0, 0.0),
        {
            "negatives": 8192,
            "ema": 0.999,
            "weight_decay": 0.1,
            "dim": 128,
            "lr": 5e-4,
            "max_minutes": 28.0,
            "prefixes": True,
            "max_len": 16,
        },
    ),
    "ml-1m": (
        DataShape(3_416, 96.0, 0.0),
        {
            "max_len": 200,
            "serve_len": 50,  # how workers serve it: the same trained weights
            "dropout": 0.2,
            "batch_size": 32,
            "lr_decay": 0.3,
            "lr_decay_patience": 1,
            "all_windows": True,
            "bf16": True,
            "dim": 128,
            "lr": 5e-4,
            "max_minutes": 55.0,
        },
    ),
    "yelp": (
        DataShape(20_033, 7.0, 0.037),
        {
            "negatives": 8192,
            "ema": 0.999,
            "weight_decay": 0.1,
            "dim": 128,
            "lr": 5e-4,
            "novel_only": True,
            "max_minutes": 28.0,
            "prefixes": True,
            "max_len": 16,
        },
    ),
}


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_the_default_recipe_is_the_one_that_measured_each_datasets_figures(name: str) -> None:
    """The README's quality figures describe what a user gets with no options (bfloat16 where native)."""
    shape, measured = MEASURED[name]
    assert TrainConfig.preset("full", **recipe(shape, bf16_native=True)) == TrainConfig.preset(
        "full", **measured
    )


def test_the_recipe_trains_in_fp32_where_bfloat16_is_not_native() -> None:
    assert recipe(MEASURED["ml-1m"][0], bf16_native=False)["bf16"] is False
    assert "bf16" not in recipe(MEASURED["amazon-beauty"][0], bf16_native=True)


def test_the_data_shape_is_measured_from_the_histories() -> None:
    histories = {"a": [1, 2, 1, 3], "b": [4], "c": [2, 2]}
    sequences = {user: [Step(1, item) for item in items] for user, items in histories.items()}
    sequences["d"] = [Step(2, PAD, "a search"), Step(1, 3)]  # a search is no item event
    shape = DataShape.of(Interactions(item_ids=["w", "x", "y", "z"], sequences=sequences))
    assert shape == DataShape(items=4, median_length=2.0, repeat_share=2 / 8)


def test_given_settings_win_over_the_recipe(data_dir: Path) -> None:
    config = TrainConfig.for_data(load(data_dir), dim=16, max_minutes=None)
    assert config.dim == 16 and config.max_minutes == 28.0 and config.weight_decay == 0.1
