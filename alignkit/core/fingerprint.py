"""Content fingerprints for cache keys: of JSON-able parts, of source code, of files and of
models (a directory, a hub reference or an in-memory model)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_digest(*objs) -> str:
    """Digest of the source of ``objs`` (modules, classes, functions), for a stage key: a
    stage whose code changed must never reuse what the old code wrote."""
    import inspect

    h = hashlib.sha256()
    for o in objs:
        h.update(inspect.getsource(o).encode())
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# Files hashed in full below this size; larger ones (weights) are hashed by sampled chunks.
_FULL_HASH_LIMIT = 4 << 20


_CHUNK = 1 << 16


def _hash_file(h: Any, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            h.update(f.read())
            return
        # Cheap digest of large weight files: 64 evenly spaced chunks plus the tail.
        # Any retrained checkpoint changes these bytes (and usually the safetensors header).
        for k in range(64):
            f.seek((size - _CHUNK) * k // 63)
            h.update(f.read(_CHUNK))


def model_fingerprint(model_dir_or_model: Any) -> str:
    """A short content hash identifying a model, for cache keys.

    * A directory: hashes every top-level file (config, tokenizer, weights, adapters);
      files over 4 MiB are hashed by size plus 64 sampled 64 KiB chunks, so an 8B
      checkpoint costs milliseconds rather than a full read.
    * A model object: hashes its config plus, per parameter, name, shape, dtype and the
      float64 sum and sum of squares (one pass over the weights, no copy to the host).
    """
    h = hashlib.sha256()
    if isinstance(model_dir_or_model, (str, os.PathLike)):
        root = Path(model_dir_or_model)
        if not root.is_dir():
            raise FileNotFoundError(f"model_fingerprint: {root} is not a directory")
        for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
            _hash_file(h, path)
        return h.hexdigest()[:16]

    import torch

    model = model_dir_or_model
    config = getattr(model, "config", None)
    if config is not None:
        h.update(
            config.to_json_string(use_diff=False).encode()
            if hasattr(config, "to_json_string")
            else repr(config).encode()
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().to(torch.float64)
            h.update(
                f"{name}:{tuple(p.shape)}:{p.dtype}:{x.sum().item():.10e}:{(x * x).sum().item():.10e}".encode()
            )
    return h.hexdigest()[:16]


def source_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """A cache-key fingerprint for a model *reference* (a config's ``model.name_or_path``).

    * A local directory: :func:`model_fingerprint` of its files.
    * A hub id (``name`` or ``org/name``): ``hub:<id>@<revision or main>``. Never the
      downloaded files: the key must be the same before and after the first download,
      and on every rank (rank 0 downloads and samples under ``main_process_first``; the
      others must hit its cache, not re-sample). Pin ``model.revision`` to a commit for
      a key that cannot go stale when the branch moves.

    A name that looks like a local path (``/``, ``./``, ``~``, more than one ``/``, or
    whose parent folder exists, like ``runs/model``) but is not a directory is an error.
    """
    root = Path(name_or_path).expanduser()
    if root.is_dir():
        return model_fingerprint(root)
    parent = root.parent
    path_like = (name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
                 or not _HUB_ID.fullmatch(name_or_path) or (str(parent) not in ("", ".") and parent.is_dir()))
    if path_like:
        raise FileNotFoundError(f"model_fingerprint: {name_or_path} is not a directory")
    return f"hub:{name_or_path}@{revision or 'main'}"


# Hub repo ids: "name" or "org/name" of letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")
