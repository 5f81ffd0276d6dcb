"""Eval tasks' ``options`` schemas, one per task that takes options (``eval.datasets.<name>.options``).

The registry :data:`TASK_OPTIONS` is what config validation reads: a task's evaluation code
(:mod:`alignkit.evaluation.tasks`) reads the validated options, and the config layer never
imports evaluation code."""

from __future__ import annotations

from collections.abc import Callable

from alignkit.config.attack import validate_task_options

QA_OPTIONS = ("question_template", "abstain_phrase", "abstain_match")


def _check_template(t, field: str, where: str) -> None:
    """An eval-set template must be a string with ``{<field>}`` and no other format fields."""
    if t is None:
        return
    try:
        ok = isinstance(t, str) and f"{{{field}}}" in t and t.format(**{field: ""}) is not None
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{where}: must be a string containing {{{field}}} and no other format fields, got {t!r}")


def qa_options(options: dict | None, where: str = "options") -> dict:
    """Validate the ``qa`` task's eval-set ``options`` (all optional):

    * ``question_template`` — the user turn sent to the model, with ``{question}`` (a recipe
      that trains on templated prompts evaluates with the same template: se_abstention);
    * ``abstain_phrase`` / ``abstain_match`` (``substring`` default | ``exact``) — an answer
      counts as an abstention iff it contains (or, normalised, equals) the phrase, instead of
      the judge's refusal notion (se_abstention.md §9); an abstention is never correct.
    """
    o = dict(options or {})
    bad = sorted(set(o) - set(QA_OPTIONS))
    if bad:
        raise ValueError(f"{where}: unknown qa option(s) {bad}; valid: {', '.join(QA_OPTIONS)}")
    _check_template(o.get("question_template"), "question", f"{where}.question_template")
    ph = o.get("abstain_phrase")
    if ph is not None and (not isinstance(ph, str) or not ph.strip()):
        raise ValueError(f"{where}.abstain_phrase: must be a non-empty string, got {ph!r}")
    if o.get("abstain_match", "substring") not in ("substring", "exact"):
        raise ValueError(f"{where}.abstain_match: must be substring or exact, got {o['abstain_match']!r}")
    if "abstain_match" in o and ph is None:
        raise ValueError(f"{where}.abstain_match: needs abstain_phrase")
    return o


DUALUSE_OPTIONS = ("question_template",)


def dualuse_options(options: dict | None, where: str = "options") -> dict:
    """Validate the ``dualuse`` task's eval-set ``options`` (all optional):
    ``question_template`` — the user turn sent to the model, with ``{prompt}`` (balanced_dpo
    injects its ``method.prompt_format`` so it evaluates with the wording it trained on)."""
    o = dict(options or {})
    bad = sorted(set(o) - set(DUALUSE_OPTIONS))
    if bad:
        raise ValueError(f"{where}: unknown dualuse option(s) {bad}; valid: {', '.join(DUALUSE_OPTIONS)}")
    _check_template(o.get("question_template"), "prompt", f"{where}.question_template")
    return o


# task -> its options validator (returns the validated options, raises ValueError naming the
# field); tasks not listed take no options
TASK_OPTIONS: dict[str, Callable[[dict], object]] = {
    "qa": qa_options,
    "dualuse": dualuse_options,
    "jailbreak": validate_task_options,
}


def recipe_qa_eval_options(datasets: dict, want: dict, sources: dict[str, str] | None = None
                           ) -> tuple[dict[str, dict], list[str]]:
    """``{qa eval set: its options with the recipe's ``want`` filled in}`` and the problems:
    invalid options, or options written in the config that disagree with ``want`` (the model
    would be trained on one prompt or phrase and evaluated on another). ``sources`` names the
    ``method.`` field each option comes from where the names differ."""
    sources = sources or {}
    out: dict[str, dict] = {}
    problems: list[str] = []
    for name, es in datasets.items():
        if es.task != "qa":
            continue
        where = f"eval.datasets.{name}.options"
        try:
            have = qa_options(es.options, where)
        except ValueError as e:
            problems.append(f"field {e}")
            continue
        for k, v in want.items():
            if k in have and have[k] != v:
                problems.append(f"field '{where}.{k}': {have[k]!r} differs from method.{sources.get(k, k)} {v!r} (the "
                                "model is trained on one and would be evaluated on the other); drop it or make them equal")
        out[name] = {**have, **want}
    return out, problems
