"""Files written atomically (temp file + rename) and JSON-lines reading: every run file,
stage output and cache entry goes through here, so no reader ever sees half a file."""

from __future__ import annotations

import json
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write via a temp file in the same folder + rename: readers never see half a file,
    and a failure leaves the previous version (or nothing) in place."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSON lines atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
