"""The reference model's log-probs, computed once and cached on disk (``$ALIGNKIT_CACHE/ref_logps``)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from alignkit.core.cache import cache_root

log = logging.getLogger(__name__)


class ReferenceCache:
    """Reference log-prob tables on disk, keyed by (tokenised data + weights, reference model).

    A second run, a resumed run or a hyperparameter sweep over β / loss type / learning
    rate (none of which change the reference sums) reuses the table instead of running
    the reference pass again (trl#3985). ``model_key`` must describe the reference's
    weights and numerics (see :func:`reference_model_key`); the data part is a digest of
    every pair's token ids and per-token weights in ``pair_index`` order, so any change
    to the data, tokenizer, template, truncation or Mask-DPO masks is a miss."""

    VERSION = 2  # 2: the model key holds the loaded dtype and attention kernel

    def __init__(self, root: str | Path, model_key: str):
        self.root, self.model_key = Path(root), model_key

    def key(self, dataset) -> str:
        import hashlib

        h = hashlib.sha256(f"v{self.VERSION}|{self.model_key}|{len(dataset)}".encode())
        cols = ["pair_index", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_weights", "rejected_weights"]
        for row in dataset.select_columns(cols).iter(batch_size=1024):
            h.update(json.dumps([row[c] for c in cols]).encode())
        return h.hexdigest()[:32]

    # A temp file older than this was left by a process that died mid-write (a live writer
    # finishes a table of a few MB in well under a minute).
    STALE_TMP_S = 3600.0

    def load(self, key: str, n: int) -> torch.Tensor | None:
        """The table, or ``None`` (a miss) when there is none, or when the file is unreadable,
        truncated or of the wrong shape: the pass then runs again and :meth:`save` replaces it."""
        path = self.root / f"{key}.pt"
        if not path.exists():
            return None
        try:
            table = torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a miss, never a failed run
            log.warning("reference cache %s is unreadable (%s: %s); recomputing and replacing it",
                        path, type(e).__name__, e)
            return None
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != (n, 2) or not torch.isfinite(table).all():
            log.warning("reference cache %s does not hold a finite [%d, 2] table; recomputing and replacing it", path, n)
            return None
        return table.float()

    def save(self, key: str, table: torch.Tensor) -> None:
        """Write via an fsynced temp file and an atomic rename (and fsync the folder), so a
        crash or power loss leaves the old file or the new one, never a torn one; temp files
        that dead writers left behind are removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(table.detach().float().cpu().contiguous(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / f"{key}.pt")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for tmp in self.root.glob(".*.tmp"):
            try:
                if now - tmp.stat().st_mtime > self.STALE_TMP_S:
                    tmp.unlink()
            except FileNotFoundError:  # another process removed or renamed it first
                pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def reference_model_key(model_cfg, model=None) -> str:
    """What fixes the reference's log-probs: the weights (a content fingerprint of a local
    directory, or hub id @ revision), quantisation, and the numerics the model was *loaded*
    with: its parameters' real dtype and ``config._attn_implementation``. The configured
    ``dtype: auto`` is float32 on a CPU and bfloat16 on an A100, and ``attn_implementation:
    null`` is whatever transformers picked, so keying on the configured strings would let a
    shared cache serve a float32 table to a bfloat16 run. LoRA settings are left out: the
    reference is the base model with the adapter disabled."""
    from alignkit.core.fingerprint import source_fingerprint
    from alignkit.models import resolve_path

    fp = source_fingerprint(resolve_path(model_cfg.name_or_path), model_cfg.revision)
    q = model_cfg.quantization.model_dump(mode="json") if model_cfg.quantization is not None else None
    dtype, attn = model_cfg.dtype, model_cfg.attn_implementation
    if model is not None:
        dtype = str(_loaded_dtype(model)).removeprefix("torch.")
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None) or attn
    return json.dumps({"weights": fp, "dtype": dtype, "quantization": q, "attn": attn}, sort_keys=True)


def _loaded_dtype(model) -> torch.dtype:
    """The compute dtype: of the floating-point parameters (4-bit weights are stored as uint8)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return next(model.parameters()).dtype


def reference_cache_root() -> Path:
    return cache_root() / "ref_logps"
