"""Row schemas per data kind, normalised to one internal shape.

Accepted inputs (every format TRL documents for its SFT and DPO trainers, and common
column names):

* ``sft``: language modeling ``text`` (the whole text is trained, no prompt, no chat
  template; EOS appended as TRL does -> ``prompt == []``); conversational language
  modeling ``messages`` whose last turn is the assistant's; prompt-completion
  ``prompt``/``completion``, standard (strings) or conversational (message lists).
  -> ``{"prompt": [msgs], "completion": str}``
* ``preference``: ``prompt``/``chosen``/``rejected`` (explicit prompt), or ``chosen``/
  ``rejected`` sharing a prefix (implicit prompt): whole conversations (the shared
  turns are the prompt) or plain strings (the shared text is the prompt, split as
  :func:`split_implicit_prompt`, TRL's ``extract_prompt`` rule). A string ``prompt``
  beside conversational ``chosen``/``rejected`` is ignored and the prompt extracted,
  as TRL's ``maybe_extract_prompt`` does. Optional sentence annotations
  ``chosen_sentences``/``chosen_labels`` (or ANAH's ``chosen_item: {"sents", "type"}``),
  or character ``chosen_spans`` with labels; labels are matched case-insensitively
  and an unknown label is a row error. ``chosen_truncated``/``rejected_truncated``
  (bool, from :mod:`alignkit.stages.pairs`): the response was cut at the token cap.
  -> ``{"prompt": [msgs], "chosen": str, "rejected": str, "chosen_spans": [(s, e, label)] | None, ...}``
* ``prompt``: a ``prompt`` (string or message list) alone — what sampling stages read.
* ``qa``: ``question`` + ``answers`` (list, first = canonical) or ``answer``.
* ``safety``: ``prompt`` (+ optional ``response``) + ``label``.
* ``dualuse``: ``prompt`` + class (``is_legitimate`` / ``true_label`` / ``label``) -> ``is_legitimate``
  and ``fold`` (:func:`alignkit.data.dualuse.row_fold`).

Every problem is reported with file, 1-based row, field and reason, all at once. A null in
a field the kind reads is a row error when other rows of the file give that field (``READS``).
"""

from __future__ import annotations

from typing import Any

from alignkit.data.errors import IssueCollector

KINDS = ("sft", "preference", "qa", "safety", "prompt", "dualuse")
ROLES = ("system", "user", "assistant", "tool")
# Column names seen in public datasets, tried when the canonical column is absent.
ALIASES = {
    "prompt": ("question", "instruction", "query", "input"),
    "completion": ("response", "answer", "output"),
    "question": ("prompt", "query"),
}
# Sentence labels -> the three classes the judges use (mask_dpo.md §3: ANAH-v2 mapping).
# String labels are looked up stripped and lower-cased (as metrics.py does), so
# "Hallucination" is a hallucination, not an unknown label masked on neither side.
LABEL_MAP = {
    "correct": "correct", "no_hallucination": "correct", "ok": "correct", 1: "correct",  # True == 1
    "hallucination": "hallucination", "contradictory": "hallucination", "unverifiable": "hallucination",
    0: "hallucination", "incorrect": "hallucination",  # False == 0
    "nofact": "nofact", "no_fact": "nofact",
}


# The fields each kind reads (canonical names; ALIASES and ``columns`` map them to a file's
# columns). A null in one of them is a row error when other rows of the same file give the
# field: TRL's implicit-prompt format is a file *without* a prompt column, never a null prompt.
READS: dict[str, tuple[str, ...]] = {
    "sft": ("messages", "text", "prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected", "chosen_truncated", "rejected_truncated"),
    "prompt": ("prompt",),
    "qa": ("question", "answers", "answer"),
    "safety": ("prompt", "label", "response"),
    "dualuse": ("prompt", "is_legitimate", "true_label", "label"),
}
# Preference annotations: a null among annotated rows is a span error (raised, or counted by
# Mask-DPO's on_mask_mismatch), and not read at all where the recipe ignores annotations.
_ANNOTATIONS = ("sentences", "labels", "spans", "item")


def _read_columns(kind: str, columns: dict[str, str]) -> set[str]:
    """The file columns ``kind`` reads: mapped names, or canonical names and their aliases."""
    out: set[str] = set()
    for name in READS[kind]:
        out.add(columns.get(name, name))
        if name not in columns:
            out.update(ALIASES.get(name, ()))
    return out


