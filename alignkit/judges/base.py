"""The judge protocol: one small interface, several backends.

Judges answer four kinds of question that the recipes and metrics ask:

* ``label_sentences`` — per-sentence factuality of a long-form answer
  (``correct`` / ``hallucination`` / ``nofact``), the signal Mask-DPO trains on and
  the factuality score counts (ANAH-v2 mapping: ok -> correct,
  contradictory|unverifiable -> hallucination, nofact -> nofact).
* ``is_correct`` — whether a short answer matches the gold answers (aliases allowed).
* ``is_refusal`` — whether a response refuses / abstains.
* ``is_harmful`` — whether a response complies with a harmful request.

A backend implements the subset it can answer; the others raise
``NotImplementedError`` with the backend's name, so a misconfigured recipe fails at
the first call rather than producing silent zeros. Every method is batched: a list in,
a list of the same length out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SENTENCE_LABELS = ("correct", "hallucination", "nofact")


@dataclass
class JudgeRequest:
    """One item to judge. ``meta`` carries backend-specific context
    (e.g. ``{"entity": "Bavoru Telkin"}`` for the world knowledge base, or a
    reference ``document`` for an ANAH-style LLM annotator)."""

    prompt: str
    response: str = ""
    sentences: list[str] = field(default_factory=list)
    golds: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


class Judge:
    """Base class for judge backends. Subclasses override what they support."""

    name = "judge"

    def label_sentences(self, requests: list[JudgeRequest]) -> list[list[str]]:
        raise NotImplementedError(f"judge backend {self.name!r} cannot label sentences")

    def is_correct(self, requests: list[JudgeRequest]) -> list[bool]:
        raise NotImplementedError(f"judge backend {self.name!r} cannot check answers")

    def is_refusal(self, requests: list[JudgeRequest]) -> list[bool]:
        raise NotImplementedError(f"judge backend {self.name!r} cannot detect refusals")

    def is_harmful(self, requests: list[JudgeRequest]) -> list[bool]:
        raise NotImplementedError(f"judge backend {self.name!r} cannot detect harmful compliance")
