"""Reading and writing a model directory: state_dict + JSON config + metadata + item table + popularity +
the item index and query-word vectors. Never pickled modules, and nothing read can run code: a worker loads
whatever directory a ModelUpdate record names, so tensors load with ``weights_only`` and arrays without
pickle (tests/unit/test_untrusted_files.py)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamrec.models.encoder import EncoderConfig, SequenceEncoder
from streamrec.models.text import MiniLMEmbedder, TextEmbedder, make_embedder

HASHING_DIM = 256


def text_digest(text: str | None) -> str:
    """A short digest of an item's content text (None and "" alike: no text): what a model directory
    records of the text each item's text row was embedded from, so that a worker can tell a rewritten
    description from the one the model holds without embedding either."""
    return hashlib.blake2b((text or "").encode(), digest_size=8).hexdigest()


@dataclass
class ItemTable:
    ids: list[str]  # ids[i - 1] is item index i
    titles: list[str]
    in_stock: list[bool]
    # text_digest of the text each item's text row was embedded from; None (the whole table, or an item):
    # not recorded (older models), and a worker takes the first catalogue text it sees as the model's
    text_digests: list[str | None] | None = None


@dataclass
class Artifacts:
    model: SequenceEncoder
    config: EncoderConfig
    train_config: dict
    metadata: dict
    items: ItemTable
    popularity: np.ndarray  # (num_items + 1,) interaction counts, index 0 unused
    embedder: TextEmbedder | None


def embedder_for(config: EncoderConfig, words_path: Path | None = None) -> TextEmbedder | None:
    if not config.text_dim:
        return None
    return make_embedder(config.text_embedder, dim=config.text_dim, words_path=words_path)


def save(
    directory: Path,
    model: SequenceEncoder,
    train_config: dict,
    metadata: dict,
    items: ItemTable,
    popularity: np.ndarray,
    embedder: TextEmbedder | None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / "model.pt")
    config = {"encoder": model.config.to_json(), "train": train_config}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "metadata.json").write_text(json.dumps(metadata, indent=2))
    table: dict[str, list] = {"ids": items.ids, "titles": items.titles, "in_stock": items.in_stock}
    if items.text_digests is not None:
        table["text_digests"] = items.text_digests
    (directory / "items.json").write_text(json.dumps(table))
    np.save(directory / "popularity.npy", popularity.astype(np.float32))
    if isinstance(embedder, MiniLMEmbedder):
        embedder.save_words(directory / "query_words.npz")


def load(directory: Path, device: str = "cpu") -> Artifacts:
    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    config = EncoderConfig.from_json(raw["encoder"])
    model = SequenceEncoder(config)
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    table = json.loads((directory / "items.json").read_text())
    digests = table.get("text_digests")
    items = ItemTable(
        table["ids"],
        table["titles"],
        [bool(x) for x in table["in_stock"]],
        [d if isinstance(d, str) else None for d in digests] if isinstance(digests, list) else None,
    )
    return Artifacts(
        model=model,
        config=config,
        train_config=raw.get("train", {}),
        metadata=json.loads((directory / "metadata.json").read_text()),
        items=items,
        popularity=np.load(directory / "popularity.npy", allow_pickle=False),
        embedder=embedder_for(config, directory / "query_words.npz"),
    )