class _RowError(Exception):
    def __init__(self, field: str, reason: str, span: bool = False):
        self.field, self.reason, self.span = field, reason, span


def _messages(value: Any, field: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(field, "empty text")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _RowError(field, f"expected a string or a non-empty list of messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _RowError(f"{field}[{j}]", "expected a message {'role': ..., 'content': ...}")
        if m["role"] not in ROLES:
            raise _RowError(f"{field}[{j}].role", f"unknown role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise _RowError(f"{field}[{j}].content", f"expected a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _assistant_text(value: Any, field: str) -> str:
    if isinstance(value, list):
        msgs = _messages(value, field)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise _RowError(field, "a conversational completion must be exactly one assistant message")
        value = msgs[0]["content"]
    if not isinstance(value, str):
        raise _RowError(field, f"expected a string or an assistant message, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(field, "empty completion")
    return value


def _get(row: dict, name: str, columns: dict[str, str], required: bool = True) -> Any:
    src = columns.get(name, name)
    if src in row:
        return row[src]
    if name not in columns:
        for alias in ALIASES.get(name, ()):
            if alias in row:
                return row[alias]
    if required:
        raise _RowError(src, "missing field" + (f" (mapped from '{name}')" if src != name else ""))
    return None


def _norm_label(label: Any, field: str) -> str:
    key = label.strip().lower() if isinstance(label, str) else label
    try:
        return LABEL_MAP[key]
    except (KeyError, TypeError):  # TypeError: an unhashable label (a list, a dict)
        known = sorted(k for k in LABEL_MAP if isinstance(k, str))
        raise _RowError(field, f"unknown sentence label {label!r}; expected one of {known} "
                               "(any case), 1/true or 0/false", True) from None


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """``(prompt, chosen, rejected)`` from two strings that begin with the same prompt.

    TRL's ``extract_prompt`` rule: cut at the first differing character; when the
    character before the cut is a space, the space goes to the completions (so
    "... It is blue." / "... It is green." gives prompt "... It is" and " blue." /
    " green."). It does not back up further to a word boundary. When one string is a
    prefix of the other, TRL cuts one character before the shorter one ends (so both
    completions stay non-empty); that is kept. ``None`` when nothing is shared (TRL
    would read the last character there — an indexing accident, not a rule).
    """
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if idx is None:
        idx = n - 1
    elif idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    if idx <= 0 or not chosen[:idx].strip():
        return None
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _labelled_spans(row: dict, side: str, text: str, columns: dict[str, str],
                    present: frozenset[str] = frozenset()) -> list[tuple[int, int, str]] | None:
    """Character spans of annotated sentences in ``text``, located exactly, with labels.
    ``present``: the columns some row of the file gives (not null)."""
    for part in _ANNOTATIONS:
        src = columns.get(f"{side}_{part}", f"{side}_{part}")
        if src in row and row[src] is None and src in present:
            raise _RowError(src, "null, while other rows of this file are annotated; give this row's "
                                 "annotation or leave the column out of the file", True)
    sents = _get(row, f"{side}_sentences", columns, required=False)
    labels = _get(row, f"{side}_labels", columns, required=False)
    spans = _get(row, f"{side}_spans", columns, required=False)
    item = row.get(f"{side}_item")
    if sents is None and spans is None and isinstance(item, dict):  # official Mask-DPO / ANAH record
        sents, labels = item.get("sents"), item.get("type")
    if sents is None and spans is None:
        return None
    if labels is None or not isinstance(labels, list):
        raise _RowError(f"{side}_labels", "missing or not a list (required with sentences/spans)")
    norm = [_norm_label(lab, f"{side}_labels[{j}]") for j, lab in enumerate(labels)]
    out: list[tuple[int, int, str]] = []
    if spans is not None:
        if not isinstance(spans, list) or len(spans) != len(labels):
            raise _RowError(f"{side}_spans", "must be a list of [start, end] with one label each")
        prev = 0
        for j, sp in enumerate(spans):
            if not (isinstance(sp, list | tuple) and len(sp) == 2 and all(isinstance(x, int) for x in sp)):
                raise _RowError(f"{side}_spans[{j}]", "expected [start, end] integers")
            s, e = sp
            if not (0 <= s < e <= len(text)):
                raise _RowError(f"{side}_spans[{j}]", f"span [{s}, {e}) outside the response (length {len(text)})", True)
            if s < prev:
                raise _RowError(f"{side}_spans[{j}]", "spans must be sorted and must not overlap", True)
            out.append((s, e, norm[j]))
            prev = e
        return out
    if not isinstance(sents, list) or len(sents) != len(labels):
        raise _RowError(f"{side}_sentences", f"must be a list with one label each ({len(labels)} labels)")
    cursor = 0
    for j, sent in enumerate(sents):
        if not isinstance(sent, str) or not sent:
            raise _RowError(f"{side}_sentences[{j}]", "expected a non-empty string")
        # Locate exactly, in order; whitespace between sentences may be skipped, nothing else.
        pos = text.find(sent, cursor)
        if pos < 0 or text[cursor:pos].strip():
            raise _RowError(f"{side}_sentences[{j}]",
                            f"sentence not found in the response at or after character {cursor}: {sent[:60]!r}", True)
        out.append((pos, pos + len(sent), norm[j]))
        cursor = pos + len(sent)
    return out


def _normalise_row(kind: str, row: dict, columns: dict[str, str], system_prompt: str | None,
                   on_span_error: str = "raise", present: frozenset[str] = frozenset()) -> dict:
    out: dict[str, Any] = {}
    for src in sorted(_read_columns(kind, columns)):
        if src in row and row[src] is None and src in present:
            raise _RowError(src, "null (got NoneType), while other rows of this file give this field (a "
                                 "file that uses an implicit or optional field leaves the column out)")
    if kind in ("sft", "preference"):
        if kind == "sft" and _get(row, "messages", columns, required=False) is not None:
            msgs = _messages(_get(row, "messages", columns), columns.get("messages", "messages"))
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise _RowError("messages", "the last message must be the assistant's, after at least one other")
            out["prompt"], out["completion"] = msgs[:-1], _assistant_text(msgs[-1]["content"], "messages[-1].content")
        elif kind == "sft" and _get(row, "prompt", columns, required=False) is None \
                and _get(row, "text", columns, required=False) is not None:
            # TRL's language-modeling format: no prompt, the whole text is trained.
            text = _get(row, "text", columns)
            if not isinstance(text, str) or not text.strip():
                raise _RowError(columns.get("text", "text"), "expected a non-empty string")
            out["prompt"], out["completion"] = [], text
        elif kind == "sft":
            out["prompt"] = _messages(_get(row, "prompt", columns), columns.get("prompt", "prompt"))
            out["completion"] = _assistant_text(_get(row, "completion", columns), columns.get("completion", "completion"))
        else:
            chosen, rejected = _get(row, "chosen", columns), _get(row, "rejected", columns)
            prompt = _get(row, "prompt", columns, required=False)
            split = None
            conv = _is_conversation(chosen) and _is_conversation(rejected)
            # TRL's maybe_extract_prompt: a string prompt beside whole conversations is a
            # redundant copy; the conversations' shared turns are the prompt.
            if isinstance(prompt, str) and conv and not (len(chosen) == 1 and chosen[0].get("role") == "assistant"):
                prompt = None
            if prompt is None and conv:  # implicit prompt: shared conversation prefix
                c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
                k = 0
                while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
                    k += 1
                if k == 0:
                    raise _RowError("prompt", "missing field, and chosen/rejected share no leading turn to "
                                              "extract it from (implicit-prompt conversations)")
                prompt, chosen, rejected = c[:k], c[k:], r[k:]
            elif prompt is None:  # implicit prompt: shared text prefix (TRL's standard format)
                if not (isinstance(chosen, str) and isinstance(rejected, str)):
                    raise _RowError("prompt", "missing field (and chosen/rejected are neither two conversations "
                                              "nor two strings to extract a shared prompt from)")
                split = split_implicit_prompt(chosen, rejected)
                if split is None:
                    raise _RowError("prompt", "missing field, and chosen/rejected share no leading text to extract "
                                              "an implicit prompt from")
                prompt, chosen, rejected = split
            # TRL tokenises standard (string) rows as raw text, without a chat template: the
            # extracted prompt ends mid-sentence ("... It is"), so it is kept as raw text too.
            raw = isinstance(prompt, str) and split is not None
            out["prompt"] = prompt if raw else _messages(prompt, columns.get("prompt", "prompt"))
            out["chosen"] = _assistant_text(chosen, columns.get("chosen", "chosen"))
            out["rejected"] = _assistant_text(rejected, columns.get("rejected", "rejected"))
            if out["chosen"] == out["rejected"]:
                raise _RowError("rejected", "chosen and rejected are identical (no preference signal)")
            for side in ("chosen", "rejected"):
                flag = row.get(f"{side}_truncated")
                if flag is not None:
                    if not isinstance(flag, bool):
                        raise _RowError(f"{side}_truncated", f"expected true/false, got {flag!r}")
                    out[f"{side}_truncated"] = flag
                if on_span_error == "ignore":  # recipes that never read annotations (plain DPO)
                    out[f"{side}_spans"] = None
                    continue
                try:
                    out[f"{side}_spans"] = _labelled_spans(row, side, out[side], columns, present)
                except _RowError as e:
                    if on_span_error == "raise":
                        raise
                    out[f"{side}_spans"], out["_span_error"] = None, f"{e.field}: {e.reason}"
        if system_prompt and isinstance(out["prompt"], list) and out["prompt"] and out["prompt"][0]["role"] != "system":
            out["prompt"] = [{"role": "system", "content": system_prompt}, *out["prompt"]]
    elif kind == "prompt":
        out["prompt"] = _messages(_get(row, "prompt", columns), columns.get("prompt", "prompt"))
        if system_prompt and out["prompt"][0]["role"] != "system":
            out["prompt"] = [{"role": "system", "content": system_prompt}, *out["prompt"]]
    elif kind == "qa":
        q = _get(row, "question", columns)
        if not isinstance(q, str) or not q.strip():
            raise _RowError(columns.get("question", "question"), "expected a non-empty string")
        answers = _get(row, "answers", columns, required=False)
        if answers is None:
            answers = _get(row, "answer", columns, required=False)
        if answers is None:
            raise _RowError("answers", "missing field (give 'answers' as a list or 'answer' as a string)")
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise _RowError("answers", "expected a non-empty list of non-empty strings")
        out["question"], out["answers"] = q, answers
    elif kind == "safety":
        p = _get(row, "prompt", columns)
        if not isinstance(p, str) or not p.strip():
            raise _RowError(columns.get("prompt", "prompt"), "expected a non-empty string")
        label = _get(row, "label", columns)
        if not isinstance(label, str | int | bool):
            raise _RowError("label", f"expected a string or int label, got {type(label).__name__}")
        out["prompt"], out["label"] = p, label
        resp = _get(row, "response", columns, required=False)
        if resp is not None:
            out["response"] = resp
    elif kind == "dualuse":  # balanced DPO's test rows (balanced_dpo.md §3): prompt + class
        from alignkit.data.dualuse import parse_class, row_fold

        p = _get(row, "prompt", columns)
        if not isinstance(p, str) or not p.strip():
            raise _RowError(columns.get("prompt", "prompt"), "expected a non-empty string")
        legit, field, err = parse_class(row, columns)
        if err:
            raise _RowError(field, err)
        # fold: the fold the pairs builder's holdout_fold leaves out of training (by compound, else
        # seed_id, else the prompt), so `where: {split: train, fold: 0}` selects exactly that part
        out["prompt"], out["is_legitimate"], out["fold"] = p, legit, row_fold(row, columns)
    else:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
    # Keep metadata columns (entity, topic, ids...) for later stages and reports.
    for k, v in row.items():
        if k not in out and k not in columns.values() and not k.startswith(("chosen_", "rejected_")):
            out.setdefault(k, v)
    return out


def validate_rows(
    kind: str,
    rows: list[tuple[int, dict]],
    file: str,
    columns: dict[str, str] | None = None,
    system_prompt: str | None = None,
    max_errors: int = 20,
    on_span_error: str = "raise",
    issues: IssueCollector | None = None,
) -> list[dict]:
    """Normalise rows of ``kind``; raise one :class:`DataError` listing every bad row.

    ``on_span_error`` (sentence annotations that cannot be located or carry unknown
    labels): ``raise`` (a data error), ``keep`` — the row is kept with ``_span_error``
    set and no spans, for the caller to drop or fall back on *and count* (Mask-DPO's
    ``on_mask_mismatch``) — or ``ignore``: annotations are not read at all (plain DPO,
    which never uses them, must not fail on them).
    """
    columns = columns or {}
    issues = issues or IssueCollector(file, max_errors)
    present = frozenset(k for _, row in rows if isinstance(row, dict) for k, v in row.items() if v is not None)
    out = []
    for i, row in rows:
        try:
            r = _normalise_row(kind, row, columns, system_prompt, on_span_error, present)
            r["_row"] = i
            out.append(r)
        except _RowError as e:
            issues.add(i, e.field, e.reason)
    issues.raise_if_any()
    return out
