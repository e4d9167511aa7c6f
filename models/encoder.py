"""The sequence encoder: a small GPT-2 backbone over item, search and purchase events, with item embeddings
(ID + content) tied to the output layer so a user vector scores every item by a dot product."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model

from streamrec.records import EventKind

NUM_KINDS = 4  # 0 padding, then EventKind values


@dataclass
class EncoderConfig:
    num_items: int
    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.5
    text_dim: int = 0  # width of item/query text vectors; 0 = no text path
    num_attributes: int = 0  # attribute vocabulary (ids 1..n); 0 = no attribute path
    max_attributes: int = 0  # attributes kept per item
    id_dropout: float = 0.1  # share of items whose ID embedding is hidden per step, so content stands alone
    text_embedder: str = "hashing"  # which text embedder produced the text vectors (hashing | minilm)
    # LiGR-style blocks (eSASRec): each residual branch is scaled by a sigmoid gate computed from the stream
    # it is added to, h + sigmoid(W h) * branch(LN(h)). False = plain GPT-2 blocks.
    gated: bool = False
    # Feed-forward of each block: "gelu" (GPT-2's) or "swiglu", silu(W1 x) * (W3 x) through GPT-2's own
    # projections plus one more (W3), as in LiGR/eSASRec.
    ff: str = "gelu"

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> EncoderConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})  # type: ignore[arg-type]


class FastDropout(nn.Dropout):
    """nn.Dropout with its mask from uniform draws: CPU torch draws a Bernoulli mask element by element,
    about three times as slow as ``rand`` and a comparison (a (128, 16, 128) hidden state: 3.1 against 1.1
    ms; seven dropouts were ~9% of a Yelp training step). Same distribution, other random numbers; inference
    is untouched. It keeps ``p``, which GPT-2's attention reads when it applies dropout itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        keep = torch.rand_like(x) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


