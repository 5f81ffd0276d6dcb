"""Chat-template rendering and tokenisation with an exact prompt/completion boundary.

The prompt and the completion are tokenised *separately* and concatenated, so the
prompt is always an exact token prefix of prompt+completion — the same tokens the
model sees at generation time. Tokenising the joined string instead lets BPE merge
across the boundary (trl#2054) and silently shifts or drops text.

The completion segment is what the chat template appends after the generation prompt
for the assistant turn (content + end-of-turn marker), so the stop token is trained
(trl#5988). Anything the template emits after the first end-of-turn token (a trailing
newline) is cut: the model never generates past it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from alignkit.data.errors import IssueCollector

LENGTH_POLICIES = ("truncate", "drop", "raise")


@dataclass
class DataReport:
    """Counts of what tokenisation did to the rows, by reason (written to the run dir)."""

    rows_in: int = 0
    rows_out: int = 0
    counts: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, **dict(self.counts)}


def _starts_with_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


# Stands in for the assistant content to find where a template puts it; no whitespace
# or markup, so trimming / escaping filters leave it intact.
_SENTINEL = "ALIGNKITCONTENTSENTINEL7F3A"


def render(tokenizer, prompt: list[dict], completion: str, end_turn: bool = True) -> tuple[str, str, int]:
    """Return ``(prompt_text, completion_segment, content_offset)``.

    ``content_offset`` is where the assistant's content starts inside the segment. It is
    located by rendering the turn once more with a sentinel as its content: whatever the
    template puts before the sentinel (an empty ``<think></think>``, a header) is the
    offset, and the real segment must start with that text followed by the content. A
    plain ``find`` would stop at the first copy of the content, which template text
    before it can contain, and shift every Mask-DPO span.

    ``prompt == []`` is TRL's language-modeling format: no template, the text itself
    plus EOS. A string ``prompt`` (a standard-format row whose prompt was extracted
    from chosen/rejected) is raw text too, as TRL tokenises it. ``end_turn=False`` (a response cut at the sampling token cap) ends the
    segment with the content: the model must not learn to stop mid-sentence.
    Raises ValueError when the template is not prefix-preserving or alters the content.
    """
    if not prompt or isinstance(prompt, str):  # raw text: TRL's standard implicit-prompt rows, or LM text
        prompt_text, segment, offset = prompt or "", completion + (tokenizer.eos_token or ""), 0
    elif getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

        def turn(content: str) -> str:
            full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": content}], tokenize=False)
            if not full.startswith(prompt_text):
                raise ValueError(
                    "the chat template renders the prompt differently alone and before an answer, so the prompt "
                    "cannot be an exact prefix; use a prefix-preserving template (e.g. one without date/system "
                    "injection)"
                )
            return full[len(prompt_text):]

        segment = turn(completion)
        probe = turn(_SENTINEL)
        pos = probe.find(_SENTINEL)
        offset = pos if pos >= 0 and segment.startswith(probe[:pos]) else -1
        if offset < 0 or not segment.startswith(completion, offset):
            raise ValueError("the chat template altered the assistant content (e.g. stripped whitespace)")
    else:  # base model without a template: plain text, EOS ends the answer
        prompt_text = "\n\n".join(m["content"] for m in prompt) + "\n"
        segment, offset = completion + (tokenizer.eos_token or ""), 0
    end = offset + len(completion)
    if not end_turn:
        return prompt_text, segment[:end], offset
    eos = tokenizer.eos_token
    if eos:
        cut = segment.find(eos, end)
        if cut >= 0:
            segment = segment[: cut + len(eos)]
    return prompt_text, segment, offset


def encode(tokenizer, prompt_text: str, segment: str) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """``(prompt_ids, completion_ids, completion_offsets)``; offsets are into ``segment``."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token
    if bos and _starts_with_bos(tokenizer) and not prompt_text.startswith(bos):
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]  # never a double BOS (axolotl#1616)
    enc = tokenizer(segment, add_special_tokens=False, return_offsets_mapping=True)
    return prompt_ids, enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def span_weights(
    offsets: list[tuple[int, int]], text: str, spans: list[tuple[int, int, float]], default: float = 1.0
) -> list[float]:
    """Per-token weights from character spans ``(start, end, weight)``.

    A token belongs to the span that contains its first non-whitespace character:
    byte-level BPE glues the space before a word to the word (" Paris"), and that
    token carries the *next* sentence's content. Tokens outside every span (end-of-turn
    marker, template text) get ``default``.
    """
    out = []
    si = 0
    spans = sorted(spans)
    for s, e in offsets:
        pos = s
        while pos < e and pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= e:
            pos = s
        while si < len(spans) and spans[si][1] <= pos:
            si += 1
        w = default
        if si < len(spans) and spans[si][0] <= pos < spans[si][1]:
            w = spans[si][2]
        out.append(w)
    return out


