"""The serving fast path computes exactly the user vector of the full forward pass."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.models.encoder import EncoderConfig, SequenceEncoder
from streamrec.records import EventKind


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 4]),
    text=st.booleans(),
    batch=st.integers(1, 6),
    length=st.integers(1, 12),
    seed=st.integers(0, 10_000),
)
def test_encode_last_equals_the_last_position_of_encode(
    layers: int, heads: int, text: bool, batch: int, length: int, seed: int
) -> None:
    torch.manual_seed(seed)
    config = EncoderConfig(
        num_items=30, dim=16, layers=layers, heads=heads, max_len=12, text_dim=8 if text else 0
    )
    model = SequenceEncoder(config).eval()
    kinds = torch.randint(1, 4, (batch, length))
    # Left padding of any depth, a fully padded row included.
    pad = torch.randint(0, length + 1, (batch,))
    kinds[torch.arange(length)[None, :] < pad[:, None]] = 0
    items = torch.randint(1, 31, (batch, length))
    items[(kinds == 0) | (kinds == int(EventKind.SEARCH))] = 0
    query_text = torch.randn(batch, length, 8) if text else None
    with torch.inference_mode():
        vecs = model.item_vectors()[items]
        full = model.encode(vecs, kinds.clone(), query_text)[:, -1]
        last = model.encode_last(vecs, kinds.clone(), query_text)
    assert torch.allclose(full, last, atol=1e-5, rtol=1e-4)
