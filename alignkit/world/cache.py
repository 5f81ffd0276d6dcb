"""Build-once cache of tiny worlds and the ``world:tiny[?seed=S&key=value]`` URI scheme.

A world lives at ``$ALIGNKIT_CACHE/world/<key>/`` with key = hash(seed, settings,
WORLD_VERSION). It is built in a temp dir beside it and renamed into place, under an
``flock`` so concurrent processes (e.g. DDP ranks) build it once; a hit only stats a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from alignkit.core.cache import cache_root  # noqa: F401 - part of this module's API
from alignkit.world.generate import DEFAULT_SETTINGS, WORLD_VERSION

_DONE = "base_report.json"  # written last: its presence means the world is complete


def normalize_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Merge with defaults and coerce types; unknown keys fail with the valid list."""
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(f"unknown world setting(s) {unknown}; valid: {sorted(DEFAULT_SETTINGS)}")
    out = dict(DEFAULT_SETTINGS)
    for k, v in settings.items():
        typ = type(DEFAULT_SETTINGS[k])
        try:
            out[k] = typ(v)
        except (TypeError, ValueError):
            raise ValueError(f"world setting {k}={v!r} is not a valid {typ.__name__}") from None
    return out


def world_key(seed: int, settings: dict[str, Any]) -> str:
    from alignkit.world.numerics import build_tag

    blob = json.dumps({"seed": int(seed), "settings": normalize_settings(settings), "version": WORLD_VERSION,
                       "build": build_tag()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_complete(world_dir: Path) -> bool:
    return (world_dir / _DONE).is_file() and (world_dir / "model").is_dir()


def _run_build(out: Path, seed: int, settings: dict[str, Any]) -> None:
    """Build one world into ``out`` in its own process, under the testbed's numeric mode
    (:mod:`alignkit.world.numerics`) whatever the caller's kernels and threads: the
    pretrained weights are then the same on every machine."""
    import subprocess
    import sys

    from alignkit.world.numerics import pinned_env, wanted

    cmd = [sys.executable, "-m", "alignkit.world.build", "--seed", str(seed), "--out", str(out),
           "--settings", json.dumps(settings)]
    r = subprocess.run(cmd, env=pinned_env() if wanted() else None)
    if r.returncode != 0:
        raise RuntimeError(f"building the tiny world (seed {seed}) failed with exit code {r.returncode} "
                           f"(its output is above): {' '.join(cmd)}")


def _build_atomic(final: Path, seed: int, settings: dict[str, Any]) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _run_build(tmp, seed, settings)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_tiny(seed: int = 0, **settings: Any) -> Path:
    """Return the world directory for (seed, settings), building it on first use."""
    st = normalize_settings(settings)
    root = cache_root() / "world"
    final = root / world_key(seed, st)
    if is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then reuses
        try:
            if is_complete(final):
                return final
            if final.exists():  # left by something other than this code; never half-trust it
                shutil.rmtree(final)
            # holding the lock, any temp dir for this key is from a killed build
            for stale in root.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            _build_atomic(final, int(seed), st)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def parse_world_uri(uri: str) -> tuple[int, dict[str, Any]]:
    """``world:tiny?seed=3&entities=120`` -> (3, {"entities": 120}); ``world:tiny`` -> seed 0
    (or ``$ALIGNKIT_WORLD_SEED``)."""
    if not isinstance(uri, str) or not uri.startswith("world:"):
        raise ValueError(f"not a world URI: {uri!r}; expected 'world:tiny' or 'world:tiny?seed=3'")
    parts = urlsplit(uri)
    if parts.path != "tiny" or parts.netloc or parts.fragment:
        raise ValueError(f"unknown world {uri!r}; the only world is 'world:tiny' (e.g. 'world:tiny?seed=3')")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError(f"malformed query in world URI {uri!r}; use 'world:tiny?seed=3&entities=120'") from None
    params: dict[str, Any] = {}
    for k, v in pairs:
        if k in params:
            raise ValueError(f"world URI {uri!r} repeats {k!r}")
        params[k] = v
    # no seed: 0, or $ALIGNKIT_WORLD_SEED (`make margins` runs the suite's learned-effect tests,
    # which use the shipped YAMLs' plain `world:tiny`, on other world seeds)
    seed_s = params.pop("seed", os.environ.get("ALIGNKIT_WORLD_SEED", "0"))
    try:
        seed = int(seed_s)
    except ValueError:
        raise ValueError(f"world URI {uri!r}: seed must be an integer, got {seed_s!r}") from None
    settings = normalize_settings(params)
    return seed, {k: settings[k] for k in params}


def world_dir_for_uri(uri: str) -> Path:
    seed, settings = parse_world_uri(uri)
    return ensure_tiny(seed, **settings)


def resolve_world_uri(uri: str) -> Path:
    """``world:tiny...`` -> the model directory (save_pretrained model + tokenizer)."""
    return world_dir_for_uri(uri) / "model"


def build_command(seed: int = 0, out: str | None = None) -> Path:
    """``alignkit world build [--seed S] [--out DIR]``: into the cache, or into DIR."""
    if out is None:
        return ensure_tiny(seed)
    final = Path(out).expanduser().resolve()
    if final.exists() and any(final.iterdir()):
        raise FileExistsError(f"--out {final} exists and is not empty; choose a new directory or delete it")
    if final.exists():
        final.rmdir()
    # The world is deterministic per (seed, settings): copy the cached build (atomically) when
    # there is one instead of pretraining again.
    cached = ensure_tiny(int(seed))
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.copytree(cached, tmp)
    os.replace(tmp, final)
    return final
