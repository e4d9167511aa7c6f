"""The serving fast path computes exactly the user vector of the full forward pass."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.models.encoder import EncoderConfig, SequenceEncoder
from streamrec.models.sequences import hidden_states
from streamrec.records import EventKind


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 4]),
    text=st.booleans(),
    batch=st.integers(1, 6),
    length=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    gated=st.booleans(),
    ff=st.sampled_from(["gelu", "swiglu"]),
)
def test_encode_last_equals_the_last_position_of_encode(
    layers: int, heads: int, text: bool, batch: int, length: int, seed: int, gated: bool, ff: str
) -> None:
    torch.manual_seed(seed)
    config = EncoderConfig(
        num_items=30,
        dim=16,
        layers=layers,
        heads=heads,
        max_len=12,
        text_dim=8 if text else 0,
        gated=gated,
        ff=ff,
    )
    model = SequenceEncoder(config).eval()
    kinds = torch.randint(1, 4, (batch, length))
    # Left padding of any depth, a fully padded row included.
    pad = torch.randint(0, length + 1, (batch,))
    kinds[torch.arange(length)[None, :] < pad[:, None]] = 0
    items = torch.randint(1, 31, (batch, length))
    items[(kinds == 0) | (kinds == int(EventKind.SEARCH))] = 0
    with torch.inference_mode():
        query_vecs = model.query_vectors(torch.randn(batch, length, 8)) if text else None
        vecs = model.item_vectors()[items]
        full = model.encode(vecs, kinds.clone(), query_vecs)[:, -1]
        last = model.encode_last(vecs, kinds.clone(), query_vecs)
    assert torch.allclose(full, last, atol=1e-5, rtol=1e-4)


def test_gated_blocks_with_open_gates_are_the_gpt2_blocks_in_training_too() -> None:
    """The gated path runs the backbone's blocks by hand; with every gate held open (sigmoid = 1) it must be
    the GPT-2 forward pass, so the gates are the only difference a gated model trains with."""
    torch.manual_seed(7)
    plain = SequenceEncoder(EncoderConfig(num_items=30, dim=16, layers=2, heads=2, max_len=12, dropout=0.0))
    gated = SequenceEncoder(
        EncoderConfig(num_items=30, dim=16, layers=2, heads=2, max_len=12, dropout=0.0, gated=True)
    )
    gated.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for gate in [*gated.attn_gates, *gated.mlp_gates]:
            gate.weight.zero_()
            gate.bias.fill_(50.0)
    kinds = torch.randint(1, 4, (4, 9))
    kinds[0, :5] = 0
    vecs = plain.item_vectors()[torch.randint(1, 31, (4, 9))]
    plain.train()
    gated.train()  # training mode: the hand-run path must match the backbone where it is used for training
    real = kinds > 0  # padded positions' outputs are never used (no target, never attended to)
    expected = plain.encode(vecs, kinds.clone())[real]
    assert torch.allclose(expected, gated.encode(vecs, kinds.clone())[real], atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 5), length=st.integers(1, 12), queries=st.integers(1, 6), last=st.booleans())
def test_a_batch_query_table_projected_once_is_each_search_projected(
    batch: int, length: int, queries: int, last: bool
) -> None:
    """hidden_states projects the batch's query table and gathers the rows: the same input as projecting the
    text at every search position, which is what a search means to the encoder."""
    torch.manual_seed(batch * 100 + length)
    model = SequenceEncoder(EncoderConfig(num_items=30, dim=16, layers=1, heads=2, max_len=12, text_dim=8))
    model.eval()
    kinds = torch.randint(1, 4, (batch, length))
    searches = kinds == int(EventKind.SEARCH)
    items = torch.randint(1, 31, (batch, length)).masked_fill(searches, 0)
    qids = torch.randint(1, queries + 1, (batch, length)).masked_fill(~searches, 0)
    qtable = torch.randn(queries + 1, 8)
    qtable[0] = 0  # padding
    with torch.inference_mode():
        vecs = model.item_vectors()
        got = hidden_states(model, items, kinds, qids, qtable, vecs, last=last)
        per_search = model.text_proj(qtable[qids]) * searches.unsqueeze(-1)
        encode = model.encode_last if last else model.encode
        want = encode(vecs[items], kinds, per_search)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
