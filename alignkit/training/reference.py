"""The reference model's log-probs, computed once and cached on disk (``$ALIGNKIT_CACHE/ref_logps``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from alignkit.core.cache import cache_root


class ReferenceCache:
    """Reference log-prob tables on disk, keyed by (tokenised data + weights, reference model).

    A second run, a resumed run or a hyperparameter sweep over β / loss type / learning
    rate (none of which change the reference sums) reuses the table instead of running
    the reference pass again (trl#3985). ``model_key`` must describe the reference's
    weights and numerics (see :func:`reference_model_key`); the data part is a digest of
    every pair's token ids and per-token weights in ``pair_index`` order, so any change
    to the data, tokenizer, template, truncation or Mask-DPO masks is a miss."""

    VERSION = 1

    def __init__(self, root: str | Path, model_key: str):
        self.root, self.model_key = Path(root), model_key

    def key(self, dataset) -> str:
        import hashlib

        h = hashlib.sha256(f"v{self.VERSION}|{self.model_key}|{len(dataset)}".encode())
        cols = ["pair_index", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_weights", "rejected_weights"]
        for row in dataset.select_columns(cols).iter(batch_size=1024):
            h.update(json.dumps([row[c] for c in cols]).encode())
        return h.hexdigest()[:32]

    def load(self, key: str, n: int) -> torch.Tensor | None:
        path = self.root / f"{key}.pt"
        if not path.exists():
            return None
        table = torch.load(path, weights_only=True)
        return table if tuple(table.shape) == (n, 2) else None

    def save(self, key: str, table: torch.Tensor) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        torch.save(table.contiguous(), tmp)
        os.replace(tmp, self.root / f"{key}.pt")


def reference_model_key(model_cfg) -> str:
    """What fixes the reference's log-probs: the weights (a content fingerprint of a local
    directory, or hub id @ revision), dtype, quantisation and attention kernel. LoRA
    settings are left out: the reference is the base model with the adapter disabled."""
    from alignkit.core.fingerprint import source_fingerprint
    from alignkit.models import resolve_path

    fp = source_fingerprint(resolve_path(model_cfg.name_or_path), model_cfg.revision)
    q = model_cfg.quantization.model_dump(mode="json") if model_cfg.quantization is not None else None
    return json.dumps({"weights": fp, "dtype": model_cfg.dtype, "quantization": q,
                       "attn": model_cfg.attn_implementation}, sort_keys=True)


def reference_cache_root() -> Path:
    return cache_root() / "ref_logps"
