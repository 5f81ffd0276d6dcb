"""Where alignkit keeps what it can recompute: ``$ALIGNKIT_CACHE`` (default
``~/.cache/alignkit``) holds tiny worlds, stage outputs and reference log-prob tables."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE", "~/.cache/alignkit")).expanduser()


def default_stage_dir() -> Path:
    return cache_root() / "stages"
