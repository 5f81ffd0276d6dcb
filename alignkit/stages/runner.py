"""Prepare stages (sample / judge / annotate / select): fingerprinted, atomic, skipped on re-run.

Each stage's output is ``<stage_dir>/<name>-<fingerprint>.jsonl`` plus a
``.provenance.json`` naming its inputs; the fingerprint hashes everything the output
depends on (input file digests, model fingerprint, parameters), so an unchanged stage
costs nothing and a changed one can never be confused with an old result.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from alignkit.core.cache import default_stage_dir
from alignkit.core.fingerprint import fingerprint
from alignkit.core.io import atomic_write_text, write_jsonl_atomic

log = logging.getLogger(__name__)


def run_stage(name: str, key: dict, fn: Callable[[], list[dict] | tuple[list[dict], dict]],
              stage_dir: str | Path | None = None) -> Path:
    """Return the stage output path, computing it with ``fn`` only when not cached.

    ``fn`` returns the rows, or ``(rows, report)``: the report (counts by reason...) is
    kept in the provenance file beside the output.
    """
    stage_dir = Path(stage_dir) if stage_dir else default_stage_dir()
    fp = fingerprint(name, key)
    out = stage_dir / f"{name}-{fp}.jsonl"
    if out.exists():
        log.info("stage %s: inputs unchanged, reusing %s", name, out)
        return out
    t0 = time.time()
    rows, report = fn(), None
    if isinstance(rows, tuple):
        rows, report = rows
    prov = {"stage": name, "fingerprint": fp, "inputs": key, "rows": len(rows), "seconds": round(time.time() - t0, 2)}
    if report is not None:
        prov["report"] = report
    # Provenance first, output last: the output's existence is what marks the stage done, so a
    # process that sees it (another rank, when the rank-0-first barrier is a no-op — accelerate's
    # MULTI_GPU config on a CPU-only machine) always finds the provenance beside it.
    atomic_write_text(out.with_suffix(".provenance.json"), json.dumps(prov, indent=2, default=str))
    write_jsonl_atomic(out, rows)
    log.info("stage %s: %d rows in %.1fs -> %s", name, len(rows), prov["seconds"], out)
    return out
