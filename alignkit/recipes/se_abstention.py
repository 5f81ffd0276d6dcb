"""SE abstention (Tjandra et al. 2024, arXiv 2410.17234): fine-tune a model to say "I don't
know the answer." where its semantic entropy is high — no gold labels (se_abstention.md).

Prepare stages (fingerprinted by all their inputs, atomic, skipped when unchanged;
:mod:`alignkit.stages`), on rank 0 first under multi-process launches (others hit the cache):

1. ``se_sample``  — per question: a standard answer at T=0.1 and M samples at T=1.0 with
   their length-normalised token log-probs (:func:`alignkit.generation.sampling.generate`), §4 step 2.
   Run on ``data.train`` and, for the signal-quality table, on ``method.signal_eval``.
2. ``se_score``   — clusters the samples (:mod:`alignkit.stages.uncertainty`, ``method.clustering``),
   discrete and likelihood-weighted SE (§2.1), R-Tuning-U string entropy, Semantic Volume,
   and the judge's verdict on the standard answer (used only by ``r_tuning`` and the report).
3. ``se_sweep_point`` — one per *distinct* abstain set of the variant's threshold grid (τ
   values that abstain on exactly the same questions train once): a single-process
   fine-tune with the run's hyperparameters, then greedy evaluation on ``method.select_eval``
   (validation: τ is chosen by lowest AED there, §4 step 6) and ``method.plot_eval``.

The sweep's fine-tunes are :func:`alignkit.stages.knowledge.brief_finetune` loops, not the run's
Trainer, on the model as the final run loads it (:func:`alignkit.models.load_model`: dtype,
attention kernel, gradient checkpointing, QLoRA / LoRA): same learning rate, epochs /
max_steps, warmup, weight decay, grad-norm clip, bf16 / fp16 autocast and ``data.max_length``;
forward passes of ``per_device_train_batch_size`` rows, one optimiser step every
``gradient_accumulation_steps`` of them (the per-device memory of the final run).
``train.lr_scheduler_type`` must be ``linear`` or ``cosine`` (check_config rejects others rather
than silently mapping them), the loss is always completion-only
(``method.completion_only_loss: false`` is rejected), over-long rows are truncated whatever
``data.length_policy`` says, and it runs in ONE process — under an N-process launch the final
training's global batch is N× a sweep step's, so τ is selected for a smaller batch than the
final model's.

Evaluation protocol (§4 step 7, §9): the recipe puts ``question_template`` (=
``method.prompt_template``, the training prompt), ``abstain_phrase`` and ``abstain_match``
into the ``options`` of every ``qa`` eval set (:func:`alignkit.evaluation.qa_options`), so
the sweep, the final evaluation and ``alignkit eval`` on the run ask the question the way
training did and count an abstention iff the answer contains (``substring``) or is
(``exact``) the abstention phrase — not the judge's refusal notion. Options already written
in the YAML must agree (check_config).

Labels (§3 ``gold_answers?``): train rows need only ``question``; ``answers`` is read where
present (the report's standard-answer accuracy) and required only by ``r_tuning``.

Then SFT (completion-only, Eq. 7) of the base model on the selected threshold's rows:
abstention phrase where the signal exceeds the threshold, the model's own standard answer
elsewhere. Variants (``method.variant``): ``se`` (default), ``r_tuning`` (abstain where the
judge marks the standard answer wrong — uses gold labels), ``r_tuning_u`` (τ on exact-string
entropy), ``semantic_volume`` (threshold on log det(VᵀV + εI) of the sample embeddings).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alignkit.config import RunConfig, Strict, common_checks
from alignkit.core.distributed import rank0_first
from alignkit.core.fingerprint import code_digest

log = logging.getLogger(__name__)
NAME = "se_abstention"
DATA_KIND = "qa"
VARIANTS = ("se", "r_tuning", "r_tuning_u", "semantic_volume")
PAPER_TAU_GRID = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25]
SIGNALS = {"se": "semantic entropy", "se_likelihood": "likelihood-weighted SE",
           "lexical_entropy": "lexical (string) entropy", "semantic_volume": "Semantic Volume"}

_METRICS = {}
for _ev, _tag in (("qa_test", "ID"), ("qa_ood", "OOD")):
    _METRICS.update({f"{_ev}:aed": f"AED {_tag}", f"{_ev}:n_correct": f"correct {_tag}",
                     f"{_ev}:n_wrong": f"incorrect {_tag}", f"{_ev}:n_refusal": f"abstained {_tag}"})

DEMO = {
    "title": "SE abstention: AED on held-out questions (qa_test = ID, qa_ood = OOD wordings)",
    "note": "Greedy short answers judged correct / incorrect / abstained by the world's knowledge base; AED "
            "(lower is better) = sqrt((I² + (|D|−C)²) / 2|D|²). Every trained row fine-tunes the base model on "
            "qa_train with targets built from the base model's own samples (M=5 at T=1, standard answer at "
            "T=0.1): the abstention phrase where the row's signal exceeds its threshold, the model's own "
            "standard answer elsewhere. SE abstention's τ is chosen in the run by lowest AED on qa_val over the "
            "paper's grid (0.25…2.25), R-Tuning-U's τ over the same grid and SV's threshold over the 0.2/0.4/0.6/0.8 "
            "quantiles of the training SV — every variant selects in its own run on every seed (Best-Threshold Evaluation; "
            "identical abstain sets share one cached sweep point). Abstained = the answer contains the "
            "abstention phrase. R-Tuning uses gold labels; the others none.",
    "evals": ["qa_test", "qa_ood"],
    "metrics": _METRICS,
    "columns": {
        "qa_test:aed": "Accuracy-Engagement Distance on held-out qa_test questions (lower is better).",
        "qa_test:n_correct": "qa_test questions answered correctly (C).",
        "qa_test:n_wrong": "qa_test questions answered wrongly (I).",
        "qa_test:n_refusal": "qa_test questions the model abstained on.",
        "qa_ood:aed": "AED on qa_ood: held-out people and question wordings never seen in training.",
        "qa_ood:n_correct": "qa_ood correct.", "qa_ood:n_wrong": "qa_ood incorrect.",
        "qa_ood:n_refusal": "qa_ood abstained.",
    },
    "rows": [("base", None), ("R-Tuning", NAME), ("R-Tuning-U", NAME), ("SE abstention", NAME),
             ("SV abstention", NAME)],
    "row_overrides": {
        "R-Tuning": ["method.variant=r_tuning", "method.signal_eval=null"],
        "R-Tuning-U": ["method.variant=r_tuning_u", "method.signal_eval=null"],
        "SE abstention": ["method.variant=se"],
        # SV: quintile-spaced quantiles of the training SV (the default deciles add two sweep
        # points, ~6 s per seed, that on seed 0 only split the same upper tail finer)
        "SV abstention": ["method.variant=semantic_volume", "method.sv_quantiles=[0.2,0.4,0.6,0.8]",
                          "method.signal_eval=null"],
    },
    # "A > B" on AED means B has the lower (better) AED.
    "claims": [("R-Tuning", "SE abstention", "qa_test:aed"), ("R-Tuning-U", "SE abstention", "qa_test:aed"),
               ("R-Tuning", "SE abstention", "qa_ood:aed"), ("R-Tuning-U", "SE abstention", "qa_ood:aed")],
    "expect_text": "SE abstention has lower AED than R-Tuning and R-Tuning-U, ID and OOD (the paper, Table 1; "
                   "claims read 'baseline AED > SE AED')",
    "checks": [("base", "SE abstention", "qa_test:aed"), ("SV abstention", "SE abstention", "qa_test:aed")],
    "sweep_plots": [{"row": "SE abstention", "key": "adaptation", "title": "SE abstention: every τ on qa_ood "
                     "(All-Threshold Evaluation)", "xlabel": "incorrect", "ylabel": "correct"}],
    "run_tables": [{"row": "SE abstention", "key": "signal_quality",
                    "title": "Uncertainty signals of the base model on qa_test: how well each predicts a wrong "
                             "standard answer (AUROC; PRR, lm-polygraph convention)"}],
    # `alignkit demo --smoke` (make test): every stage of every row, on small budgets
    "smoke": ["data.train.limit=48", "method.num_samples=3", "method.tau_grid=[0.5,2.0]",
              "method.signal_num_samples=2", "train.max_steps=2", "eval.limit=6"],
}


class Clustering(Strict):
    """Semantic-equivalence relation for the clusters (alignkit.stages.uncertainty, se_abstention.md §2.2)."""

    backend: Literal["exact", "embedding", "kb", "llm", "nli"] = Field(
        "kb", description="exact | embedding (MiniLM cosine) | kb (world aliases) | llm (entailment by an LLM "
                          "judge) | nli (local NLI classifier)")
    threshold: float = Field(0.9, ge=-1, le=1, description="embedding: cosine >= this merges")
    embedder: dict = Field(default_factory=lambda: {"backend": "minilm"})
    world_dir: str | None = None
    judge: dict | None = Field(None, description="llm: {backend: hf, model_or_path: ...} or {backend: http, ...}")
    nli_prompt: str | None = Field(None, description="llm: one-directional NLI prompt with {question} {text1} {text2}")
    model_path: str | None = Field(None, description="nli: local AutoModelForSequenceClassification folder")
    batch_size: int = Field(32, ge=1)
    device: str | None = Field(None, description="nli: torch device; null = cuda when available, else cpu")
    max_length: int = Field(256, ge=8, description="nli: premise + hypothesis tokens (longer pairs are truncated)")
    strict_entailment: bool = Field(True, description="both directions entailment (jlko CLI default)")
    condition_on_question: bool = Field(True, description="prepend the question to each answer")

    @model_validator(mode="after")
    def _check(self):
        if self.backend == "llm" and not self.judge:
            raise ValueError("clustering.backend 'llm' needs clustering.judge ({backend: hf|http, ...})")
        if self.backend == "nli" and not self.model_path:
            raise ValueError("clustering.backend 'nli' needs clustering.model_path (a local NLI classifier)")
        return self


class Method(Strict):
    variant: Literal["se", "r_tuning", "r_tuning_u", "semantic_volume"] = Field(
        "se", description="se | r_tuning (gold labels) | r_tuning_u (string entropy) | semantic_volume")
    prompt_template: str = Field("{question}", description="user turn (the paper's setting prompt goes here)")
    abstain_phrase: str = "I don't know the answer."
    abstain_match: Literal["exact", "substring"] = Field(
        "substring", description="evaluation: an answer abstains iff it contains (substring) or equals (exact, "
                                 "normalised) abstain_phrase (§9; the paper does not say)")
    num_samples: int = Field(10, ge=2, description="M samples at `temperature` (§4 step 2)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    standard_temperature: float = Field(0.1, gt=0, description="the standard answer (the L-set target)")
    max_new_tokens: int = Field(50, ge=1)
    gen_batch_size: int = Field(32, ge=1)
    clustering: Clustering = Field(default_factory=Clustering)
    se_form: Literal["discrete", "likelihood"] = Field("discrete", description="discrete (paper, Eq. 6) | likelihood")
    tau_grid: list[float] = Field(default_factory=lambda: list(PAPER_TAU_GRID),
                                  description="SE / string-entropy thresholds; lowest val AED wins")
    sv_embedder: dict = Field(default_factory=lambda: {"backend": "minilm"})
    sv_epsilon: float = Field(1e-3, gt=0)
    sv_pca_dim: int | None = Field(None, ge=1)
    sv_grid: list[float] | None = Field(None, description="Semantic Volume thresholds (log-det units)")
    sv_quantiles: list[float] = Field(default_factory=lambda: [0.1 * i for i in range(1, 10)],
                                      description="without sv_grid: thresholds at these quantiles of the training SV")
    select_eval: str = Field("qa_val", description="eval set (validation) whose AED selects the threshold")
    plot_eval: str | None = Field("qa_ood", description="eval set whose (incorrect, correct) per threshold is plotted")
    signal_eval: str | None = Field("qa_test", description="held-out eval set for the AUROC / PRR of the signals")
    signal_num_samples: int = Field(5, ge=2)
    completion_only_loss: bool = Field(True, description="Eq. 7; the sweep's fine-tunes are always completion-only")
    stage_dir: str | None = None

    @model_validator(mode="after")
    def _check(self):
        try:
            ok = "{question}" in self.prompt_template and self.prompt_template.format(question="") is not None
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise ValueError("prompt_template must contain '{question}' and no other format fields")
        if not self.tau_grid:
            raise ValueError("tau_grid must not be empty")
        if self.sv_grid is not None and not self.sv_grid:
            raise ValueError("sv_grid must not be empty (or null for sv_quantiles)")
        if not self.sv_quantiles or any(not 0 <= q <= 1 for q in self.sv_quantiles):
            raise ValueError("sv_quantiles must be non-empty values in [0, 1]")
        if not self.abstain_phrase.strip():
            raise ValueError("abstain_phrase must not be empty")
        return self


def check_config(cfg: RunConfig, method: Method) -> list[str]:
    problems = common_checks(cfg)
    if cfg.data.system_prompt:
        problems.append("field 'data.system_prompt': not supported by se_abstention (its rows are built from the "
                        "questions with method.prompt_template); put the instruction there")
    for field in ("select_eval", "plot_eval", "signal_eval"):
        name = getattr(method, field)
        if name is None:
            continue
        es = cfg.eval.datasets.get(name)
        if es is None:
            problems.append(f"field 'method.{field}': {name!r} is not in eval.datasets "
                            f"({', '.join(cfg.eval.datasets) or 'none'})")
        elif es.task != "qa":
            problems.append(f"field 'method.{field}': eval set {name!r} has task {es.task!r}; needs task qa")
    problems += eval_options(cfg, method)[1]
    if cfg.train.lr_scheduler_type not in ("linear", "cosine"):
        problems.append(f"field 'train.lr_scheduler_type': {cfg.train.lr_scheduler_type!r} — the τ sweep's "
                        "fine-tunes (alignkit.stages.knowledge.brief_finetune) implement linear and cosine only; "
                        "use one of those so the sweep trains like the final run")
    if not method.completion_only_loss:
        problems.append("field 'method.completion_only_loss': false is not supported — the τ sweep's fine-tunes "
                        "are completion-only (Eq. 7), so the final run must be too")
    if method.clustering.backend == "kb" and not cfg.model.name_or_path.startswith("world:") \
            and not method.clustering.world_dir:
        problems.append("field 'method.clustering.backend': 'kb' needs the tiny world (model world:...) or "
                        "clustering.world_dir; use nli or llm for a real model")
    return problems


def recipe_qa_options(method: Method) -> dict:
    """What every qa eval set of this recipe must use: the training prompt and the
    abstention phrase as the abstention test."""
    return {"question_template": method.prompt_template, "abstain_phrase": method.abstain_phrase,
            "abstain_match": method.abstain_match}


def eval_options(cfg: RunConfig, method: Method) -> tuple[dict[str, dict], list[str]]:
    """``{qa eval set: its options with the recipe's filled in}`` and the problems: invalid
    options, or options written in the config that disagree with ``method``."""
    from alignkit.config.tasks import recipe_qa_eval_options

    return recipe_qa_eval_options(cfg.eval.datasets, recipe_qa_options(method),
                                  {"question_template": "prompt_template"})


def load_questions(source, need_answers: bool, max_errors: int = 20) -> list[dict]:
    """Train questions (§3): ``question`` required; ``answers`` / ``answer`` optional (None
    when absent), required when ``need_answers`` (r_tuning). Errors name file, row, field."""
    from alignkit.data import IssueCollector, read_rows, select_rows, validate_rows
    from alignkit.data.schemas import ALIASES

    path, fmt, split, columns = source.path, source.format, source.split, source.columns
    issues = IssueCollector(path, max_errors)
    raw = select_rows(read_rows(path, fmt, split, max_errors, issues), path, source.where, source.limit)
    gold_cols = [columns.get(k, k) for k in ("answers", "answer")]
    gold_cols += [a for k in ("answers", "answer") if k not in columns for a in ALIASES.get(k, ())]
    missing = {i for i, r in raw if all(r.get(c) is None for c in gold_cols)}
    if need_answers:
        for i in sorted(missing):
            issues.add(i, columns.get("answers", "answers"), "missing: method.variant r_tuning abstains where the "
                       "standard answer is judged wrong against these gold answers (give 'answers' or 'answer')")
        raw = [(i, r) for i, r in raw if i not in missing]
    # rows without golds are validated as qa rows with a stand-in answer, then marked label-free
    fill = columns.get("answers", "answers")
    rows = validate_rows("qa", [(i, {**r, fill: ["-"]} if i in missing else r) for i, r in raw], path, columns,
                         None, max_errors, "raise", issues)
    for r in rows:
        if r["_row"] in missing:
            r["answers"] = None
    return rows


def _spec_key(spec):
    """A config mapping for a cache key: local model folders (NLI ``model_path``, an hf
    judge's ``model_or_path``) by the digest of their files, not their path."""
    from alignkit.core.fingerprint import source_fingerprint

    if isinstance(spec, dict):
        return {k: (source_fingerprint(v) if k in ("model_path", "model_or_path", "name_or_path")
                    and isinstance(v, str) and Path(v).is_dir() else _spec_key(v)) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_spec_key(v) for v in spec]
    return spec


def _world_dir(cfg: RunConfig) -> str | None:
    if not cfg.model.name_or_path.startswith("world:"):
        return None
    from alignkit.world import world_dir_for_uri

    return str(world_dir_for_uri(cfg.model.name_or_path))


# ---------------------------------------------------------------- stage 1: sampling


def stage_sample(cfg: RunConfig, method: Method, rows: list[dict], n: int) -> Path:
    """Standard answer (T=0.1) + ``n`` samples (T=1) with mean token log-probs per question
    of ``rows`` (already loaded and validated; keyed by their question / answers / knowledge)."""
    import alignkit.generation.backends as gb
    import alignkit.generation.sampling as sm
    from alignkit.core.fingerprint import fingerprint
    from alignkit.stages.runner import run_stage

    m = cfg.model
    rows = [{"question": r["question"], "answers": r.get("answers"), "knowledge": r.get("knowledge")} for r in rows]
    key = {"model": gb.sampler_fingerprint(cfg), "dtype": m.dtype,
           "data": fingerprint(rows), "n": n, "seed": cfg.seed,
           "sampling": method.model_dump(include={"prompt_template", "temperature", "top_p", "standard_temperature",
                                                  "max_new_tokens", "gen_batch_size"}),
           # The decoding loop itself (_decode and its step hooks) is hashed too: generate delegates to it;
           # so are the engines (generation.backends: HTTP / vLLM sampling, load_sampler).
           "code": code_digest(stage_sample, sm.generate, sm._generate_batch, sm._decode, sm._StepScores,
                               sm._StepWatch, sm._group, gb)}

    def fn():
        from alignkit.generation.backends import load_sampler
        from alignkit.stages.knowledge import release_memory

        prompts = [method.prompt_template.format(question=r["question"]) for r in rows]
        model, tok = load_sampler(cfg, method.stage_dir)
        kw = dict(max_new_tokens=method.max_new_tokens, batch_size=method.gen_batch_size, seed=cfg.seed,
                  progress=False, return_logprobs="mean")
        std, _ = sm.generate(model, tok, prompts, n=1, temperature=method.standard_temperature, **kw)
        smp, lps = sm.generate(model, tok, prompts, n=n, temperature=method.temperature, top_p=method.top_p, **kw)
        del model
        release_memory()  # the sweep's fine-tunes load the model again next
        return [{"qid": i, "question": r["question"], "prompt": p, "answers": r["answers"],
                 "knowledge": r.get("knowledge"), "standard_response": s[0], "samples": x, "sample_logps": lp}
                for i, (r, p, s, x, lp) in enumerate(zip(rows, prompts, std, smp, lps))]

    return run_stage("se_sample", key, fn, method.stage_dir)


# ---------------------------------------------------------------- stage 2: scores


def score_rows(rows: list[dict], method: Method, equiv, sv_embedder, judge) -> list[dict]:
    """Clusters, SE (discrete and likelihood), string entropy, SV and the standard answer's verdict."""
    import numpy as np

    from alignkit.judges.base import JudgeRequest
    from alignkit.metrics import semantic_entropy
    from alignkit.stages.uncertainty import lexical_entropy, semantic_volume

    uniq = list(dict.fromkeys(s for r in rows for s in r["samples"]))
    emb = {}
    if uniq and sv_embedder is not None:
        vecs = np.concatenate([np.asarray(sv_embedder.encode(uniq[i:i + 256]), dtype=np.float64)
                               for i in range(0, len(uniq), 256)])
        emb = dict(zip(uniq, vecs))
    # The standard answer's verdict needs gold answers (§3: used only by r_tuning and the
    # report); label-free rows get None and the judge is never asked about them.
    labelled = [i for i, r in enumerate(rows) if r.get("answers")] if judge is not None else []
    reqs = [JudgeRequest(prompt=rows[i]["question"], response=rows[i]["standard_response"], golds=rows[i]["answers"],
                         meta={k: v for k, v in rows[i].items() if k in ("knowledge",)}) for i in labelled]
    correct, refused = [None] * len(rows), [None] * len(rows)
    if reqs:
        for i, c, f in zip(labelled, judge.is_correct(reqs), judge.is_refusal(reqs)):
            correct[i], refused[i] = c, f
    # every question's clustering advances together: one judge batch per greedy round, so an
    # HTTP judge runs at its full concurrency (alignkit.stages.uncertainty.Equivalence.cluster_many)
    clusters = equiv.cluster_many([(r["samples"], r["question"]) for r in rows])
    out = []
    for r, c, f, ids in zip(rows, correct, refused, clusters):
        out.append({**r, "semantic_ids": ids, "se_discrete": semantic_entropy(ids),
                    "se_likelihood": semantic_entropy(ids, r["sample_logps"]),
                    "lexical_entropy": lexical_entropy(r["samples"]),
                    "semantic_volume": semantic_volume(np.stack([emb[s] for s in r["samples"]]), method.sv_epsilon,
                                                       method.sv_pca_dim) if emb else None,
                    "standard_correct": None if c is None else bool(c) and not f})
    return out


def _embedder_key(spec: dict | None) -> str:
    """An embedder's identity for a cache key: its ``name`` carries the digest of its model
    folder (names and sizes of the files), so new weights at the same path change the key."""
    from alignkit.judges.embedding import build_embedder

    return build_embedder(spec or {"backend": "minilm"}).name


def stage_score(cfg: RunConfig, method: Method, sample_path: Path) -> Path:
    import alignkit.judges.embedding as E
    import alignkit.metrics as metrics
    import alignkit.stages.uncertainty as U
    from alignkit.core.fingerprint import file_digest
    from alignkit.stages.knowledge import judges_code_digest
    from alignkit.stages.runner import run_stage

    clustering = method.clustering.model_dump()
    key = {"samples": file_digest(sample_path), "clustering": _spec_key(clustering),
           "sv": method.model_dump(include={"sv_embedder", "sv_epsilon", "sv_pca_dim"}),
           # the embedders' model files, not only their config: a new all-MiniLM at the same path
           "embedders": {"sv": _embedder_key(method.sv_embedder),
                         "clustering": _embedder_key(clustering["embedder"]) if clustering["backend"] == "embedding"
                         else None},
           "judge": _spec_key(cfg.eval.judge), "world": _world_dir(cfg),
           # SE itself (metrics.semantic_entropy), the clustering, the embedders and the judges
           "code": code_digest(U, E, score_rows, metrics.semantic_entropy), "judges": judges_code_digest()}

    def fn():
        from alignkit.core.io import read_jsonl
        from alignkit.judges import build_eval_judge

        equiv = U.build_equivalence(method.clustering.model_dump(), _world_dir(cfg))
        sv_emb = E.build_embedder(method.sv_embedder)
        judge = build_eval_judge(cfg.eval.judge, cfg.model.name_or_path)
        rows = score_rows(read_jsonl(sample_path), method, equiv, sv_emb, judge)
        report = {"clustering": method.clustering.backend, "judge_stats": dict(equiv.stats),
                  "judge_calls": int(equiv.stats.get("calls", 0)),
                  "judge_cache_hits": int(equiv.stats.get("cache_hits", 0))}
        http_stats = getattr(getattr(equiv, "judge", None), "stats", None)
        if http_stats is not None:
            report["http_judge_stats"] = dict(http_stats)
        return rows, report

    return run_stage("se_score", key, fn, method.stage_dir)


# ---------------------------------------------------------------- thresholds and training rows


def signal_of(method: Method, variant: str | None = None) -> str:
    variant = variant or method.variant
    if variant == "se":
        return "se_likelihood" if method.se_form == "likelihood" else "se_discrete"
    return {"r_tuning_u": "lexical_entropy", "semantic_volume": "semantic_volume", "r_tuning": "standard_correct"}[
        variant]


def thresholds(table: list[dict], method: Method) -> list[float]:
    """The variant's grid: τ (entropy units), SV thresholds (absolute, or training quantiles),
    or one dummy point for R-Tuning (its split is fixed by the labels)."""
    import numpy as np

    if method.variant == "r_tuning":
        return [0.5]
    if method.variant == "semantic_volume":
        if method.sv_grid is not None:
            return list(method.sv_grid)
        sv = np.array([r["semantic_volume"] for r in table], dtype=np.float64)
        # Exact quantiles, never rounded: many questions share the "all answers identical" floor
        # (log((M+ε)ε^(M-1)), equal up to float noise), and a threshold rounded to 6 decimals
        # lands above or below it by chance — below, and every floor question abstains.
        return [float(np.quantile(sv, q)) for q in method.sv_quantiles]
    return list(method.tau_grid)


def above(value: float, threshold: float) -> bool:
    """``value > threshold`` beyond float noise (1e-9 relative): signals that are equal in exact
    arithmetic — SV of different questions on the all-identical floor, computed by slogdet from
    different embeddings — differ in the last bits, and must fall on the same side."""
    return value > threshold + 1e-9 * max(1.0, abs(threshold))


def abstain_set(table: list[dict], method: Method, threshold: float) -> frozenset[int]:
    """H: questions that get the abstention phrase (§2.4: signal > τ; R-Tuning: judged wrong)."""
    sig = signal_of(method)
    if method.variant == "r_tuning":
        if any(r["standard_correct"] is None for r in table):
            raise ValueError("r_tuning needs a verdict on every standard answer (gold answers on every row)")
        return frozenset(r["qid"] for r in table if not r["standard_correct"])
    return frozenset(r["qid"] for r in table if above(r[sig], threshold))


def sft_rows(table: list[dict], method: Method, h: frozenset[int]) -> list[dict]:
    return [{"qid": r["qid"], "prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": method.abstain_phrase if r["qid"] in h else r["standard_response"],
             "bucket": "abstain" if r["qid"] in h else "answer"} for r in table]


# ---------------------------------------------------------------- stage 3: one sweep point


def _train_hparams(cfg: RunConfig) -> dict:
    t = cfg.train
    return {"learning_rate": t.learning_rate, "epochs": t.num_train_epochs, "max_steps": t.max_steps,
            "per_device": t.per_device_train_batch_size, "grad_accum": t.gradient_accumulation_steps,
            "warmup": t.warmup_steps, "scheduler": t.lr_scheduler_type, "weight_decay": t.weight_decay,
            "max_grad_norm": t.max_grad_norm, "bf16": t.bf16, "fp16": t.fp16}


def stage_sweep_point(cfg: RunConfig, method: Method, rows: list[dict], evals: list[str]) -> Path:
    """Fine-tune the base model on one candidate SFT set (single process, the run's
    hyperparameters) and evaluate it greedily on ``evals``; keyed by the rows themselves, so
    identical abstain sets — from any τ or variant — train once.

    The model is loaded as the final training loads it (:func:`alignkit.models.load_model`:
    dtype, attention kernel, gradient checkpointing, QLoRA, LoRA) and trained in passes of
    ``per_device_train_batch_size`` rows, stepping every ``gradient_accumulation_steps``
    passes under ``train.bf16`` / ``fp16`` autocast — the final run's per-device memory
    profile, not all of a step's rows in one pass."""
    import alignkit.evaluation.run as ev_run
    import alignkit.evaluation.tasks as ev_tasks
    import alignkit.generation.sampling as sm
    import alignkit.metrics as metrics
    import alignkit.stages.knowledge as kn
    from alignkit.core.fingerprint import file_digest, fingerprint, source_fingerprint
    from alignkit.models import load_model, resolve_path
    from alignkit.stages.runner import run_stage

    m = cfg.model
    hp = _train_hparams(cfg)
    key = {"model": source_fingerprint(resolve_path(m.name_or_path), m.revision),
           "model_config": m.model_dump(), "rows": fingerprint([(r["prompt"], r["completion"]) for r in rows]),
           "train": hp, "max_length": cfg.data.max_length, "seed": cfg.seed,
           "eval": cfg.eval.model_dump(exclude={"datasets"}),
           "evals": {e: [file_digest(cfg.eval.datasets[e].path), cfg.eval.datasets[e].model_dump()] for e in evals},
           # what turns the fine-tuned model into the AED that selects τ: generation, the eval
           # tasks and their metrics, and the judges
           "code": code_digest(kn.brief_finetune, stage_sweep_point, load_model, ev_run, ev_tasks, metrics, sm),
           "judges": kn.judges_code_digest()}

    def fn():
        import math

        import torch

        from alignkit.evaluation.run import evaluate_model
        from alignkit.judges import build_eval_judge
        from alignkit.models import load_tokenizer

        torch.manual_seed(cfg.seed)
        tok = load_tokenizer(m)
        model = load_model(m)
        if torch.cuda.is_available() and m.quantization is None:  # 4-bit weights are placed at load
            model = model.to(f"cuda:{torch.cuda.current_device()}")
        per_step = hp["per_device"] * hp["grad_accum"]
        epochs = hp["epochs"]
        if hp["max_steps"] and hp["max_steps"] > 0:  # honour train.max_steps as the trainer would
            epochs = hp["max_steps"] / max(1, math.ceil(len(rows) / per_step))
        warm = hp["warmup"]
        per_epoch = math.ceil(len(rows) / per_step)
        warm_ratio = warm if warm < 1 else warm / max(1, per_epoch * epochs)
        amp = torch.bfloat16 if hp["bf16"] else torch.float16 if hp["fp16"] else None
        stats = kn.brief_finetune(model, tok, rows, learning_rate=hp["learning_rate"], epochs=epochs,
                                  batch_size=hp["per_device"], grad_accum=hp["grad_accum"],
                                  max_length=cfg.data.max_length, seed=cfg.seed, warmup_ratio=min(warm_ratio, 0.99),
                                  scheduler="cosine" if hp["scheduler"].startswith("cosine") else "linear",
                                  max_grad_norm=hp["max_grad_norm"], weight_decay=hp["weight_decay"],
                                  autocast_dtype=amp)
        judge = build_eval_judge(cfg.eval.judge, m.name_or_path)
        res = evaluate_model(model, tok, cfg.eval, judge, None, seed=cfg.seed,
                             datasets={e: cfg.eval.datasets[e] for e in evals})
        del model
        kn.release_memory()
        keep = ("n", "n_correct", "n_wrong", "n_refusal", "aed", "accuracy", "refusal_rate")
        return [{"eval_set": e, **{k: r[k] for k in keep if k in r}} for e, r in res["eval"].items()], \
            {"train": stats}

    return run_stage("se_sweep_point", key, fn, method.stage_dir)


def sweep(cfg: RunConfig, method: Method, table: list[dict], run_point=None) -> dict:
    """Every threshold of the grid -> its abstain set; one sweep point per distinct set;
    the threshold with the lowest validation AED (ties: the first in grid order).
    ``run_point(rows, evals) -> Path`` of the point's eval results (default
    :func:`stage_sweep_point`; tests pass a fake)."""
    from alignkit.core.io import read_jsonl

    run_point = run_point or (lambda rows, evals: stage_sweep_point(cfg, method, rows, evals))
    grid = thresholds(table, method)
    sets = [abstain_set(table, method, t) for t in grid]
    points = []
    if len(set(sets)) == 1:  # nothing to choose: no sweep training
        return {"grid": grid, "selected": grid[0], "selected_index": 0, "points": [
            {"threshold": t, "n_abstain": len(s)} for t, s in zip(grid, sets)], "distinct_sets": 1}
    evals = [e for e in dict.fromkeys([method.select_eval, method.plot_eval]) if e]
    done: dict[frozenset, Path] = {}
    for t, s in zip(grid, sets):
        if s not in done:
            done[s] = run_point(sft_rows(table, method, s), evals)
        res = {r.pop("eval_set"): r for r in read_jsonl(done[s])}
        points.append({"threshold": t, "n_abstain": len(s), "stage": str(done[s]), **{
            f"{e}:{k}": v for e, r in res.items() for k, v in r.items()}})
    key = f"{method.select_eval}:aed"
    best = min(range(len(points)), key=lambda i: (points[i][key], i))
    return {"grid": grid, "selected": grid[best], "selected_index": best, "points": points,
            "distinct_sets": len(done), "select_by": key}


# ---------------------------------------------------------------- signal quality (lm-polygraph style)


def signal_quality(table: list[dict]) -> dict:
    """AUROC and PRR of each uncertainty signal for predicting a wrong standard answer."""
    from alignkit.metrics import auroc, prediction_rejection_ratio

    wrong = [not r["standard_correct"] for r in table]
    out = {}
    for key, label in (("se_discrete", SIGNALS["se"]), ("se_likelihood", SIGNALS["se_likelihood"]),
                       ("lexical_entropy", SIGNALS["lexical_entropy"]),
                       ("semantic_volume", SIGNALS["semantic_volume"])):
        u = [r[key] for r in table]
        if any(x is None for x in u):
            continue
        out[label] = {"auroc": auroc(u, wrong), "prr": prediction_rejection_ratio(u, [1.0 - w for w in wrong])}
    return {"n": len(table), "n_wrong": sum(wrong), "signals": out}


# ---------------------------------------------------------------- prepare + train


def signal_rows(cfg: RunConfig, method: Method) -> list[dict]:
    """The held-out questions of ``method.signal_eval`` exactly as the evaluation selects them
    (the eval set's ``where`` and ``limit``, else ``eval.limit``)."""
    from alignkit.evaluation.tasks import _load_eval_rows

    es = cfg.eval.datasets[method.signal_eval]
    return _load_eval_rows("qa", es.path, es.limit or cfg.eval.limit, es.where)


def prepare(cfg: RunConfig, method: Method, train_rows: list[dict]) -> dict:
    from alignkit.core.io import read_jsonl

    sample = stage_sample(cfg, method, train_rows, method.num_samples)
    score = stage_score(cfg, method, sample)
    table = read_jsonl(score)
    sw = sweep(cfg, method, table)
    out = {"sample": sample, "score": score, "sweep": sw, "signal": None}
    if method.signal_eval:
        s2 = stage_sample(cfg, method, signal_rows(cfg, method), method.signal_num_samples)
        out["signal_score"] = stage_score(cfg, method, s2)
        out["signal"] = signal_quality(read_jsonl(out["signal_score"]))
    return out


def _report(method: Method, table: list[dict], h: frozenset[int], stages: dict) -> dict:
    from collections import Counter

    sw = stages["sweep"]
    by_k: dict = {}
    for r in table:
        by_k.setdefault(str(r.get("knowledge")), Counter())["abstain" if r["qid"] in h else "answer"] += 1
    prov = json.loads(Path(stages["score"]).with_suffix(".provenance.json").read_text()).get("report", {})
    rep = {"variant": method.variant, "signal": signal_of(method), "threshold": sw["selected"],
           "buckets": {"abstain": len(h), "answer": len(table) - len(h)},
           "by_knowledge": {k: dict(v) for k, v in by_k.items()}, "sweep": sw,
           "judge_calls": prov.get("judge_calls"), "judge_cache_hits": prov.get("judge_cache_hits"),
           "clustering": prov,
           "stages": {k: str(v) for k, v in stages.items() if isinstance(v, Path)}}
    if stages.get("signal") is not None:
        rep["signal_quality"] = stages["signal"]
    return rep


def _demo_extras(method: Method, rep: dict) -> dict:
    """Tables / plots the demo renders from train_results.json (alignkit.demo ``run_tables``)."""
    out: dict = {}
    sw = rep["sweep"]
    if method.plot_eval and sw["points"] and f"{method.plot_eval}:n_correct" in sw["points"][0]:
        out["adaptation"] = [[p[f"{method.plot_eval}:n_wrong"], p[f"{method.plot_eval}:n_correct"],
                              f"τ={p['threshold']:g}"] for p in sw["points"]]
    sq = rep.get("signal_quality")
    if sq:
        out["signal_quality"] = {"header": ["signal", "AUROC", "PRR"],
                                 "rows": [[k, round(v["auroc"], 3), round(v["prr"], 3)]
                                          for k, v in sq["signals"].items()],
                                 "note": f"{sq['n']} questions, {sq['n_wrong']} wrong standard answers"}
    return out


def train(cfg: RunConfig, callbacks=()) -> Path:
    from alignkit.config import ConfigError
    from alignkit.config.paths import expand_config
    from alignkit.core.distributed import is_main_process
    from alignkit.core.io import atomic_write_text, read_jsonl
    from alignkit.data import load_rows, tokenize_rows
    from alignkit.evaluation import evaluate_after_training
    from alignkit.models import load_tokenizer
    from alignkit.training.rundir import prepare_run_dir
    from alignkit.training.sft import train_sft_rows

    method = Method.model_validate(cfg.method)
    expand_config(cfg)
    # every qa eval set asks the question as training did and detects abstention by the phrase
    opts, problems = eval_options(cfg, method)
    if problems:
        raise ConfigError("; ".join(problems))
    for name, o in opts.items():
        cfg.eval.datasets[name].options = o
    # bad rows fail here, before any model loads
    train_rows = load_questions(cfg.data.train, method.variant == "r_tuning", cfg.data.max_errors)
    for name in {method.select_eval, method.plot_eval, method.signal_eval} - {None}:
        load_rows(cfg.eval.datasets[name].path, "qa", cfg.data.max_errors)
    run_dir, resume = prepare_run_dir(cfg)  # refuse a used output_dir before the expensive stages
    # rank 0 samples, scores and sweeps (single-process loops); the others hit the stage cache
    stages = rank0_first(lambda: prepare(cfg, method, train_rows), cfg.train.ddp_timeout)
    table = read_jsonl(stages["score"])
    h = abstain_set(table, method, stages["sweep"]["selected"])
    rows = sft_rows(table, method, h)
    d = cfg.data
    tok = load_tokenizer(cfg.model)
    train_tok, data_report = tokenize_rows("sft", rows, tok, str(stages["score"]), d.max_length, d.length_policy,
                                           max_errors=d.max_errors)
    rep = _report(method, table, h, stages)
    if is_main_process():
        atomic_write_text(run_dir / "se_report.json", json.dumps(rep, indent=2, default=str))
        atomic_write_text(run_dir / "data_report.json", json.dumps(data_report.as_dict(), indent=2))
        log.info("se_abstention (%s): threshold %s, %s", method.variant, rep["threshold"], rep["buckets"])
    extra = {"data": data_report.as_dict(), "variant": method.variant, "threshold": rep["threshold"],
             "counts": {"n_abstain": rep["buckets"]["abstain"], "judge_calls": rep["judge_calls"]},
             "demo": _demo_extras(method, rep)}
    train_sft_rows(cfg, tok, train_tok, None, run_dir, resume, method.completion_only_loss, extra, callbacks,
                   evaluate=evaluate_after_training)
    return run_dir