def apply_length_policy(
    prompt_ids: list[int], completions: list[list[int]], max_length: int | None, policy: str
) -> tuple[list[int] | None, str | None]:
    """Return ``(new completion lengths or None to drop, reason)``; ``raise`` is the caller's job."""
    if max_length is None:
        return [len(c) for c in completions], None
    if len(prompt_ids) >= max_length:
        return None, "prompt_too_long"
    if all(len(prompt_ids) + len(c) <= max_length for c in completions):
        return [len(c) for c in completions], None
    if policy == "truncate":
        return [min(len(c), max_length - len(prompt_ids)) for c in completions], "truncated"
    return None, "too_long"


def tokenize_rows(
    kind: str,
    rows: list[dict],
    tokenizer,
    file: str,
    max_length: int | None = None,
    length_policy: str = "truncate",
    weight_fn=None,
    max_errors: int = 20,
) -> tuple[list[dict], DataReport]:
    """Tokenise normalised ``sft`` or ``preference`` rows.

    sft -> ``input_ids``, ``completion_mask`` (0 prompt / 1 completion).
    preference -> ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and per-token
    ``chosen_weights``/``rejected_weights`` over the completion tokens; ``weight_fn(row,
    side, spans_in_segment)`` may turn labelled spans into weights (Mask-DPO).
    """
    if length_policy not in LENGTH_POLICIES:
        raise ValueError(f"length_policy must be one of {LENGTH_POLICIES}, got {length_policy!r}")
    report = DataReport(rows_in=len(rows))
    issues = IssueCollector(file, max_errors)
    out = []
    sides = ("completion",) if kind == "sft" else ("chosen", "rejected")
    for row in rows:
        rendered = {}
        try:
            for side in sides:
                prompt_text, segment, offset = render(tokenizer, row["prompt"], row[side],
                                                      end_turn=not row.get(f"{side}_truncated", False))
                p_ids, c_ids, offs = encode(tokenizer, prompt_text, segment)
                rendered[side] = (p_ids, c_ids, offs, segment, offset)
        except ValueError as e:  # template problems are per-row data errors, reported together
            issues.add(row.get("_row"), side, str(e))
            continue
        p_ids = rendered[sides[0]][0]
        lens, reason = apply_length_policy(p_ids, [rendered[s][1] for s in sides], max_length, length_policy)
        if reason is not None:
            if length_policy == "raise" and reason != "truncated":
                issues.add(row.get("_row"), sides[0], f"{len(p_ids)}+{max(len(rendered[s][1]) for s in sides)} tokens exceed max_length={max_length}")
                continue
            report.counts[reason] += 1
            if lens is None:
                continue
        if kind == "sft":
            c_ids = rendered["completion"][1][: lens[0]]
            out.append({**_meta(row), "input_ids": p_ids + c_ids, "completion_mask": [0] * len(p_ids) + [1] * len(c_ids)})
        else:
            rec = {**_meta(row), "prompt_ids": p_ids}
            for side, n in zip(sides, lens):
                _, c_ids, offs, segment, offset = rendered[side]
                spans = row.get(f"{side}_spans")
                if weight_fn is not None:
                    weights = weight_fn(row, side, offs[:n], segment, offset, spans)
                else:
                    weights = [1.0] * n
                rec[f"{side}_ids"] = c_ids[:n]
                rec[f"{side}_weights"] = weights[:n]
            out.append(rec)
    issues.raise_if_any()
    report.rows_out = len(out)
    return out, report


def _meta(row: dict) -> dict:
    return {"_row": row.get("_row")}
