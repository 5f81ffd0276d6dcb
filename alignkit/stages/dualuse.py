"""Dual-use preference data for balanced DPO (LibraAlign, balanced_dpo.md §2–§4).

Two inputs, both validated row by row (file, row, field, reason) before any model loads:

* **seeds** — one request per row: ``prompt``, its class (``is_legitimate`` bool,
  ``true_label`` 1/0 or ``label`` legitimate|illegitimate), ``compliant_response``,
  ``refusal_response``; optional ``compound`` / ``topic`` / ``split``. The tiny world's
  ``dualuse.jsonl`` is such a file. The builder draws a class-balanced set of seeds
  (``legit_seed_ratio`` = #legitimate / #illegitimate seeds; the paper's file names hint
  at 0, 0.5 and 1), rephrases every field (§4 step 2: templates on the tiny world, an LLM
  for real runs) and combines prompt × chosen × rejected (``combine_mode``).
* **pairs** — ready triplets in the alignkit schema (§3): ``prompt``, ``chosen``,
  ``rejected``, ``is_legitimate`` and optionally ``compound``, ``compound_format``
  (name|smiles), ``seed_id``, ``rephrase_idx_{prompt,chosen,rejected}``. Class balance is
  applied over ``seed_id`` groups (the prompt when absent); no rephrasing.

Pair polarity (§2 table): legitimate → chosen = helpful answer, rejected = refusal;
illegitimate → chosen = refusal, rejected = harmful answer.

``fold_of(prompt)`` is a stable hash fold (0..FOLDS-1) of a prompt: the dual-use eval
schema exposes it as ``fold`` so a validation part can be carved from the *train* split
(``where: {split: train, fold: 0}``) and the builder leaves the same rows out
(``holdout_fold``). Nothing here reads or changes the world's own data generation.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

# Tiny-world prompt rephrasings (§4 step 2, "Please provide the procedure for synthesizing X").
# Deliberately none of the world's own DUALUSE_TEMPLATES: test prompts are those wordings,
# so a rephrased training prompt never equals a held-out one (tests/data/test_dualuse.py).
WORLD_PROMPT_REPHRASINGS = [
    "Please provide the procedure for synthesizing {x}.",
    "Tell me the steps of synthesizing {x}.",
    "What steps should I follow to synthesize {x}?",
    "Explain how to synthesize {x}.",
    "Give me a method for synthesizing {x} at home.",
    "How is {x} synthesized?",
]
# Tiny-world answer rephrasings: a lead-in before the world's answer (its hazard / gold
# words, which the world's judge reads, stay intact).
WORLD_ANSWER_LEADS = ["Sure. ", "Here is how. ", "Of course. ", "Follow these steps. ", "Certainly. "]

# Versions come back as blocks, each after a line starting "### " (an answer can span lines,
# so one line per version would split a multi-line answer into several "versions").
DEFAULT_REPHRASE_PROMPT = (
    "Rephrase the following {kind} in {n} different ways. Keep its meaning and keep the name "
    "\"{compound}\" unchanged. Start each version with a line \"### 1\", \"### 2\", ... up to \"### {n}\" "
    "and put the version (it may span several lines) below it.\n\n{text}"
)
_KIND_WORDS = {"prompt": "request", "compliant": "answer", "refusal": "refusal"}
_BLOCK = re.compile(r"^[ \t]*###[^\n]*$", re.MULTILINE)


def parse_blocks(reply: str | None, n: int) -> list[str]:
    """The first ``n`` versions of an LLM reply: the text after each ``### `` line (padded
    with "" = unusable). A reply without such lines gives nothing, unless ``n`` is 1 (the
    whole reply is the version)."""
    r = reply or ""
    marks = list(_BLOCK.finditer(r))
    if not marks:
        blocks = [r.strip()] if n == 1 else []
    else:
        ends = [m.start() for m in marks[1:]] + [len(r)]
        blocks = [r[m.end():e].strip() for m, e in zip(marks, ends)]
    blocks = blocks[:n]
    return blocks + [""] * (n - len(blocks))


# ---------------------------------------------------------------- validation


# ---------------------------------------------------------------- class balance


def select_balanced(groups: dict[str, bool], ratio: float | None, n_illegitimate: int | None,
                    shortfall: str, rng: random.Random) -> tuple[list[str], dict]:
    """Pick seed ids so that #legitimate = round(ratio × #illegitimate).

    ``groups``: seed id -> is_legitimate. ``ratio`` None keeps every legitimate seed.
    ``n_illegitimate`` caps the illegitimate seeds (None: all), with or without a ratio.
    When there are too few legitimate seeds: ``reduce_illegitimate`` shrinks the illegitimate side to keep the ratio, ``oversample``
    repeats legitimate seeds, ``raise`` fails. A selection with no illegitimate seed, or with
    no legitimate seed while ``ratio`` is not 0, raises ValueError.
    Returns (ids, possibly repeated; report)."""
    legit = sorted(k for k, v in groups.items() if v)
    illegit = sorted(k for k, v in groups.items() if not v)
    rng.shuffle(legit)
    rng.shuffle(illegit)
    report: dict[str, Any] = {"available": {"legitimate": len(legit), "illegitimate": len(illegit)},
                              "legit_seed_ratio": ratio, "oversampled_legitimate": 0}
    if ratio is None:
        # no balance: every legitimate seed; n_illegitimate still caps the illegitimate side
        picked_l = legit
        picked_i = illegit if n_illegitimate is None else illegit[:n_illegitimate]
    else:
        n_i = len(illegit) if n_illegitimate is None else min(n_illegitimate, len(illegit))
        want_l = round(ratio * n_i)
        if want_l > len(legit):
            if shortfall == "raise":
                raise ValueError(f"legit_seed_ratio={ratio} needs {want_l} legitimate seeds for {n_i} illegitimate "
                                 f"ones; only {len(legit)} available (method.seed_shortfall: reduce_illegitimate "
                                 "or oversample)")
            if shortfall == "reduce_illegitimate":
                n_i = min(n_i, int(len(legit) / ratio)) if ratio > 0 else n_i
                want_l = min(len(legit), round(ratio * n_i))
        picked_i = illegit[:n_i]
        if want_l <= len(legit):
            picked_l = legit[:want_l]
        else:  # oversample: every legitimate seed, then repeats in a seeded order
            extra = [legit[j % len(legit)] for j in range(want_l - len(legit))] if legit else []
            picked_l = legit + extra
            report["oversampled_legitimate"] = len(extra)
    # A selection without one of the classes it asks for trains a different method (e.g. the
    # unbalanced ablation, or nothing at all): fail loudly rather than silently (§10).
    avail = f"{len(legit)} legitimate / {len(illegit)} illegitimate seeds available"
    if not picked_l and not picked_i:
        raise ValueError(f"class balance selected no seeds ({avail}, legit_seed_ratio={ratio}, "
                         f"n_illegitimate_seeds={n_illegitimate}, seed_shortfall={shortfall})")
    if not picked_i:
        raise ValueError(f"class balance selected no illegitimate seed ({avail}, legit_seed_ratio={ratio}); "
                         "balanced DPO needs refusal pairs")
    if ratio != 0 and not picked_l:
        raise ValueError(f"class balance selected no legitimate seed ({avail}, legit_seed_ratio={ratio}, "
                         f"seed_shortfall={shortfall}): the selection would be the unbalanced ablation; "
                         "use legit_seed_ratio 0 for that, or give more legitimate seeds / seed_shortfall "
                         "oversample")
    report["selected"] = {"legitimate": len(picked_l), "illegitimate": len(picked_i)}
    n_i = len(picked_i)
    report["achieved_ratio"] = len(picked_l) / n_i if n_i else None
    return picked_l + picked_i, report


# ---------------------------------------------------------------- rephrasing


def _refuses_default() -> Callable[[str], bool]:
    from alignkit.judges.rules import RulesJudge

    return RulesJudge().refuses


def check_rephrasing(kind: str, original: str, candidate: str, compound: str | None,
                     refuses: Callable[[str], bool]) -> str | None:
    """Why a rephrasing is unusable, or None. ``kind``: prompt | compliant | refusal."""
    c = (candidate or "").strip()
    if not c:
        return "empty"
    if c == original.strip():
        return "identical to the original"
    if not 0.3 <= len(c) / max(len(original.strip()), 1) <= 3.0:
        return "length far from the original"
    if kind == "prompt" and compound and compound.lower() not in c.lower():
        return "compound name lost"
    if kind == "refusal" and not refuses(c):
        return "no longer a refusal"
    if kind == "compliant" and refuses(c):
        return "became a refusal"
    return None


class TemplateRephraser:
    """Tiny-world rephrasings from fixed templates (no model): prompts from
    :data:`WORLD_PROMPT_REPHRASINGS` with the seed's compound, refusals from the world's
    refusal phrases (± "X can hurt people."), answers with a lead-in."""

    name = "templates"

    def __init__(self, refusals: Sequence[str] | None = None):
        if refusals is None:
            from alignkit.world.vocab import SAFETY_REFUSALS

            refusals = SAFETY_REFUSALS
        self.refusals = list(refusals)

    def candidates(self, kind: str, text: str, compound: str | None, n: int, rng: random.Random) -> list[str]:
        if kind == "prompt":
            pool = [t.format(x=compound) for t in WORLD_PROMPT_REPHRASINGS] if compound else []
        elif kind == "refusal":
            tail = f" {compound[0].upper() + compound[1:]} can hurt people." if compound else ""
            pool = [*self.refusals, *([r + tail for r in self.refusals] if tail else [])]
        else:
            pool = [lead + text for lead in WORLD_ANSWER_LEADS]
        pool = [p for p in dict.fromkeys(pool) if p.strip() != text.strip()]
        rng.shuffle(pool)
        out = pool[:n]
        return out + [""] * (n - len(out))  # too few templates: counted as unusable (empty)


class LLMRephraser:
    """Rephrasings from an LLM through a judge backend's chat interface (``http``:
    :meth:`HTTPJudge.chat`, cached and counted; ``hf``: a local model), one request per
    (seed, field) asking for ``n`` versions as ``### `` blocks (:func:`parse_blocks`) (§4 step 2; the paper's GPT model and
    prompt are unknown, §10: ``model`` and ``prompt_template`` are options)."""

    name = "llm"

    def __init__(self, judge_spec: dict, prompt_template: str = DEFAULT_REPHRASE_PROMPT,
                 system_prompt: str | None = None, temperature: float | None = None):
        from alignkit.judges import build_judge

        self.judge = build_judge(judge_spec)
        if not hasattr(self.judge, "complete"):
            raise ValueError(f"rephraser: judge backend {judge_spec.get('backend')!r} cannot chat; use http or hf")
        self.template, self.system_prompt, self.temperature = prompt_template, system_prompt, temperature
        self.calls = 0

    def batch(self, items: list[tuple[str, str, str | None]], n: int) -> list[list[str]]:
        convs = []
        for kind, text, compound in items:
            msg = self.template.format(kind=_KIND_WORDS[kind], n=n, compound=compound or "", text=text)
            convs.append(([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
                         + [{"role": "user", "content": msg}])
        self.calls += len(convs)
        if hasattr(self.judge, "chat") and self.temperature is not None:
            replies = self.judge.chat(convs, temperature=self.temperature)
        else:
            replies = self.judge.complete(convs)
        return [parse_blocks(r, n) for r in replies]


def build_rephraser(spec: dict | None):
    spec = dict(spec or {"backend": "templates"})
    backend = spec.pop("backend", "templates")
    if backend == "templates":
        return TemplateRephraser(spec.get("refusals"))
    if backend == "llm":
        return LLMRephraser(spec["judge"], spec.get("prompt_template") or DEFAULT_REPHRASE_PROMPT,
                            spec.get("system_prompt"), spec.get("temperature"))
    raise ValueError(f"unknown rephraser backend {backend!r}; valid: templates, llm")


def rephrase_fields(seeds: list[dict], n_per_field: int, rephraser, seed: int = 0,
                    refuses: Callable[[str], bool] | None = None) -> tuple[dict[str, dict[str, list[str]]], dict]:
    """Variants per seed and field: the original first, then the usable rephrasings
    (an unusable one falls back to the original, i.e. is dropped as a duplicate of it).
    Returns ({seed_id: {prompt, compliant, refusal: [texts]}}, yield report)."""
    refuses = refuses or _refuses_default()
    k = n_per_field - 1
    out = {s["seed_id"]: {f: [s[f]] for f in ("prompt", "compliant", "refusal")} for s in seeds}
    report: dict[str, Any] = {"requested": 0, "usable": 0, "unusable": Counter(), "by_field": {}}
    if k <= 0 or not seeds:
        report.update({"unusable": {}, "yield": None})
        return out, report
    items = [(s, f) for s in seeds for f in ("prompt", "compliant", "refusal")]
    if isinstance(rephraser, TemplateRephraser):
        cands = [rephraser.candidates(f, s[f], s.get("compound"), k,
                                      random.Random(f"{seed}:{s['seed_id']}:{f}")) for s, f in items]
    else:
        cands = rephraser.batch([(f, s[f], s.get("compound")) for s, f in items], k)
    for (s, f), cs in zip(items, cands):
        field = report["by_field"].setdefault(f, {"requested": 0, "usable": 0})
        for c in cs:
            report["requested"] += 1
            field["requested"] += 1
            why = check_rephrasing(f, s[f], c, s.get("compound"), refuses)
            if why is None and c.strip() in {v.strip() for v in out[s["seed_id"]][f]}:
                why = "duplicate"
            if why is not None:
                report["unusable"][why] += 1
                continue
            report["usable"] += 1
            field["usable"] += 1
            out[s["seed_id"]][f].append(c.strip())
    report["unusable"] = dict(report["unusable"])
    report["yield"] = report["usable"] / report["requested"] if report["requested"] else None
    if isinstance(rephraser, LLMRephraser):
        report["llm_calls"] = rephraser.calls
    return out, report


# ---------------------------------------------------------------- combination


def combine(seed: dict, variants: dict[str, list[str]], mode: str, pairs_per_seed: int,
            rng: random.Random) -> list[dict]:
    """Triplets of one seed (§4 step 3). Legitimate: chosen = helpful, rejected = refusal;
    illegitimate: chosen = refusal, rejected = harmful answer (§2 table)."""
    legit = seed["is_legitimate"]
    chosen = variants["compliant"] if legit else variants["refusal"]
    rejected = variants["refusal"] if legit else variants["compliant"]
    combos = list(itertools.product(range(len(variants["prompt"])), range(len(chosen)), range(len(rejected))))
    if mode == "sample":
        # the original triplet (0, 0, 0) always, then a seeded sample of the rest
        rest = combos[1:]
        rng.shuffle(rest)
        combos = [combos[0], *rest[: max(pairs_per_seed - 1, 0)]]
    return [{"prompt": variants["prompt"][p], "chosen": chosen[c], "rejected": rejected[r],
             "is_legitimate": legit, "compound": seed.get("compound"), "topic": seed.get("topic"),
             "seed_id": seed["seed_id"], "rephrase_idx_prompt": p, "rephrase_idx_chosen": c,
             "rephrase_idx_rejected": r} for p, c, r in combos]


def build_pairs(seeds: list[dict], *, legit_seed_ratio: float | None, n_illegitimate: int | None = None,
                seed_shortfall: str = "reduce_illegitimate", combine_mode: str = "product",
                rephrasings_per_field: int = 1, pairs_per_seed: int = 5, rephraser=None, seed: int = 0,
                refuses: Callable[[str], bool] | None = None) -> tuple[list[dict], dict]:
    """Balanced seeds -> rephrased -> combined preference triplets, plus a report with the
    counts per class and the rephrasing yield."""
    rng = random.Random(seed)
    by_id = {s["seed_id"]: s for s in seeds}
    ids, bal = select_balanced({k: s["is_legitimate"] for k, s in by_id.items()}, legit_seed_ratio,
                               n_illegitimate, seed_shortfall, rng)
    unique = [by_id[k] for k in dict.fromkeys(ids)]
    variants, yld = rephrase_fields(unique, rephrasings_per_field, rephraser or TemplateRephraser(), seed, refuses)
    pairs: list[dict] = []
    for j, k in enumerate(ids):  # a repeated (oversampled) seed repeats its triplets
        pairs += combine(by_id[k], variants[k], combine_mode, pairs_per_seed, random.Random(f"{seed}:{k}:{j}"))
    counts = Counter(p["is_legitimate"] for p in pairs)
    report = {"seeds": bal, "rephrasing": yld, "combine_mode": combine_mode,
              "pairs": {"legitimate": counts[True], "illegitimate": counts[False], "total": len(pairs)}}
    return pairs, report


def balance_pairs(pairs: list[dict], *, legit_seed_ratio: float | None, n_illegitimate: int | None = None,
                  seed_shortfall: str = "reduce_illegitimate", seed: int = 0) -> tuple[list[dict], dict]:
    """Class balance over ``seed_id`` groups of ready triplets (the ``pairs`` input)."""
    groups: dict[str, bool] = {}
    for p in pairs:
        if groups.setdefault(p["seed_id"], p["is_legitimate"]) != p["is_legitimate"]:
            raise ValueError(f"seed_id {p['seed_id']!r} has both legitimate and illegitimate rows (row {p['_row']})")
    ids, bal = select_balanced(groups, legit_seed_ratio, n_illegitimate, seed_shortfall, random.Random(seed))
    by: dict[str, list[dict]] = {}
    for p in pairs:
        by.setdefault(p["seed_id"], []).append(p)
    out = [p for k in ids for p in by[k]]
    counts = Counter(p["is_legitimate"] for p in out)
    return out, {"seeds": bal, "rephrasing": None, "combine_mode": None,
                 "pairs": {"legitimate": counts[True], "illegitimate": counts[False], "total": len(out)}}
