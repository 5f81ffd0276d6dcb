"""Sentence splitting with character spans (keep_end style: spans tile the text).

Mask-DPO needs the sentences of a response *and where they are*, so masks can be
built from character offsets exactly (mask_dpo.md §9.1). The default splitter is a
regex splitter that does not break after common abbreviations, initials, decimals
("3.5"), or inside an ellipsis, splits on newlines, and keeps closing quotes and
brackets with their sentence. Splitters are pluggable by name: ``register_splitter``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "no", "fig",
    "inc", "ltd", "co", "corp", "dept", "univ", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec", "approx", "ca", "cf", "al", "gen", "col", "lt", "sgt", "capt", "rev", "u.s",
}
_END = re.compile(r"[.!?。！？]+[\"'”’)\]]*")

Splitter = Callable[[str], list[tuple[int, int]]]
_SPLITTERS: dict[str, Splitter] = {}


def register_splitter(name: str) -> Callable[[Splitter], Splitter]:
    def deco(fn: Splitter) -> Splitter:
        _SPLITTERS[name] = fn
        return fn

    return deco


def get_splitter(name: str) -> Splitter:
    if name not in _SPLITTERS:
        raise ValueError(f"unknown sentence splitter {name!r}; available: {sorted(_SPLITTERS)}")
    return _SPLITTERS[name]


def _is_boundary(text: str, m: re.Match) -> bool:
    end = m.end()
    if any(c in "。！？" for c in m.group()):
        return True  # Chinese puts no space after its sentence marks
    if end < len(text) and not text[end].isspace():
        return False  # "3.5", "e.g.x", "word.Next" glued: not a boundary
    nxt = re.match(r"\s*(\S)", text[end:])
    if nxt and nxt.group(1).islower():
        return False  # '"Really?" she asked.' continues the sentence
    if m.group().startswith(".") and len(m.group().rstrip("\"'”’)]")) == 1:
        word = re.search(r"([\w.]+)$", text[: m.start()])
        if word:
            w = word.group(1).lower()
            if w in ABBREVIATIONS or (len(w) == 1 and w.isalpha()):  # "Dr.", "J. R. R. Tolkien"
                return False
    return True


@register_splitter("regex")
def split_spans(text: str) -> list[tuple[int, int]]:
    """Spans ``[(start, end)]`` that tile ``text``; trailing whitespace joins the sentence before."""
    cuts = []
    for m in _END.finditer(text):
        if _is_boundary(text, m):
            cuts.append(m.end())
    for m in re.finditer(r"\n+", text):
        cuts.append(m.start())
    spans, start = [], 0
    for c in sorted(set(cuts)):
        # Extend the cut over following whitespace so the next sentence starts at a word.
        while c < len(text) and text[c].isspace():
            c += 1
        if c > start and text[start:c].strip():
            spans.append((start, c))
            start = c
    if start < len(text):
        if text[start:].strip() or not spans:
            spans.append((start, len(text)))
        else:
            spans[-1] = (spans[-1][0], len(text))
    return spans


def split_sentences(text: str, splitter: str = "regex") -> list[str]:
    """Sentences whose concatenation is exactly ``text``."""
    return [text[s:e] for s, e in get_splitter(splitter)(text)]