class SequenceEncoder(nn.Module):
    """Input token = item vector (or projected query text for a search) + event-kind embedding;
    positions count back from the newest event, so a short serving window uses training's positions."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.item_id = nn.Embedding(config.num_items + 1, d, padding_idx=0)
        nn.init.normal_(self.item_id.weight, std=0.02)
        with torch.no_grad():
            self.item_id.weight[0].zero_()
        self.kind = nn.Embedding(NUM_KINDS, d)
        nn.init.normal_(self.kind.weight, std=0.02)
        # No bias: padding and content-less items must map to the zero vector.
        self.text_proj = nn.Linear(config.text_dim, d, bias=False) if config.text_dim else None
        self.attr = (
            nn.EmbeddingBag(config.num_attributes + 1, d, mode="mean", padding_idx=0)
            if config.num_attributes
            else None
        )
        if self.attr is not None:
            nn.init.normal_(self.attr.weight, std=0.02)
            with torch.no_grad():
                self.attr.weight[0].zero_()
        # Content lives in buffers so it is saved in the state_dict with the model that was trained on it.
        self.register_buffer("item_text", torch.zeros(config.num_items + 1, config.text_dim), persistent=True)
        self.register_buffer(
            "item_attrs", torch.zeros(config.num_items + 1, max(config.max_attributes, 1), dtype=torch.long)
        )
        self.backbone = GPT2Model(
            GPT2Config(
                vocab_size=1,  # unused: tokens come in as inputs_embeds
                bos_token_id=None,
                eos_token_id=None,
                n_positions=config.max_len,
                n_embd=d,
                n_layer=config.layers,
                n_head=config.heads,
                n_inner=4 * d,
                resid_pdrop=config.dropout,
                embd_pdrop=config.dropout,
                attn_pdrop=config.dropout,
                activation_function="gelu",  # exact GELU: one fused op, ~2x faster on CPU than the tanh form,
            )
        )
        for parent in self.backbone.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Dropout:
                    setattr(parent, name, FastDropout(child.p))
        # Gates live beside the backbone, so a plain model's state_dict is unchanged.
        self.attn_gates = nn.ModuleList(nn.Linear(d, d) for _ in range(config.layers) if config.gated)
        self.mlp_gates = nn.ModuleList(nn.Linear(d, d) for _ in range(config.layers) if config.gated)
        swiglu = config.ff == "swiglu"
        self.ff_up = nn.ModuleList(nn.Linear(d, 4 * d, bias=False) for _ in range(config.layers) if swiglu)

    def content_vectors(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(num_items + 1, dim), or (len(rows), dim) for those rows alone: what an item looks like from its
        text and attributes alone."""
        text, attrs = cast(torch.Tensor, self.item_text), cast(torch.Tensor, self.item_attrs)
        if rows is not None:
            text, attrs = text[rows], attrs[rows]
        out = torch.zeros(len(attrs), self.config.dim, device=self.item_id.weight.device)
        if self.text_proj is not None:
            out = out + self.text_proj(text)
        if self.attr is not None:
            out = out + self.attr(attrs)
        return out

    def item_vectors(
        self, id_mask: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(num_items + 1, dim) item table used for both input and output; row 0 (padding) is zero. With
        ``rows``, those rows alone, computed alone (the same numbers): sampled-softmax training needs a
        batch's items and its negatives, not the table."""
        # An embedding lookup rather than indexing: the same rows and gradient, whose backward adds rows into
        # the table's gradient instead of a deterministic index_put (2.2 against 3.4-4.0 ms a Yelp step).
        ids = self.item_id.weight if rows is None else nn.functional.embedding(rows, self.item_id.weight)
        if id_mask is not None:
            ids = ids * (id_mask if rows is None else id_mask[rows]).unsqueeze(1)
        return ids + self.content_vectors(rows)

    def query_vectors(self, text: torch.Tensor) -> torch.Tensor:
        if self.text_proj is None:
            return torch.zeros(*text.shape[:-1], self.config.dim, device=text.device)
        return self.text_proj(text)

    def encode(
        self,
        item_vecs: torch.Tensor,  # (B, L, dim) item vectors (zeros at searches and padding)
        kinds: torch.Tensor,  # (B, L) 0 = padding, else EventKind; sequences left-padded
        query_vecs: torch.Tensor | None = None,  # (B, L, dim) query_vectors() at search positions
    ) -> torch.Tensor:
        """Hidden state at every position, (B, L, dim)."""
        x = self._inputs(item_vecs, kinds, query_vecs)
        if self.config.gated or len(self.ff_up):
            return self._blocks(x, kinds, last_only=False)
        length = kinds.shape[1]
        start = self.config.max_len - length
        positions = torch.arange(start, self.config.max_len, device=kinds.device).expand_as(kinds)
        mask = (kinds > 0).long()
        # A fully padded row would attend to nothing; let it see itself, its output is never used.
        mask[:, -1] = 1
        out = self.backbone(inputs_embeds=x, attention_mask=mask, position_ids=positions).last_hidden_state
        return out

    def encode_last(
        self,
        item_vecs: torch.Tensor,  # (B, L, dim), as for encode()
        kinds: torch.Tensor,  # (B, L)
        query_vecs: torch.Tensor | None = None,  # (B, L, dim), as for encode()
    ) -> torch.Tensor:
        """encode(...)[:, -1] at inference, computing only what the newest position needs: the last block
        attends from that one position and runs its MLP there alone (a serving user vector is the last
        position's). The same weights through plain torch ops; a test holds it equal to encode()."""
        assert not self.training, "encode_last is for inference; training uses encode()"
        return self._blocks(self._inputs(item_vecs, kinds, query_vecs), kinds, last_only=True)[:, 0]

    def _inputs(
        self, item_vecs: torch.Tensor, kinds: torch.Tensor, query_vecs: torch.Tensor | None
    ) -> torch.Tensor:
        """What a position feeds the blocks: its item, its event kind and, at a search, its query. Queries
        come projected already: a batch has few distinct queries, so projecting its query table and then
        gathering is cheaper than projecting text gathered to every position (the projection has no bias)."""
        x = item_vecs + self.kind(kinds)
        if query_vecs is not None:
            x = x + query_vecs * (kinds == int(EventKind.SEARCH)).unsqueeze(-1)
        return x

    def _blocks(self, x: torch.Tensor, kinds: torch.Tensor, last_only: bool) -> torch.Tensor:
        """The backbone's blocks run one by one: (B, L, dim), or (B, 1, dim) for the newest position alone
        (its last block attends from that position only and runs its MLP there)."""
        batch, length = kinds.shape
        backbone: Any = self.backbone  # GPT2Model: its blocks are used one by one
        positions = torch.arange(self.config.max_len - length, self.config.max_len, device=kinds.device)
        h = backbone.drop(x + backbone.wpe(positions))
        keep = kinds > 0
        keep[:, -1] = True  # as in encode(): a fully padded row sees itself
        # Additive masks with a finite minimum: padded rows get harmless finite values, never NaN.
        neg = torch.finfo(h.dtype).min
        pad_bias = torch.zeros(batch, 1, 1, length, dtype=h.dtype, device=h.device).masked_fill(
            ~keep[:, None, None, :], neg
        )
        causal = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()
        full_bias = pad_bias.masked_fill(~causal[None, None], neg)
        blocks = list(backbone.h)
        for i, block in enumerate(blocks):
            final = last_only and i == len(blocks) - 1
            branch = self._attend(block, block.ln_1(h), pad_bias if final else full_bias, last_only=final)
            if final:
                h = h[:, -1:]
            h = h + self._gated(self.attn_gates, i, h, branch)
            h = h + self._gated(self.mlp_gates, i, h, self._ff(i, block, block.ln_2(h)))
        return backbone.ln_f(h)

    def _ff(self, i: int, block: Any, x: torch.Tensor) -> torch.Tensor:
        mlp = block.mlp
        if not len(self.ff_up):
            return mlp(x)
        return mlp.dropout(mlp.c_proj(nn.functional.silu(mlp.c_fc(x)) * self.ff_up[i](x)))

    @staticmethod
    def _gated(gates: nn.ModuleList, i: int, h: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(gates[i](h)) * branch if len(gates) else branch

    def _attend(self, block: Any, a: torch.Tensor, bias: torch.Tensor, last_only: bool) -> torch.Tensor:
        attn = block.attn
        batch, length, dim = a.shape
        heads = self.config.heads
        # (3, batch, heads, length, head dim): strided views, no copies
        q, k, v = attn.c_attn(a).view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q = q[:, :, -1:]
        if self.training:
            weights = attn.attn_dropout(torch.softmax(q @ k.transpose(-1, -2) * attn.scaling + bias, dim=-1))
            out = weights @ v
        else:
            # One fused kernel at inference, the same product: no dropout to apply (2,000 users of the
            # Beauty model in bfloat16: 71 -> 68 us each, and closer to float32's vectors).
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scaling)
        out = out.transpose(1, 2).reshape(batch, q.shape[2], dim)
        return attn.resid_dropout(attn.c_proj(out))
