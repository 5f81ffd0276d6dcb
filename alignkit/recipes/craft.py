"""CRaFT (Zhu et al., AAAI 2025, arXiv 2410.06913): refusal-aware instruction tuning with
certainty filtering and knowledge flow (craft.md).

Prepare stages (fingerprinted by all their inputs, atomic, skipped when unchanged;
:mod:`alignkit.stages`), all before the distributed trainer exists — on rank 0 first,
the other ranks then hit the cache (as :mod:`alignkit.stages.pairs` does):

1. ``craft_query``     — knowledge state of the initial model M0 on ``data.train`` (QA rows):
   open-ended μ / σ from N samples (:func:`alignkit.stages.knowledge.oe_knowledge_state`) or
   multiple-choice μ / σ from letter probabilities (``method.task: mcqa``).
2. ``craft_rehearse``  — rehearsal: a brief single-process fine-tune of M0 on items it
   already knows (μ, σ above thresholds; target = its own most frequent correct answer),
   then the same query again: Δμ = μ(M̃) − μ(M0). Only the flow variants need it.
3. ``craft_select``    — Algorithm 1 (or a baseline's rule): every item gets a bucket
   (vanilla / idk / dropped) and the reason; the counts go to ``craft_report.json``.
4. ``craft_initial_eval`` — the initial model on the eval sets: the THS reference point.

Then RAIT: SFT of the *initial* model on vanilla (gold answer) + idk ("I don't know.")
rows, evaluated on the eval sets with P_c / P_w / P_r and THS relative to M0.

Baselines are variants of this recipe (``method.variant``): ``van`` (N_van + N_idk random
items, answers unchanged), ``cor_rait`` (correctness only, random within buckets),
``corcer_rait`` (correctness + certainty ordering, no flow = "w/o Flow"),
``craft_no_certainty`` (correctness + flow, random within buckets = "w/o Cer").
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alignkit.config import LoraConfig, RunConfig, Strict, common_checks
from alignkit.core.distributed import rank0_first
from alignkit.core.fingerprint import code_digest

log = logging.getLogger(__name__)
NAME = "craft"
DATA_KIND = "qa"
VARIANTS = ("craft", "van", "cor_rait", "corcer_rait", "craft_no_certainty")
_FLOW = ("craft", "craft_no_certainty")
_CERTAINTY_ORDER = ("craft", "corcer_rait")

_METRICS = {}
for _ev, _tag in (("qa_test", "ID"), ("qa_ood", "OOD")):
    _METRICS.update({f"{_ev}:p_correct": f"P_c {_tag}", f"{_ev}:p_wrong": f"P_w {_tag}",
                     f"{_ev}:ths": f"THS {_tag}", f"{_ev}:refusal_rate/known": f"refusal on known {_tag}"})

DEMO = {
    "title": "CRaFT: truthful helpfulness on held-out questions (qa_test = ID, qa_ood = OOD wordings)",
    "note": "Greedy short answers, each judged correct / wrong / refused by the world's knowledge base. THS = "
            "P_c − P_w·P_c0/P_w0 relative to the initial model (its row is 0 by definition; CIs hold P_c0/P_w0 "
            "fixed). All rows but the initial one fine-tune the initial model on data selected from qa_train "
            "by the same knowledge-state query (N=10 samples at T=1, MiniLM certainty); hyperparameters were "
            "chosen on qa_val.",
    "evals": ["qa_test", "qa_ood"],
    "metrics": _METRICS,
    "columns": {
        "qa_test:p_correct": "share of held-out qa_test questions (never trained on) answered correctly.",
        "qa_test:p_wrong": "share of qa_test questions answered wrongly (neither correct nor a refusal).",
        "qa_test:ths": "Truthful Helpfulness Score on qa_test, % (0 = the initial model; higher is better).",
        "qa_test:refusal_rate/known": "refusals among qa_test questions whose fact the base model was "
                                      "pretrained on: over-refusal of what the model knows.",
        "qa_ood:p_correct": "P_c on qa_ood: held-out people and question wordings never seen in training.",
        "qa_ood:p_wrong": "P_w on qa_ood.",
        "qa_ood:ths": "THS on qa_ood, % relative to the initial model on the same questions.",
        "qa_ood:refusal_rate/known": "refusals among qa_ood questions on pretrained facts.",
    },
    "rows": [("initial", None), ("Van-Tuning", "craft"), ("Cor-RAIT", "craft"), ("CorCer-RAIT", "craft"),
             ("CRaFT", "craft")],
    "row_overrides": {"Van-Tuning": ["method.variant=van"], "Cor-RAIT": ["method.variant=cor_rait"],
                      "CorCer-RAIT": ["method.variant=corcer_rait"], "CRaFT": ["method.variant=craft"]},
    "claims": [("CRaFT", "Cor-RAIT", "qa_test:ths"), ("CRaFT", "Cor-RAIT", "qa_ood:ths")],
    "expect_text": "CRaFT > Cor-RAIT on THS, ID and OOD (the paper: by refusing less of what the model knows)",
    # the mechanism the paper names: less over-refusal on known facts (Cor-RAIT > CRaFT in refusals)
    "checks": [("Cor-RAIT", "CRaFT", "qa_test:refusal_rate/known"), ("CRaFT", "Cor-RAIT", "qa_test:p_correct"),
               ("CRaFT", "CorCer-RAIT", "qa_test:ths"), ("Cor-RAIT", "initial", "qa_test:ths")],
    # `alignkit demo --smoke` (make test): every stage of every row, on small budgets
    "smoke": ["data.train.limit=48", "method.num_samples=3", "method.rehearsal.size=8",
              "method.rehearsal.num_train_epochs=1", "method.n_van=16", "method.n_idk=8", "train.max_steps=2",
              "eval.limit=6"],
}


class RehearsalConfig(Strict):
    """The knowledge-flow rehearsal (craft.md §5.2–5.4)."""

    mu_min: float = Field(0.995, ge=0, le=1, description="rehearse items with mu >= this (MCQA: mu > this)")
    sigma_min: float = Field(0.995, description="OEQA only: and sigma >= this")
    size: int = Field(1000, ge=1, description="at most this many rehearsal items, drawn at random")
    seed: int = Field(0, description="subsampling seed (code: 0 TriviaQA, 42 MMLU)")
    target: Literal["model_majority", "gold"] = Field(
        "model_majority", description="OEQA target: the model's most frequent correct sample, or the gold answer")
    prompt_template: str = Field("{question}", description="user turn of the rehearsal rows (the code: the bare "
                                                             "question, BASIC1)")
    learning_rate: float = Field(2e-6, gt=0)
    num_train_epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(16, ge=1, description="rows per forward pass")
    gradient_accumulation_steps: int = Field(1, ge=1, description="forward passes per optimiser step")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_scheduler_type: Literal["cosine", "linear"] = "cosine"
    lora: LoraConfig | None = Field(None, description="rehearse a LoRA adapter instead of all weights")


class Shot(Strict):
    """An in-context example of the knowledge query: an earlier user turn and the answer."""

    question: str
    answer: str


class Method(Strict):
    variant: Literal["craft", "van", "cor_rait", "corcer_rait", "craft_no_certainty"] = Field(
        "craft", description="craft | van (Van-Tuning) | cor_rait | corcer_rait (w/o Flow) | craft_no_certainty")
    task: Literal["oeqa", "mcqa"] = "oeqa"
    prompt_template: str = Field("{question}", description="user turn of the RAIT rows and of the evaluation "
                                                            "(the code: REFUSE1)")
    # knowledge-state query (§5.1)
    query_template: str | None = Field(None, description="user turn of the knowledge query and re-query (the code: "
                                                         "BASIC2 'as simple as possible'); null = prompt_template")
    query_shots: list[Shot] = Field(default_factory=list, description="in-context examples before the query, as "
                                                                      "earlier chat turns (the code: 3 dev items)")
    num_samples: int = Field(10, ge=2)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(50, ge=1)
    gen_batch_size: int = Field(32, ge=1)
    correctness_match: Literal["alias_substring", "exact"] = "alias_substring"
    refusal_keywords: list[str] = Field(default_factory=lambda: ["i don't know", "i do not know"])
    embedder: dict = Field(default_factory=lambda: {"backend": "minilm"},
                           description="certainty embedder: minilm (default) | sentence_transformers | hashing")
    mc_options: int = Field(4, ge=2, le=10)
    # craft.md §5.1 / §9.5: the code reads the letters' raw probabilities after "Answer:" on a
    # base-model (completion) prompt, where they take nearly all the mass. After a chat prompt
    # they may take 5%: raw entropy then calls that item more certain than a confident one.
    mcqa_prompt_format: Literal["chat", "completion"] = Field(
        "chat", description="chat template + generation prompt, or the code's plain text ending in 'Answer:'")
    mcqa_certainty_probs: Literal["raw", "normalised"] = Field(
        "normalised", description="entropy of the letters renormalised over the options, or of their raw "
                                  "probabilities (the code; only with mcqa_prompt_format: completion)")
    rehearsal: RehearsalConfig = Field(default_factory=RehearsalConfig)
    use_delta_sigma: Literal[False] = Field(False, description="Δσ is defined by the paper but unused (§9.7)")
    # selection (Algorithm 1, §5.5)
    tau_van: float = Field(0.51, ge=0, le=1, description="vanilla needs mu >= tau_van")
    tau_idk: float = Field(0.49, ge=0, le=1, description="IdK needs mu <= tau_idk")
    idk_delta_strict: bool = Field(True, description="IdK needs delta_mu < 0 (true, OEQA code) or <= 0 (MCQA code)")
    n_van: int = Field(8000, ge=0)
    n_idk: int = Field(2000, ge=0)
    tie_break: Literal["index", "random"] = Field(
        "index", description="order among equal certainty: data order, or a seeded shuffle")
    tie_at_cut: Literal["cut", "keep_all"] = Field(
        "cut", description="items tied with the last one taken: cut at N, or keep them all (pandas keep='all')")
    bucket_shortfall: Literal["take_all", "raise", "resample_with_replacement"] = "take_all"
    seed_subsample: int = 0
    idk_answer: str = "I don't know."
    vanilla_target: Literal["gold", "model_majority"] = Field(
        "gold", description="vanilla rows keep the gold answer (code), or the model's own majority answer")
    completion_only_loss: bool = True
    # evaluation (§5.7): the trained model is asked with prompt_template; the THS reference point
    reference_template: str = Field("{question}", description="user turn the INITIAL model is evaluated with for "
                                                              "THS's (P_c0, P_w0): the paper's Init-Basic = the "
                                                              "bare question")
    eval_refusal_phrase: str | None = Field(
        None, description="an eval answer is a refusal iff it contains this phrase (the code: \"I don't know\"); "
                          "null = the eval judge's refusal notion")
    stage_dir: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.tau_idk > self.tau_van:
            raise ValueError(f"tau_idk ({self.tau_idk}) must be <= tau_van ({self.tau_van}): an item cannot be "
                             "both known and unknown")
        for name in ("prompt_template", "query_template", "reference_template"):
            t = getattr(self, name)
            if t is not None:
                _check_template(t, name)
        _check_template(self.rehearsal.prompt_template, "rehearsal.prompt_template")
        if self.mcqa_certainty_probs == "raw" and self.mcqa_prompt_format == "chat":
            raise ValueError("mcqa_certainty_probs 'raw' needs mcqa_prompt_format 'completion': after a chat prompt "
                             "the option letters can take a few % of the probability mass, and the entropy of raw "
                             "probabilities then ranks such an item as more certain than a confident one; use "
                             "'normalised', or the code's completion prompt ending in 'Answer:'")
        return self


def _check_template(t: str, name: str) -> None:
    try:
        ok = "{question}" in t and t.format(question="") is not None
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must contain '{{question}}' and no other format fields, got {t!r}")


def check_config(cfg: RunConfig, method: Method) -> list[str]:
    problems = common_checks(cfg)
    if method.n_van + method.n_idk == 0:
        problems.append("field 'method.n_van': n_van + n_idk is 0, nothing would be trained")
    if cfg.data.system_prompt:
        problems.append("field 'data.system_prompt': not supported by craft (its query, rehearsal and RAIT rows "
                        "are built from the QA questions with method.prompt_template); put the instruction there")
    backend = (method.embedder or {}).get("backend", "minilm")
    if backend not in ("minilm", "sentence_transformers", "hashing"):
        problems.append(f"field 'method.embedder.backend': unknown {backend!r}; valid: minilm, "
                        "sentence_transformers, hashing")
    if method.variant in _FLOW and cfg.model.quantization is not None and method.rehearsal.lora is None:
        problems.append("field 'method.rehearsal.lora': the model is 4-bit (model.quantization), so the rehearsal "
                        "cannot fine-tune all its weights; give a rehearsal adapter, e.g. {r: 64, alpha: 16, "
                        "dropout: 0.1} (the paper's MCQA rehearsal)")
    problems += eval_options(cfg, method)[1]
    return problems


def recipe_qa_options(method: Method) -> dict:
    """What every qa eval set of this recipe uses: the RAIT prompt (the model is evaluated as it
    was trained), and the refusal phrase when one is set."""
    out = {"question_template": method.prompt_template}
    if method.eval_refusal_phrase:
        out.update(abstain_phrase=method.eval_refusal_phrase, abstain_match="substring")
    return out


def eval_options(cfg: RunConfig, method: Method, reference: bool = False) -> tuple[dict[str, dict], list[str]]:
    """``{qa eval set: options}`` with the recipe's filled in, and the problems: options written in
    the config that disagree with ``method``. ``reference``: the options of the initial model's
    evaluation (THS's reference point), asked with ``method.reference_template``."""
    from alignkit.config.tasks import recipe_qa_eval_options

    out, problems = recipe_qa_eval_options(
        cfg.eval.datasets, recipe_qa_options(method),
        {"question_template": "prompt_template", "abstain_phrase": "eval_refusal_phrase"})
    if reference:
        for opts in out.values():
            opts["question_template"] = method.reference_template
    return out, problems


# ---------------------------------------------------------------- selection (Algorithm 1)


def _ordered(items: list[dict], key: str | None, descending: bool, tie_break: str, rng: random.Random) -> list[dict]:
    """Items sorted by ``key`` (None: a seeded random order); ties by data order or at random."""
    tb = list(range(len(items)))
    if tie_break == "random" or key is None:
        rng.shuffle(tb)
    ranked = list(zip(items, tb))
    if key is None:
        return [it for it, _ in sorted(ranked, key=lambda x: x[1])]
    sign = -1.0 if descending else 1.0
    return [it for it, _ in sorted(ranked, key=lambda x: (sign * x[0][key], x[1]))]


def _take(ordered: list[dict], n: int, key: str | None, tie_at_cut: str, shortfall: str, bucket: str,
          rng: random.Random) -> tuple[list[dict], int]:
    """TopK of an ordered bucket; returns (taken, resampled-or-short count)."""
    if len(ordered) < n:
        if shortfall == "raise":
            raise ValueError(f"bucket {bucket!r} has {len(ordered)} candidates, fewer than n_{bucket}={n} "
                             "(method.bucket_shortfall: take_all or resample_with_replacement)")
        if shortfall == "resample_with_replacement" and ordered:
            return ordered + [rng.choice(ordered) for _ in range(n - len(ordered))], n - len(ordered)
        return list(ordered), n - len(ordered)
    taken = ordered[:n]
    if tie_at_cut == "keep_all" and key is not None and 0 < n < len(ordered):
        last = ordered[n - 1][key]
        taken += [it for it in ordered[n:] if it[key] == last]
    return taken, 0


def select(table: list[dict], method: Method, variant: str | None = None) -> tuple[list[dict], dict]:
    """Assign every item of the knowledge-state table a bucket and a reason.

    ``table`` rows: ``mu``, ``sigma``, ``delta_mu`` (flow variants), any metadata. Returns
    (rows with ``bucket`` ∈ {vanilla, idk, dropped} and ``reason``, report). Algorithm 1
    (craft.md §3): D_van¹ = {μ ≥ τ_van}; D_idk¹ = {μ ≤ τ_idk, Δμ < 0}; {μ ≤ τ_idk, Δμ ≥ 0}
    dropped (becoming known); D_van² = TopK by σ descending, D_idk² = TopK by σ ascending.
    """
    variant = variant or method.variant
    rng = random.Random(method.seed_subsample)
    eps = 1e-12
    out = [dict(r, bucket="dropped", reason="") for r in table]
    van_c, idk_c = [], []
    for r in out:
        mu = r.get("mu")
        if variant == "van":
            van_c.append(r)
            continue
        if mu is None or mu != mu:
            r["reason"] = "no knowledge state"
        elif mu >= method.tau_van - eps:
            van_c.append(r)
        elif mu <= method.tau_idk + eps:
            if variant in _FLOW:
                d = r.get("delta_mu")
                if d is None:
                    raise ValueError("flow variant without delta_mu: run the rehearsal stage first")
                falling = d < -eps if method.idk_delta_strict else d <= eps
                if falling:
                    idk_c.append(r)
                else:
                    r["reason"] = "knowledge flow: delta_mu >= 0 (becoming known during SFT)" \
                        if method.idk_delta_strict else "knowledge flow: delta_mu > 0 (becoming known during SFT)"
            else:
                idk_c.append(r)
        else:
            r["reason"] = f"between thresholds ({method.tau_idk} < mu < {method.tau_van})"
    report: dict = {"variant": variant, "candidates": {"vanilla": len(van_c), "idk": len(idk_c)}}
    key_v = key_i = None
    if variant == "van":  # Van-Tuning: N_van + N_idk random items, answers unchanged
        order = _ordered(van_c, None, False, method.tie_break, rng)
        taken, short = _take(order, method.n_van + method.n_idk, None, "cut", method.bucket_shortfall,
                             "van", rng)
        chosen = {"vanilla": taken}
        report["shortfall"] = {"vanilla": short}
    else:
        key_v, key_i = ("sigma", "sigma") if variant in _CERTAINTY_ORDER else (None, None)
        ov = _ordered(van_c, key_v, True, method.tie_break, rng)
        oi = _ordered(idk_c, key_i, False, method.tie_break, rng)
        tv, sv = _take(ov, method.n_van, key_v, method.tie_at_cut, method.bucket_shortfall, "van", rng)
        ti, si = _take(oi, method.n_idk, key_i, method.tie_at_cut, method.bucket_shortfall, "idk", rng)
        chosen = {"vanilla": tv, "idk": ti}
        report["shortfall"] = {"vanilla": sv, "idk": si}
    how = {None: "random", "sigma": "certainty"}
    selected: list[dict] = []
    for bucket, items in chosen.items():
        seen: set[int] = set()
        for it in items:
            if id(it) in seen:  # resampled with replacement: a duplicate training row
                selected.append(dict(it, bucket=bucket, reason="resampled (bucket shortfall)"))
                continue
            seen.add(id(it))
            it["bucket"] = bucket
            order = how[key_v]
            it["reason"] = ("van: random item, answer kept" if variant == "van" else
                            f"{'mu >= tau_van' if bucket == 'vanilla' else 'mu <= tau_idk'}"
                            f"{', delta_mu < 0' if (bucket == 'idk' and variant in _FLOW) else ''}, "
                            f"in the top n_{'van' if bucket == 'vanilla' else 'idk'} ({order})")
    van_ids = {id(r) for r in van_c}
    for r in out:
        if r["bucket"] == "dropped" and not r["reason"]:
            r["reason"] = "not selected: over n_van" if id(r) in van_ids else "not selected: over n_idk"
    rows = out + [s for s in selected if s.get("reason") == "resampled (bucket shortfall)"]
    counts = Counter(r["bucket"] for r in rows)
    report["buckets"] = {b: counts.get(b, 0) for b in ("vanilla", "idk", "dropped")}
    report["reasons"] = dict(Counter(r["reason"] for r in rows))
    if any("knowledge" in r for r in rows):
        by: dict = {}
        for r in rows:
            by.setdefault(str(r.get("knowledge")), Counter())[r["bucket"]] += 1
        report["by_knowledge"] = {k: dict(v) for k, v in sorted(by.items())}
    return rows, report


# ---------------------------------------------------------------- prepare stages


def _query_prompt(method: Method, question: str):
    """The knowledge query's prompt: the in-context examples as earlier turns (the code's 3-shot
    rounds, craft.md §5.1), then the question in ``query_template``. A string when there are no
    examples; a completion-format MC prompt is plain text throughout."""
    tmpl = method.query_template or method.prompt_template
    if method.task == "mcqa" and method.mcqa_prompt_format == "completion":
        shots = "".join(f"{tmpl.format(question=s.question)} {s.answer}\n\n" for s in method.query_shots)
        return shots + tmpl.format(question=question)
    if not method.query_shots:
        return tmpl.format(question=question)
    turns = []
    for s in method.query_shots:
        turns += [{"role": "user", "content": tmpl.format(question=s.question)},
                  {"role": "assistant", "content": s.answer}]
    return turns + [{"role": "user", "content": tmpl.format(question=question)}]


def _query_rows(cfg: RunConfig, method: Method) -> list[dict]:
    """QA rows with their ``qid``, the query prompt, the RAIT prompt and (MCQA) their options:
    multiple-choice rows as given (MMLU's {question, A..D, target}), or built from QA rows."""
    from alignkit.data import load_rows

    rows = None
    if method.task == "mcqa":
        from alignkit.stages.knowledge import build_mc_items, read_mc_rows

        rows = read_mc_rows(cfg.data.train, method.mc_options, method.mcqa_prompt_format, cfg.data.max_errors)
        if rows is None:
            qa = load_rows(cfg.data.train, "qa", cfg.data.max_errors)
            rows = build_mc_items(qa, _world_values(cfg), method.mc_options, seed=method.seed_subsample,
                                  prompt_format=method.mcqa_prompt_format)
    else:
        rows = load_rows(cfg.data.train, "qa", cfg.data.max_errors)
    for i, r in enumerate(rows):
        r["qid"] = i
        text = r["mc_prompt"] if method.task == "mcqa" else r["question"]
        r["query_prompt"] = _query_prompt(method, text)
        r["prompt"] = method.prompt_template.format(question=text)
        r["rehearsal_prompt"] = method.rehearsal.prompt_template.format(question=text)
    return rows


def _world_values(cfg: RunConfig) -> dict | None:
    if not cfg.model.name_or_path.startswith("world:"):
        return None
    from alignkit.world import load_world, world_dir_for_uri

    w = load_world(world_dir_for_uri(cfg.model.name_or_path))
    return {a: list(v) for a, v in w.values.items()}


def _query(model, tok, rows: list[dict], method: Method, seed: int, embedder) -> list[dict]:
    from alignkit.stages.knowledge import mc_knowledge_state, oe_knowledge_state

    if method.task == "mcqa":
        return mc_knowledge_state(model, tok, rows, batch_size=method.gen_batch_size,
                                  certainty_probs=method.mcqa_certainty_probs, prompt_key="query_prompt",
                                  prompt_format=method.mcqa_prompt_format)
    return oe_knowledge_state(model, tok, rows, n=method.num_samples, temperature=method.temperature,
                              top_p=method.top_p, max_new_tokens=method.max_new_tokens,
                              batch_size=method.gen_batch_size, seed=seed, embedder=embedder,
                              match=method.correctness_match, refusal_keywords=method.refusal_keywords,
                              prompt_key="query_prompt")


_QUERY_OPTIONS = {"task", "prompt_template", "query_template", "query_shots", "num_samples", "temperature", "top_p",
                  "max_new_tokens", "gen_batch_size", "correctness_match", "refusal_keywords", "embedder",
                  "mc_options", "mcqa_prompt_format", "mcqa_certainty_probs", "seed_subsample"}


def _query_key(cfg: RunConfig, method: Method) -> dict:
    import alignkit.judges.embedding as emb
    import alignkit.stages.knowledge as kn
    from alignkit.core.fingerprint import file_digest, source_fingerprint
    from alignkit.models import resolve_path

    m, d = cfg.model, cfg.data
    q = method.model_dump(include=_QUERY_OPTIONS)
    q["rehearsal_prompt"] = method.rehearsal.prompt_template  # part of the rows the stage writes
    if method.task == "mcqa":
        q.pop("embedder")
    # The open-ended query samples through cfg.generation (alignkit.generation.backends); the multiple-choice
    # query reads option log-probs from the local model's logits.
    if method.task == "oeqa":
        import alignkit.generation.backends as gb

        model_key = gb.sampler_fingerprint(cfg)
        q["embedder_files"] = build_embedder_name(method.embedder)
        code = code_digest(kn, emb, gb, _query_rows, _query_prompt, _query)
    else:
        model_key = source_fingerprint(resolve_path(m.name_or_path), m.revision)
        code = code_digest(kn, _query_rows, _query_prompt, _query)
    return {"model": model_key, "dtype": m.dtype,
            "data": file_digest(d.train.path), "format": d.train.format, "split": d.train.split,
            "columns": d.train.columns, "where": d.train.where, "limit": d.train.limit, "query": q, "seed": cfg.seed, "code": code}


def build_embedder_name(spec: dict) -> str:
    """The certainty embedder's identity: its name carries the digest of its model folder."""
    from alignkit.judges.embedding import build_embedder

    return build_embedder(spec).name


def stage_query(cfg: RunConfig, method: Method) -> Path:
    from alignkit.stages.runner import run_stage

    def fn():
        from alignkit.generation.backends import load_sampler
        from alignkit.judges.embedding import build_embedder
        from alignkit.models import load_for_sampling
        from alignkit.stages.knowledge import release_memory

        rows = _query_rows(cfg, method)
        model, tok = load_sampler(cfg, method.stage_dir) if method.task == "oeqa" else load_for_sampling(cfg.model)
        embedder = build_embedder(method.embedder) if method.task == "oeqa" else None
        ks = _query(model, tok, rows, method, cfg.seed, embedder)
        del model
        release_memory()
        out = [{**r, **k, "mu0": k["mu"], "sigma0": k["sigma"]} for r, k in zip(rows, ks)]
        report = {"items": len(out)}
        if method.task == "mcqa":
            import statistics

            mass = [k["letter_mass"] for k in ks]
            report["letter_mass_median"] = statistics.median(mass) if mass else None
            if mass and report["letter_mass_median"] < 0.5:
                log.warning("craft mcqa query: the option letters take a median %.1f%% of the next-token "
                            "probability; the model does not answer with a letter here (check the prompt)",
                            100 * report["letter_mass_median"])
        return out, report

    return run_stage("craft_query", _query_key(cfg, method), fn, method.stage_dir)


def _rehearsal_rows(table: list[dict], method: Method) -> list[dict]:
    from alignkit.stages.knowledge import majority_correct

    h = method.rehearsal
    if method.task == "mcqa":
        cand = [r for r in table if r["mu0"] > h.mu_min]
    else:
        cand = [r for r in table if r["mu0"] >= h.mu_min and (r["sigma0"] or 0) >= h.sigma_min]
    rng = random.Random(h.seed)
    if len(cand) > h.size:
        cand = sorted(rng.sample(cand, h.size), key=lambda r: r["qid"])
    out = []
    for r in cand:
        if method.task == "mcqa":
            target = r["target"]
        elif h.target == "model_majority":
            target = majority_correct(r["samples"], r["sample_is_correct"]) or r["answers"][0]
        else:
            target = r["answers"][0]
        # the code rehearses on the bare question (BASIC1), not the query's few-shot prompt
        out.append({"qid": r["qid"], "prompt": [{"role": "user", "content": r["rehearsal_prompt"]}],
                    "completion": target})
    return out


def _idk_candidates(table: list[dict], method: Method) -> list[dict]:
    """The items whose Δμ the selection reads: μ0 ≤ τ_idk (Algorithm 1's D_idk¹ condition)."""
    return [r for r in table if r["mu0"] is not None and r["mu0"] <= method.tau_idk + 1e-12]


def stage_rehearse(cfg: RunConfig, method: Method, query_path: Path) -> Path:
    """Rehearsal fine-tune of M0 on known items; Δμ = μ(M̃) − μ(M0) on the IdK candidates.

    Both μ come from this process, the same local model in the same dtype, on the same prompts
    in the same batches with the same seeds — M0 queried right before the fine-tune, M̃ right
    after. The first query (``craft_query``) may come from an endpoint (its own precision and
    RNG): an item the rehearsal left unchanged would then get a random Δμ (sd ≈ 0.2 at μ = 0.3,
    N = 10) and turn IdK by chance. Only the candidates (μ0 ≤ τ_idk) are queried twice: Δμ is
    read nowhere else, and they are a fraction of the pool."""
    import alignkit.stages.knowledge as kn
    from alignkit.core.fingerprint import file_digest
    from alignkit.core.io import read_jsonl
    from alignkit.stages.runner import run_stage

    # The re-query uses the same options as the first query (judge, prompts, sampling): key on them too,
    # so a changed option never reuses a stale Δμ even when M0's query file is byte-identical.
    key = {"query": file_digest(query_path), "query_options": _query_key(cfg, method)["query"],
           "rehearsal": method.rehearsal.model_dump(), "tau_idk": method.tau_idk,
           "max_length": cfg.data.max_length, "seed": cfg.seed, "model": cfg.model.model_dump(),
           "amp": [cfg.train.bf16, cfg.train.fp16],
           "code": code_digest(kn, _rehearsal_rows, _idk_candidates, stage_rehearse, _query, _rehearsal_model)}

    def fn():
        import torch

        table = read_jsonl(query_path)
        reh = _rehearsal_rows(table, method)
        if not reh:
            raise ValueError(f"rehearsal: no item has mu >= {method.rehearsal.mu_min}"
                             + ("" if method.task == "mcqa" else f" and sigma >= {method.rehearsal.sigma_min}")
                             + "; lower method.rehearsal.mu_min / sigma_min")
        cands = _idk_candidates(table, method)
        torch.manual_seed(cfg.seed)
        model, tok = _rehearsal_model(cfg, method)
        before = _query(model, tok, cands, method, cfg.seed, None)  # M0, here, as M̃ will be queried
        h = method.rehearsal
        amp = torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else None
        stats = kn.brief_finetune(model, tok, reh, learning_rate=h.learning_rate, epochs=h.num_train_epochs,
                                  batch_size=h.batch_size, grad_accum=h.gradient_accumulation_steps,
                                  max_length=cfg.data.max_length, seed=cfg.seed, warmup_ratio=h.warmup_ratio,
                                  scheduler=h.lr_scheduler_type, autocast_dtype=amp)
        after = _query(model, tok, cands, method, cfg.seed, None)  # Δσ is unused (§9.7): no embedding
        del model
        kn.release_memory()
        rows = [{"qid": r["qid"], "mu0_local": k0["mu"], "mu_reh": k1["mu"], "delta_mu": k1["mu"] - k0["mu"],
                 **({"samples_reh": k1["samples"]} if "samples" in k1 else {})}
                for r, k0, k1 in zip(cands, before, after)]
        gained = sum(r["delta_mu"] > 0 for r in rows)
        report = {"rehearsal_items": len(reh), "requeried": len(cands), **stats,
                  "low_mu_items_improved": f"{gained}/{len(rows)}"}  # the paper's MMLU figure: 69%
        log.info("craft rehearsal: %s", report)
        return rows, report

    return run_stage("craft_rehearse", key, fn, method.stage_dir)


def _rehearsal_model(cfg: RunConfig, method: Method):
    """M0 as the rehearsal trains it: loaded by the training loader (attention kernel, gradient
    checkpointing, 4-bit base) with ``rehearsal.lora`` as its adapter (none: all weights, upcast
    to float32 — AdamW steps of lr ~1e-6 round away on bf16 weights), on this process's GPU."""
    import torch

    from alignkit.models import load_model, load_tokenizer

    mc = cfg.model.model_copy(update={"lora": method.rehearsal.lora})
    model = load_model(mc)
    if method.rehearsal.lora is None and model.dtype != torch.float32:
        log.warning("rehearsal: %s weights upcast to float32 for the fine-tune", model.dtype)
        model = model.float()
    if torch.cuda.is_available() and mc.quantization is None:
        model = model.to(f"cuda:{torch.cuda.current_device()}")
    return model.eval(), load_tokenizer(mc)


def _rait_row(r: dict, method: Method) -> dict:
    from alignkit.stages.knowledge import majority_correct

    if r["bucket"] == "idk":
        target = method.idk_answer
    elif method.task == "mcqa":
        target = r["target"]
    elif method.vanilla_target == "model_majority" and r.get("samples"):
        target = majority_correct(r["samples"], r["sample_is_correct"]) or r["answers"][0]
    else:
        target = r["answers"][0]
    return {"qid": r["qid"], "question": r["question"], "prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": target, "answer_rait": target, "bucket": r["bucket"], "reason": r["reason"],
            "knowledge": r.get("knowledge"), "mu0": r.get("mu0"), "sigma0": r.get("sigma0"),
            "delta_mu": r.get("delta_mu")}


def stage_select(cfg: RunConfig, method: Method, query_path: Path | None, rehearse_path: Path | None) -> Path:
    from alignkit.core.fingerprint import file_digest
    from alignkit.core.io import read_jsonl
    from alignkit.stages.runner import run_stage

    sel = method.model_dump(include={"variant", "tau_van", "tau_idk", "idk_delta_strict", "n_van", "n_idk",
                                     "tie_break", "tie_at_cut", "bucket_shortfall", "seed_subsample",
                                     "idk_answer", "vanilla_target", "task", "prompt_template"})
    key = {"query": file_digest(query_path) if query_path else None,
           "rehearse": file_digest(rehearse_path) if rehearse_path else None,
           "data": None if query_path else file_digest(cfg.data.train.path), "where": cfg.data.train.where,
           "limit": cfg.data.train.limit,
           "selection": sel, "code": code_digest(select, _ordered, _take, _rait_row)}

    def fn():
        if query_path is not None:
            table = read_jsonl(query_path)
        else:  # Van-Tuning needs no knowledge state
            table = _query_rows(cfg, method)
        if rehearse_path is not None:  # Δμ of the IdK candidates (the others never read it)
            flow = {r["qid"]: r for r in read_jsonl(rehearse_path)}
            for r in table:
                r.update({k: v for k, v in flow.get(r["qid"], {}).items() if k != "samples_reh"})
        for r in table:
            r.setdefault("mu", r.get("mu0"))
            r.setdefault("sigma", r.get("sigma0"))
        rows, report = select(table, method)
        return [_rait_row(r, method) for r in rows], report

    return run_stage("craft_select", key, fn, method.stage_dir)


def reference_eval_config(cfg: RunConfig, method: Method):
    """The eval config of the initial model's run: every qa set asked with
    ``method.reference_template`` (the paper's THS reference is Init-Basic, the bare question),
    refusals detected as for the trained model."""
    ecfg = cfg.eval.model_copy(deep=True)
    opts, problems = eval_options(cfg, method, reference=True)
    if problems:
        from alignkit.config import ConfigError

        raise ConfigError("; ".join(problems))
    for name, o in opts.items():
        ecfg.datasets[name].options = o
    return ecfg


def stage_initial_eval(cfg: RunConfig, method: Method) -> Path:
    """The initial model on the eval sets (greedy, same judge and seed as the run's eval), asked
    with ``method.reference_template``: THS's reference point (P_c0, P_w0)."""
    import alignkit.evaluation.run as ev_run
    import alignkit.evaluation.tasks as ev
    import alignkit.generation.sampling as sm
    import alignkit.metrics as metrics
    import alignkit.metrics.records as records
    from alignkit.core.fingerprint import file_digest, source_fingerprint
    from alignkit.models import resolve_path
    from alignkit.stages.knowledge import judges_code_digest
    from alignkit.stages.runner import run_stage

    m = cfg.model
    ecfg = reference_eval_config(cfg, method)
    key = {"model": source_fingerprint(resolve_path(m.name_or_path), m.revision), "dtype": m.dtype,
           "eval": ecfg.model_dump(), "files": {k: file_digest(e.path) for k, e in ecfg.datasets.items()},
           "seed": cfg.seed,
           # everything between the model and the records: generation, the tasks, the metrics, and
           # the judges (a changed refusal pattern changes P_w0, hence every THS)
           "code": code_digest(ev, ev_run, sm, metrics, records), "judges": judges_code_digest()}

    def fn():
        import tempfile

        from alignkit.evaluation.run import evaluate_model
        from alignkit.judges import build_eval_judge
        from alignkit.metrics.records import read_records
        from alignkit.models import load_for_sampling
        from alignkit.stages.knowledge import release_memory

        model, tok = load_for_sampling(m)  # the configured revision, as the key says
        judge = build_eval_judge(ecfg.judge, m.name_or_path)
        with tempfile.TemporaryDirectory() as td:
            res = evaluate_model(model, tok, ecfg, judge, Path(td), seed=cfg.seed)
            # only the sets evaluate_model ran (``eval.run`` may select a subset of eval.datasets)
            rows = [{"eval_set": name, **r} for name in res["eval"]
                    for r in read_records(Path(td) / f"eval_{name}.jsonl")]
        del model
        release_memory()
        return rows, {"eval": res["eval"]}

    return run_stage("craft_initial_eval", key, fn, method.stage_dir)


def prepare(cfg: RunConfig, method: Method) -> dict[str, Path | None]:
    """Run the prepare stages; returns their output files (None: not needed by the variant)."""
    query = stage_query(cfg, method) if method.variant != "van" else None
    rehearse = stage_rehearse(cfg, method, query) if method.variant in _FLOW else None
    selection = stage_select(cfg, method, query, rehearse)
    ref = stage_initial_eval(cfg, method) if (cfg.eval.enabled and cfg.eval.datasets) else None
    return {"query": query, "rehearse": rehearse, "select": selection, "initial_eval": ref}


# ---------------------------------------------------------------- train


def train(cfg: RunConfig, callbacks=()) -> Path:
    from alignkit.config.paths import expand_config
    from alignkit.core.distributed import is_main_process
    from alignkit.core.io import atomic_write_text, read_jsonl
    from alignkit.data import tokenize_rows
    from alignkit.evaluation import evaluate_after_training
    from alignkit.evaluation.run import attach_ths
    from alignkit.models import load_tokenizer
    from alignkit.training.rundir import prepare_run_dir
    from alignkit.training.sft import train_sft_rows

    method = Method.model_validate(cfg.method)
    expand_config(cfg)
    # the trained model is evaluated as it was trained: the RAIT prompt (and the refusal phrase)
    opts, problems = eval_options(cfg, method)
    if problems:
        from alignkit.config import ConfigError

        raise ConfigError("; ".join(problems))
    for name, o in opts.items():
        cfg.eval.datasets[name].options = o
    _query_rows(cfg, method)  # bad rows fail here, before any model loads
    # rank 0 runs the stages (the rehearsal is a single-process loop); the others hit the cache
    stages = rank0_first(lambda: prepare(cfg, method), cfg.train.ddp_timeout)
    selection_path, ref_path = stages["select"], stages["initial_eval"]
    table = read_jsonl(selection_path)
    rows = [dict(r, _row=i) for i, r in enumerate(table) if r["bucket"] in ("vanilla", "idk")]
    if not rows:
        raise ValueError(f"CRaFT selection kept no items (see {selection_path.with_suffix('.provenance.json')})")
    d = cfg.data
    tok = load_tokenizer(cfg.model)
    train_tok, data_report = tokenize_rows("sft", rows, tok, str(selection_path), d.max_length, d.length_policy,
                                           max_errors=d.max_errors)
    run_dir, resume = prepare_run_dir(cfg)
    if is_main_process():
        prov = json.loads(selection_path.with_suffix(".provenance.json").read_text())
        report = {"variant": method.variant, "stages": {k: v and str(v) for k, v in stages.items()},
                  **prov.get("report", {})}
        if stages["rehearse"] is not None:
            report["rehearsal"] = json.loads(stages["rehearse"].with_suffix(".provenance.json").read_text()).get("report")
        atomic_write_text(run_dir / "craft_report.json", json.dumps(report, indent=2))
        atomic_write_text(run_dir / "data_report.json", json.dumps(data_report.as_dict(), indent=2))
        log.info("craft selection (%s): %s", method.variant, report.get("buckets"))
    # RAIT: plain SFT of the initial model on the selected rows (no eval split: data.eval is unused here).
    trainer = train_sft_rows(cfg, tok, train_tok, None, run_dir, resume, method.completion_only_loss,
                             {"data": data_report.as_dict(), "variant": method.variant}, callbacks,
                             evaluate=evaluate_after_training)
    if trainer.is_world_process_zero() and ref_path is not None and (run_dir / "metrics.json").exists():
        ref: dict[str, list[dict]] = {}
        for r in read_jsonl(ref_path):
            ref.setdefault(r.pop("eval_set"), []).append(r)
        qa_sets = [n for n, e in cfg.eval.datasets.items() if e.task == "qa"]
        attach_ths(run_dir, ref, qa_sets)
    return run_dir
