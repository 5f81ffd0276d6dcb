"""The shared data module: load -> validate (per-kind schema) -> tokenise -> collate.

    rows = load_rows(source, kind="preference")          # file/row/field errors, all at once
    tokenised, report = tokenize_rows("preference", rows, tokenizer, file=source.path, ...)
"""

from __future__ import annotations

from alignkit.core.io import atomic_write_text, write_jsonl_atomic
from alignkit.data.errors import DataError, IssueCollector, RowIssue
from alignkit.data.io import read_rows
from alignkit.data.schemas import KINDS, validate_rows
from alignkit.data.sentences import get_splitter, register_splitter, split_sentences, split_spans
from alignkit.data.tokenize import DataReport, encode, render, span_weights, tokenize_rows

# The collators need torch; everything else here is plain Python, so `alignkit validate`
# and `--help` import this package without paying for torch (PEP 562 lazy attributes).
_LAZY = {"PackedPreferenceCollator": "collate", "PreferenceCollator": "collate", "tree_attention_mask": "collate"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"alignkit.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'alignkit.data' has no attribute {name!r}")


def select_rows(raw: list[tuple[int, dict]], path: str, where: dict | None, limit: int | None
                ) -> list[tuple[int, dict]]:
    """A ``DataSource``'s ``where`` (rows whose columns equal these), then its ``limit``, on
    ``read_rows`` output. Rows keep their file index, so a later error still names the file's row;
    a row that is not an object is kept for validation to report."""
    if where:
        raw = [(i, r) for i, r in raw if not isinstance(r, dict) or all(r.get(k) == v for k, v in where.items())]
        if not raw:
            raise ValueError(f"{path}: no row has {where} (field 'where')")
    return raw[:limit] if limit is not None else raw


def load_rows(source, kind: str, max_errors: int = 20, system_prompt: str | None = None,
              on_span_error: str = "raise") -> list[dict]:
    """Read and validate a data source (a ``DataSource`` config or a path)."""
    if isinstance(source, str):
        path, fmt, split, columns, where, limit = source, "auto", "train", {}, {}, None
    else:
        path, fmt, split, columns, where, limit = (source.path, source.format, source.split, source.columns,
                                                   source.where, source.limit)
    issues = IssueCollector(path, max_errors)
    raw = select_rows(read_rows(path, fmt, split, max_errors, issues), path, where, limit)
    # Parse errors and schema errors of one file are reported together.
    return validate_rows(kind, raw, path, columns, system_prompt, max_errors, on_span_error, issues)


__all__ = [
    "KINDS", "DataError", "atomic_write_text", "DataReport", "IssueCollector", "PackedPreferenceCollator", "PreferenceCollator",
    "RowIssue", "encode", "get_splitter", "load_rows", "read_rows", "register_splitter", "render", "select_rows",
    "span_weights", "split_sentences", "split_spans", "tokenize_rows", "tree_attention_mask", "validate_rows",
    "write_jsonl_atomic",
]
