"""Dual-use rows (balanced_dpo.md §3): the class of a row, its validation fold, and the seed and
pair files' row schemas. Building balanced pairs from them is a prepare stage
(:mod:`alignkit.stages.dualuse`).

A validation fold holds out a *group*, never a single wording: the row's ``compound`` when it names one
(so a validation compound is never trained under any wording), else its ``seed_id`` (every rephrasing
of one seed together), else its prompt (:func:`row_fold`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from alignkit.data.errors import IssueCollector

FOLDS = 3


def fold_of(prompt: str, folds: int = FOLDS) -> int:
    """Stable fold of a prompt (sha256, not Python's salted hash)."""
    return int(hashlib.sha256(prompt.strip().encode("utf-8")).hexdigest()[:8], 16) % folds


def fold_key(row: dict, columns: dict[str, str] | None = None) -> str:
    """What a validation fold keeps together: ``compound``, else ``seed_id``, else ``prompt``."""
    columns = columns or {}
    for name in ("compound", "seed_id"):
        v = row.get(columns.get(name, name))
        if v is not None and str(v).strip():
            return f"{name}:{str(v).strip().lower() if name == 'compound' else str(v).strip()}"
    p = row.get(columns.get("prompt", "prompt"))
    return p.strip() if isinstance(p, str) else str(p)


def row_fold(row: dict, columns: dict[str, str] | None = None, folds: int = FOLDS) -> int:
    """The validation fold of a seed or pair row, by :func:`fold_key`. A row with neither ``compound`` nor
    ``seed_id`` gets :func:`fold_of` its prompt, the ``fold`` the dual-use eval schema gives it."""
    return fold_of(fold_key(row, columns), folds)


def parse_class(row: dict, columns: dict[str, str] | None = None) -> tuple[bool | None, str, str | None]:
    """``(is_legitimate, field, error)`` from ``is_legitimate`` (bool), ``true_label`` (1 =
    legitimate, 0 = illegitimate; the released test parquet) or ``label``."""
    columns = columns or {}
    for name in ("is_legitimate", "true_label", "label"):
        src = columns.get(name, name)
        if src not in row:
            continue
        v = row[src]
        if name == "is_legitimate":
            if isinstance(v, bool):
                return v, src, None
            return None, src, f"expected true/false, got {v!r}"
        if name == "true_label":
            if v in (0, 1) and not isinstance(v, float | str):
                return bool(v), src, None
            return None, src, f"expected 1 (legitimate) or 0 (illegitimate), got {v!r}"
        if isinstance(v, str) and v.strip().lower() in ("legitimate", "illegitimate"):
            return v.strip().lower() == "legitimate", src, None
        return None, src, f"expected 'legitimate' or 'illegitimate', got {v!r}"
    return None, "is_legitimate", "missing field (give is_legitimate, true_label or label)"


def _text(row: dict, name: str, columns: dict[str, str], issues: IssueCollector, i: int,
          required: bool = True) -> str | None:
    src = columns.get(name, name)
    v = row.get(src)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v.strip():
        issues.add(i, src, "missing field" if v is None else f"expected a non-empty string, got {v!r}")
        return None
    return v


def validate_seed_rows(raw: Sequence[tuple[int, dict]], file: str, columns: dict[str, str] | None = None,
                       max_errors: int = 20) -> list[dict]:
    """Seed rows -> ``{prompt, is_legitimate, compliant, refusal, compound, topic, split, fold, _row}``;
    every bad row reported at once (:class:`alignkit.data.DataError`)."""
    columns = columns or {}
    issues = IssueCollector(file, max_errors)
    out = []
    for i, row in raw:
        prompt = _text(row, "prompt", columns, issues, i)
        legit, field, err = parse_class(row, columns)
        if err:
            issues.add(i, field, err)
        comp = _text(row, "compliant_response", columns, issues, i)
        ref = _text(row, "refusal_response", columns, issues, i)
        compound = _text(row, "compound", columns, issues, i, required=False)
        if None in (prompt, legit, comp, ref):
            continue
        if comp.strip() == ref.strip():
            issues.add(i, columns.get("refusal_response", "refusal_response"),
                       "identical to compliant_response (no preference signal)")
            continue
        out.append({"prompt": prompt, "is_legitimate": legit, "compliant": comp, "refusal": ref,
                    "compound": compound, "topic": row.get("topic"), "split": row.get("split"),
                    "fold": row_fold(row, columns), "seed_id": str(row.get("seed_id", f"row{i}")), "_row": i})
    issues.raise_if_any()
    return out


def validate_pair_rows(raw: Sequence[tuple[int, dict]], file: str, columns: dict[str, str] | None = None,
                       max_errors: int = 20, refuses: Callable[[str], bool] | None = None) -> list[dict]:
    """alignkit-schema triplets (§3) -> normalised pair rows; every bad row reported at once.

    A row without a class column (the released LibraChemQA train parquet has only prompt / chosen /
    rejected) gets its class from the §2 polarity when ``refuses`` is given: chosen a refusal and rejected
    not -> illegitimate; rejected a refusal and chosen not -> legitimate; anything else is a row error.
    ``class_source`` says which (``column`` | ``chosen_refusal``)."""
    columns = columns or {}
    issues = IssueCollector(file, max_errors)
    out = []
    for i, row in raw:
        prompt = _text(row, "prompt", columns, issues, i)
        chosen = _text(row, "chosen", columns, issues, i)
        rejected = _text(row, "rejected", columns, issues, i)
        legit, field, err = parse_class(row, columns)
        source = "column"
        if err and refuses is not None and not any(columns.get(k, k) in row
                                                   for k in ("is_legitimate", "true_label", "label")):
            err = None
            if chosen is not None and rejected is not None:
                c, r = bool(refuses(chosen)), bool(refuses(rejected))
                if c == r:
                    issues.add(i, columns.get("chosen", "chosen"),
                               f"no class column, and the class cannot be derived: chosen and rejected are "
                               f"{'both' if c else 'neither'} refusals (give is_legitimate, true_label or label)")
                    continue
                legit, source = r, "chosen_refusal"
        if err:
            issues.add(i, field, err)
        fmt = row.get("compound_format")
        if fmt is not None and fmt not in ("name", "smiles"):
            issues.add(i, "compound_format", f"expected 'name' or 'smiles', got {fmt!r}")
            continue
        bad_idx = [k for k in ("rephrase_idx_prompt", "rephrase_idx_chosen", "rephrase_idx_rejected")
                   if row.get(k) is not None and (not isinstance(row[k], int) or isinstance(row[k], bool)
                                                   or row[k] < 0)]
        for k in bad_idx:
            issues.add(i, k, f"expected a non-negative integer, got {row[k]!r}")
        if None in (prompt, chosen, rejected, legit) or bad_idx:
            continue
        if chosen.strip() == rejected.strip():
            issues.add(i, columns.get("rejected", "rejected"), "chosen and rejected are identical")
            continue
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "is_legitimate": legit,
                    "class_source": source, "compound": row.get(columns.get("compound", "compound")),
                    "compound_format": fmt, "topic": row.get("topic"), "split": row.get("split"),
                    "fold": row_fold(row, columns),
                    "seed_id": str(row.get("seed_id") if row.get("seed_id") is not None else prompt),
                    **{k: row.get(k) for k in ("rephrase_idx_prompt", "rephrase_idx_chosen",
                                               "rephrase_idx_rejected")},
                    "_row": i})
    issues.raise_if_any()
    return out
