"""Loaders: jsonl / json / parquet / csv files, `save_to_disk` folders and hub names.

Every row comes back with its 1-based row number so later errors can point at it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit.data.errors import IssueCollector

FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "disk", "hub")


def detect_format(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        return "disk"
    suffixes = "".join(p.suffixes[-2:]).lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet"),
                     (".csv", "csv")):
        if suffixes.endswith(ext):
            return fmt
    if not p.exists() and "/" in path and not path.startswith((".", "/")):
        return "hub"  # "org/name": a hub dataset, for users with network
    raise ValueError(f"{path}: cannot tell the data format from the name; set `format:` to one of {FORMATS[1:]}")


def _normalise(value: Any) -> Any:
    # Arrow turns missing struct keys into None; treat them as absent (ANCHORS §5).
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        return _normalise(value.tolist())
    return value


def read_rows(path: str, fmt: str = "auto", split: str = "train", max_errors: int = 20,
              issues: IssueCollector | None = None) -> list[tuple[int, dict]]:
    """Read ``(row_number, row)`` pairs. Malformed lines and bad bytes are reported together.

    With ``issues`` given, row-level problems are added to it instead of raised, so the
    caller can report them together with schema problems of the rows that did parse.
    """
    fmt = detect_format(path) if fmt == "auto" else fmt
    own = issues is None
    issues = IssueCollector(path, max_errors) if own else issues
    rows: list[tuple[int, dict]] = []
    if fmt != "hub" and not Path(path).exists():
        issues.add(None, None, "file not found")
        issues.raise_if_any()
    if fmt == "jsonl":
        with open(path, "rb") as f:
            for i, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    issues.add(i, None, f"invalid UTF-8 at byte {e.start}")
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    issues.add(i, None, f"malformed JSON: {e.msg} at column {e.colno}")
                    continue
                if not isinstance(obj, dict):
                    issues.add(i, None, f"expected a JSON object, got {type(obj).__name__}")
                    continue
                rows.append((i, obj))
    elif fmt == "json":
        try:
            text = Path(path).read_bytes().decode("utf-8")
            obj = json.loads(text)
        except UnicodeDecodeError as e:
            issues.add(None, None, f"invalid UTF-8 at byte {e.start}")
            issues.raise_if_any()
        except json.JSONDecodeError as e:
            issues.add(None, None, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}")
            issues.raise_if_any()
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            issues.add(None, None, "expected a list of objects (or {'data': [...]})")
            issues.raise_if_any()
        for i, r in enumerate(obj, start=1):
            if isinstance(r, dict):
                rows.append((i, r))
            else:
                issues.add(i, None, f"expected a JSON object, got {type(r).__name__}")
    else:
        import datasets

        if fmt == "parquet":
            ds = datasets.Dataset.from_parquet(path)
        elif fmt == "csv":
            ds = datasets.Dataset.from_csv(path)
        elif fmt == "disk":
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(path, split=split)
        rows = [(i, _normalise(r)) for i, r in enumerate(ds, start=1)]
    if own:
        issues.raise_if_any()
    if not rows and not issues.total:
        issues.add(None, None, "no rows")
        issues.raise_if_any()
    return rows


