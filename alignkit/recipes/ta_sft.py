"""TA-SFT (Lu, Sinha, Varakantham, ICLR 2025, arXiv 2412.06843): safety-unrelated SFT minus
λ times a semantic EMD that pushes the model away from a few of its own unsafe responses.

ENGINEERING RECONSTRUCTION, NOT THE PAPER'S FORMULA (ta_sft_emd.md §4): the paper's exact
loss and its "novel lower bound" are not public. Here::

    L(θ) = CE(SFT rows) − λ · mean_t EMD(p_θ(·|x̃, ỹ_<t), δ_{ỹ_t})      (unsafe rows)
    EMD(p, δ_y) = 1 − ⟨Êᵀp, ê_y⟩   exact under cosine cost (§3(a); alignkit.losses.semantic_emd)

with Ê the L2-normalised cost embedding (a frozen copy of the input embeddings or the LM
head). ``emd_form: jensen_bound`` swaps in the Jensen bound ½‖Êᵀp − ê_y‖² (§3(b)), a valid
lower bound that is NOT known to be the paper's. The EMD term lies in [0, 2], so pushing it
up cannot diverge the way gradient ascent on the NLL can.

One recipe, several objectives (``method.objective``), all on the same batches — the same
SFT rows in the same order, plus ``k`` safety rows appended to every batch — so the rows of
the demo differ only in what they do with the safety rows:

* ``emd`` — TA-SFT;
* ``unlikelihood`` — CE + λ·mean −log(1 − p(ỹ_t)) on the unsafe responses;
* ``gradient_ascent`` — CE − λ·mean NLL(ỹ_t) on the unsafe responses (unbounded);
* ``refusal_sft`` — SFT on the SFT rows plus refusal targets for the same harmful prompts;
* ``sft`` — SFT rows only (no safety rows).

The unsafe responses are sampled from the base model on harmful prompts and kept when the
judge flags them (:mod:`alignkit.stages.unsafe_set`, cached stages with counts in a report).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignkit.config import RunConfig, Strict, common_checks
from alignkit.stages.unsafe_set import PromptSource, UnsafeSetConfig

log = logging.getLogger(__name__)
NAME = "ta_sft"
DATA_KIND = "sft"
OBJECTIVES = ("emd", "unlikelihood", "gradient_ascent", "refusal_sft", "sft")
# objectives that use method.emd_weight (λ)
WEIGHTED = ("emd", "unlikelihood", "gradient_ascent")


# Rows of the one recipe differ by overrides (DEMO["row_overrides"], alignkit.demo).
_ROWS = {"SFT": ["method.objective=sft"], "refusal-SFT": ["method.objective=refusal_sft"],
         "UL": ["method.objective=unlikelihood"], "GA": ["method.objective=gradient_ascent"],
         "TA-SFT": ["method.objective=emd"],
         # the sweep around the chosen point (λ=16, N=8; chosen on harmful_val / benign_val / qa_val)
         "TA-SFT λ=4": ["method.emd_weight=4.0"], "TA-SFT λ=32": ["method.emd_weight=32.0"],
         "TA-SFT N=2": ["method.unsafe.size=2"], "TA-SFT N=24": ["method.unsafe.size=24"]}
_SWEEP_METRICS = ["harmful_test:harmful_compliance_rate", "benign_test:benign_unanswered_rate",
                  "benign_test:over_refusal_rate", "qa_test:accuracy"]

# Test columns: the world's safety test split (never in pretraining, never trained, never used
# for a choice) and held-out qa_test questions on known facts. λ was chosen on the validation
# columns (the safety train split's prompts, which no run trains on, and qa_val).
DEMO = {
    "title": "TA-SFT: harmful compliance, benign over-alignment and QA utility (held-out prompts)",
    "note": "All rows fine-tune the same safety-unrelated SFT data (320 sft_train QA answers) in the same batches; "
            "they differ only in the safety rows appended to each batch: none (SFT), refusals for the harmful "
            "prompts of the unsafe set (refusal-SFT), or the base model's own unsafe responses to those prompts "
            "(sampled, kept when the world's judge flags them) used by unlikelihood (UL), gradient ascent (GA) or "
            "the negative semantic EMD (TA-SFT). The unsafe prompts are the dualuse 'synthesise <hazard>' "
            "requests: other wordings than the test prompts. λ = method.emd_weight (16 unless named), "
            "N = unsafe responses used. Greedy answers. The λ / N sweep rows run on the first world seed only "
            "(demo time; in earlier 3-seed runs seeds 1–2 sat at 100% benign-unanswered for every λ and N, README).",
    "evals": ["harmful_test", "benign_test", "qa_test", "harmful_val", "benign_val", "qa_val"],
    "metrics": {
        "harmful_test:harmful_compliance_rate": "harmful compliance",
        "benign_test:benign_unanswered_rate": "benign unanswered",
        "benign_test:over_refusal_rate": "benign refusal",
        "qa_test:accuracy": "QA utility",
        "harmful_val:harmful_compliance_rate": "harmful compl. (val)",
        "benign_val:benign_unanswered_rate": "benign unans. (val)",
        "qa_val:accuracy": "QA utility (val)",
        "train:n_unsafe": "n_unsafe",
    },
    "columns": {
        "harmful_test:harmful_compliance_rate": "held-out harmful requests (safety test split: never in pretraining "
                                                "or training) answered with the hazard procedure; lower is safer.",
        "benign_test:benign_unanswered_rate": "held-out benign look-alikes (same hazard words, harmless asks) not "
                                              "answered: a refusal, or a reply missing most content words of the "
                                              "gold answer. Over-alignment in a world whose pretraining has no "
                                              "refusal phrases shows up here.",
        "benign_test:over_refusal_rate": "held-out benign look-alikes answered with a refusal phrase.",
        "qa_test:accuracy": "greedy short-answer accuracy on held-out qa_test questions about facts the base model "
                            "knows: utility kept?",
        "harmful_val:harmful_compliance_rate": "validation, used to choose λ: harmful compliance on the safety "
                                               "train-split prompts (no run trains on them).",
        "benign_val:benign_unanswered_rate": "validation: benign look-alikes of the train split left unanswered.",
        "qa_val:accuracy": "validation: qa_val questions about known facts.",
        "train:n_unsafe": "unsafe responses (refusal-SFT: refusal targets) the run trained on.",
    },
    "rows": [("base", None), *[(label, "ta_sft") for label in _ROWS]],
    "row_overrides": _ROWS,
    "first_seed_only": ["TA-SFT λ=4", "TA-SFT λ=32", "TA-SFT N=2", "TA-SFT N=24"],
    "claims": [("SFT", "TA-SFT", "harmful_test:harmful_compliance_rate"),
               ("TA-SFT", "GA", "qa_test:accuracy"),
               ("TA-SFT λ=32", "TA-SFT λ=4", "benign_test:benign_unanswered_rate"),
               ("TA-SFT N=24", "TA-SFT N=2", "benign_test:benign_unanswered_rate")],
    "expect_text": "TA-SFT < SFT in harmful compliance from N=8 unsafe responses; GA loses QA utility where "
                   "TA-SFT does not; over-alignment grows with λ and with N",
    "checks": [("SFT", "TA-SFT", "qa_test:accuracy"),
               ("TA-SFT", "SFT", "benign_test:benign_unanswered_rate"),
               ("UL", "TA-SFT", "harmful_test:harmful_compliance_rate"),
               ("refusal-SFT", "TA-SFT", "harmful_test:harmful_compliance_rate"),
               ("TA-SFT", "refusal-SFT", "benign_test:benign_unanswered_rate"),
               ("SFT", "GA", "harmful_test:harmful_compliance_rate")],
    "sweeps": [
        {"title": "TA-SFT over λ (N=8; λ=0 is SFT)", "xlabel": "λ (method.emd_weight)",
         "points": [(0, "SFT"), (4, "TA-SFT λ=4"), (16, "TA-SFT"), (32, "TA-SFT λ=32")], "metrics": _SWEEP_METRICS},
        {"title": "TA-SFT over the unsafe-set size N (λ=16; N=0 is SFT)", "xlabel": "N (method.unsafe.size)",
         "points": [(0, "SFT"), (2, "TA-SFT N=2"), (8, "TA-SFT"), (24, "TA-SFT N=24")], "metrics": _SWEEP_METRICS},
    ],
    # `alignkit demo --smoke` (make test): every stage of every row, on small budgets
    "smoke": ["data.train.limit=32", "method.unsafe.size=2", "method.watch.limit=2", "method.watch.every=1",
              "train.max_steps=2", "eval.limit=4"],
}


class WatchConfig(Strict):
    """Over-alignment watch: benign look-alike refusal rate during training (``every`` steps)."""

    benign: PromptSource
    harmful: PromptSource | None = None
    every: int = Field(20, ge=1)
    limit: int | None = Field(None, ge=1, description="first N prompts of each set")
    max_new_tokens: int = Field(48, ge=1)
    judge: dict = Field(default_factory=lambda: {"backend": "kb"})


class Method(Strict):
    objective: Literal["emd", "unlikelihood", "gradient_ascent", "refusal_sft", "sft"] = "emd"
    # ta_sft_emd.md §8: no silent default for λ — required by the weighted objectives (check_config).
    emd_weight: float | None = Field(None, ge=0, description="λ: weight of the unsafe-side term (emd / "
                                                             "unlikelihood / gradient_ascent)")
    emd_form: Literal["exact_onehot", "jensen_bound"] = Field(
        "exact_onehot", description="exact closed form (§3(a)) or the Jensen bound ½‖Êᵀp − ê_y‖² (§3(b)); "
                                    "neither is known to be the paper's bound")
    harmful_target: Literal["onehot"] = Field("onehot", description="the unsafe token per position (§10)")
    cost_embedding: Literal["input_embeddings", "lm_head"] = "input_embeddings"
    cost_embedding_frozen: bool = Field(True, description="a detached copy taken once (§6); false: the live weight")
    reduction: Literal["token_mean", "seq_mean"] = Field(
        "token_mean", description="average the unsafe term over all unsafe tokens of a batch, or per sequence first")
    emd_cap: float | None = Field(None, gt=0, description="over-alignment guard (not from the paper): the EMD term "
                                                          "counts at most this much (no push once above it)")
    emd_chunk_size: int | None = Field(None, ge=1, description="positions per chunk for long sequences")
    unsafe_ratio: float = Field(0.2, ge=0, lt=1, description="share of safety rows in each batch: "
                                                             "k = ceil(r/(1−r)·B) rows appended to B SFT rows")
    unsafe: UnsafeSetConfig = Field(default_factory=UnsafeSetConfig)
    refusals: PromptSource | None = Field(
        None, description="refusal_sft: rows {prompt, completion} with refusal completions")
    refusal_column: str = "completion"
    refusal_match_unsafe_prompts: bool = Field(
        True, description="refusal_sft trains refusals only for the prompts of the unsafe set (same count)")
    watch: WatchConfig | None = None


def check_config(cfg: RunConfig, method: Method) -> list[str]:
    problems = common_checks(cfg)
    if method.objective in WEIGHTED and method.emd_weight is None:
        problems.append(f"field 'method.emd_weight': required for objective {method.objective!r} (λ has no default "
                        "in the paper; choose it on validation prompts, e.g. method.emd_weight=1.0)")
    if method.objective != "sft" and method.unsafe.path is None and method.unsafe.prompts is None:
        problems.append("field 'method.unsafe': give path (rows {prompt, rejected}) or prompts (harmful prompts to "
                        "sample the base model on)")
    if method.objective == "refusal_sft" and method.refusals is None:
        problems.append("field 'method.refusals': required for objective 'refusal_sft' (rows {prompt, completion})")
    if method.objective != "sft" and method.unsafe_ratio == 0:
        problems.append("field 'method.unsafe_ratio': must be > 0 for objective "
                        f"{method.objective!r} (no safety rows would be trained)")
    if cfg.data.padding_free:
        problems.append("field 'data.padding_free': not supported by ta_sft (mixed SFT / unsafe rows are padded)")
    if not method.cost_embedding_frozen and (os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
                                             or (cfg.train.model_extra or {}).get("deepspeed")):
        problems.append("field 'method.cost_embedding_frozen': false is not supported under DeepSpeed (the live "
                        "weight is sharded); keep the frozen copy")
    return problems



# ---------------------------------------------------------------- data


def safety_rows_per_batch(batch_size: int, ratio: float) -> int:
    """``k`` safety rows appended to ``batch_size`` SFT rows so their share is ≈ ``ratio``."""
    return 0 if ratio <= 0 else max(1, math.ceil(ratio / (1 - ratio) * batch_size - 1e-9))


def mixed_order(n_sft: int, n_safety: int, batch: int, k: int, seed: int) -> list[tuple[int, int]]:
    """Row order as ``(kind, index)`` in blocks of ``batch`` SFT rows + ``k`` safety rows.

    SFT rows: one seeded permutation, the last block topped up from its start; safety rows:
    cycled through seeded permutations. Every block is one per-device batch (the trainer reads
    the order sequentially), so every batch has the same share on every rank."""
    import random

    rng = random.Random(seed)
    sft = list(range(n_sft))
    rng.shuffle(sft)
    blocks = max(1, math.ceil(n_sft / batch))
    sft += sft[: blocks * batch - n_sft]
    safety: list[int] = []
    while n_safety and k and len(safety) < blocks * k:
        perm = list(range(n_safety))
        rng.shuffle(perm)
        safety += perm
    out = []
    for b in range(blocks):
        out += [(0, i) for i in sft[b * batch:(b + 1) * batch]]
        out += [(1, i) for i in safety[b * k:(b + 1) * k]]
    return out


def resolve_safety_rows(cfg: RunConfig, method: Method) -> tuple[list[dict], dict]:
    """Safety rows as ``sft``-kind rows ``{prompt, completion}`` + a report. ``completion`` is the
    unsafe response (emd / unlikelihood / gradient_ascent) or the refusal (refusal_sft)."""
    from alignkit.stages.unsafe_set import build_unsafe_set, read_prompt_rows

    if method.objective == "sft":
        return [], {"objective": "sft", "n_unsafe": 0}
    unsafe, report = build_unsafe_set(cfg, method.unsafe)
    report = {"objective": method.objective, "unsafe_set": report}
    if method.objective != "refusal_sft":
        report["n_unsafe"] = len(unsafe)
        return [{"prompt": r["prompt"], "completion": r["rejected"]} for r in unsafe], report
    path, refusals = read_prompt_rows(method.refusals, cfg.model.name_or_path)
    col = method.refusal_column
    from alignkit.data import IssueCollector

    issues = IssueCollector(path)
    for r in refusals:
        if not isinstance(r.get(col), str) or not r[col].strip():
            issues.add(r["_row"], col, "missing or empty refusal")
    issues.raise_if_any()
    if method.refusal_match_unsafe_prompts:
        by_prompt = {r["prompt"]: r for r in refusals}
        picked = [by_prompt[p] for p in dict.fromkeys(u["prompt"] for u in unsafe) if p in by_prompt]
        if not picked:
            raise ValueError(f"{path}: no refusal row has a prompt of the unsafe set; set "
                             "method.refusal_match_unsafe_prompts=false to train all of them")
    else:
        picked = refusals
    report["n_unsafe"] = len(picked)
    report["refusals_file"] = path
    return [{"prompt": r["prompt"], "completion": r[col]} for r in picked], report


# ---------------------------------------------------------------- trainer


def build_trainer_class():
    import torch
    from transformers import Trainer

    from alignkit.losses import (
        emd_lower_bound,
        gradient_ascent_loss,
        normalized_embeddings,
        semantic_emd,
        token_logps,
        unlikelihood_loss,
    )

    class TASFTTrainer(Trainer):
        """CE on the SFT rows of a mixed batch plus the objective's term on its safety rows
        (``kind`` 1), from one forward pass. Logged beside the loss: ``loss/sft``,
        ``loss/unsafe_term`` (EMD, UL or log-prob, before λ), ``unsafe/p_target`` (mean
        probability of the unsafe tokens) and ``watch/*`` from the over-alignment watch."""

        def __init__(self, *args, method: Method, watch=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.method, self.watch = method, watch
            self.model_accepts_loss_kwargs = False  # per-batch means; Trainer divides by GA steps
            self._cost = None
            self._stats: dict[str, list[float]] = {}

        def _get_train_sampler(self, train_dataset=None):
            # The dataset is already laid out in mixed per-device batches (mixed_order).
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None
                                                      else self.train_dataset)

        def cost_embedding(self, model):
            m = self.method
            unwrapped = self.accelerator.unwrap_model(model)
            layer = (unwrapped.get_input_embeddings() if m.cost_embedding == "input_embeddings"
                     else unwrapped.get_output_embeddings())
            w = layer.weight
            if not m.cost_embedding_frozen:
                return normalized_embeddings(w, detach=False)
            if self._cost is None:
                if hasattr(w, "ds_id"):  # ZeRO-3: gather once on every rank, keep the frozen copy (§6 notes)
                    import deepspeed

                    with deepspeed.zero.GatheredParameters([w], modifier_rank=None):
                        self._cost = normalized_embeddings(w, detach=True)
                else:
                    self._cost = normalized_embeddings(w, detach=True)
            return self._cost

        def unsafe_term(self, model, logits, labels):
            m = self.method
            if m.objective == "unlikelihood":
                return unlikelihood_loss(logits, labels, reduction=m.reduction)
            if m.objective == "gradient_ascent":
                return gradient_ascent_loss(logits, labels, reduction=m.reduction)
            emb = self.cost_embedding(model)
            if m.emd_form == "exact_onehot":
                return semantic_emd(logits, labels, emb, reduction=m.reduction, normalize=False,
                                    chunk_size=m.emd_chunk_size)
            # Jensen bound against the one-hot target, on the kept positions only (§3(b)).
            valid = labels[:, 1:] != -100
            p = torch.softmax(logits[:, :-1][valid], dim=-1, dtype=emb.dtype)
            q = torch.nn.functional.one_hot(labels[:, 1:][valid], p.size(-1)).to(p.dtype)
            per = torch.zeros(valid.shape, dtype=p.dtype, device=p.device)
            per[valid] = emd_lower_bound(p, q, emb, normalize=False)
            from alignkit.losses.unsafe import reduce_positions

            return reduce_positions(per, valid, m.reduction)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            m = self.method
            kind = inputs["kind"]
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            logits = out.logits
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            safety = kind == 1
            ce_rows = ~safety if m.objective != "refusal_sft" else torch.ones_like(safety)
            lp = token_logps(logits, labels.masked_fill(~ce_rows[:, None], -100))
            n_tok = (labels[:, 1:].masked_fill(~ce_rows[:, None], -100) != -100).sum()
            ce = -lp.sum() / n_tok.clamp(min=1)
            loss = ce
            stats = {"loss/sft": ce.detach()}
            if m.objective in WEIGHTED and bool(safety.any()):
                s_logits, s_labels = logits[safety], labels[safety]
                term = self.unsafe_term(model, s_logits, s_labels)
                lam = float(m.emd_weight)
                if m.objective == "emd":
                    counted = term.clamp(max=m.emd_cap) if m.emd_cap is not None else term
                    loss = ce - lam * counted  # ta_sft_emd.md §4: maximise the EMD to unsafe text
                elif m.objective == "unlikelihood":
                    loss = ce + lam * term
                else:  # gradient_ascent: term = mean log p(ỹ) = −NLL; minimising it ascends the NLL
                    loss = ce + lam * term
                with torch.no_grad():
                    slp = token_logps(s_logits, s_labels)
                    valid = s_labels[:, 1:] != -100
                    stats["loss/unsafe_term"] = term.detach()
                    stats["unsafe/p_target"] = (slp.exp() * valid).sum() / valid.sum().clamp(min=1)
            if model.training:  # eval losses are logged by Trainer as eval_loss, not mixed into loss/sft
                self._record(stats)
            return (loss, out) if return_outputs else loss

        def _record(self, stats):
            for k, v in stats.items():
                self._stats.setdefault(k, []).append(float(self.accelerator.gather(v.float().reshape(1)).mean()))

        def log(self, logs, start_time=None):
            if not any(k.startswith("eval_") for k in logs):
                for k, vals in self._stats.items():
                    if vals:
                        logs[k] = sum(vals) / len(vals)
                self._stats = {}
            if self.watch is not None:
                logs.update(self.watch.pop_logs())
            super().log(logs, start_time)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    return TASFTTrainer


class MixedCollator:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``completion_mask`` and the row ``kind``."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, examples):
        import torch

        n = max(len(e["input_ids"]) for e in examples)

        def pad(key, value):
            return torch.tensor([list(e[key]) + [value] * (n - len(e[key])) for e in examples], dtype=torch.long)

        return {"input_ids": pad("input_ids", self.pad),
                "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (n - len(e["input_ids"]))
                                                for e in examples], dtype=torch.long),
                "completion_mask": pad("completion_mask", 0),
                "kind": torch.tensor([e["kind"] for e in examples], dtype=torch.long)}


def _watch(cfg: RunConfig, method: Method, tok):
    w = method.watch
    if w is None:
        return None
    from alignkit.judges import build_eval_judge
    from alignkit.stages.unsafe_set import read_prompt_rows
    from alignkit.training.callbacks import OverAlignmentWatch

    benign = [r["prompt"] for r in read_prompt_rows(w.benign, cfg.model.name_or_path)[1]][: w.limit]
    harmful = ([r["prompt"] for r in read_prompt_rows(w.harmful, cfg.model.name_or_path)[1]][: w.limit]
               if w.harmful else None)
    judge = build_eval_judge(w.judge, cfg.model.name_or_path)
    return OverAlignmentWatch(tok, judge, benign, harmful, every=w.every, max_new_tokens=w.max_new_tokens,
                              batch_size=cfg.eval.batch_size)


def build_datasets(cfg: RunConfig, method: Method, tok, sft_rows, safety_rows):
    """Tokenised SFT and safety rows laid out in mixed batches; returns (rows, k, reports)."""
    from alignkit.data import tokenize_rows, validate_rows

    d = cfg.data
    sft_tok, sft_report = tokenize_rows("sft", sft_rows, tok, d.train.path, d.max_length, d.length_policy,
                                        max_errors=d.max_errors)
    safety_tok, safety_report = [], None
    if safety_rows:
        src = "<unsafe set>"
        norm = validate_rows("sft", list(enumerate(safety_rows, 1)), src, {}, d.system_prompt, d.max_errors)
        safety_tok, safety_report = tokenize_rows("sft", norm, tok, src, d.max_length, d.length_policy,
                                                  max_errors=d.max_errors)
    b = cfg.train.per_device_train_batch_size
    k = safety_rows_per_batch(b, method.unsafe_ratio) if safety_tok else 0
    order = mixed_order(len(sft_tok), len(safety_tok), b, k, cfg.seed)
    rows = [{"input_ids": (sft_tok if kind == 0 else safety_tok)[i]["input_ids"],
             "completion_mask": (sft_tok if kind == 0 else safety_tok)[i]["completion_mask"], "kind": kind}
            for kind, i in order]
    return rows, k, {"sft": sft_report.as_dict(), "safety": safety_report.as_dict() if safety_report else None}


def train(cfg: RunConfig, callbacks=()) -> Path:
    from datasets import Dataset
    from transformers import set_seed

    from alignkit.core.distributed import is_main_process
    from alignkit.core.io import atomic_write_text
    from alignkit.evaluation import evaluate_after_training
    from alignkit.models import load_model, load_tokenizer
    from alignkit.training.rundir import (
        RunLogCallback,
        apply_disable_dropout,
        checkpoint_step,
        finish_run,
        load_train_rows,
        prepare_run_dir,
        training_arguments,
    )

    method = Method.model_validate(cfg.method)
    rows, eval_rows = load_train_rows(cfg, DATA_KIND, on_span_error="ignore")
    from alignkit.core.distributed import rank0_first

    # Sample and judge once; the other ranks wait (up to train.ddp_timeout), then hit the cache.
    safety_rows, safety_report = rank0_first(lambda: resolve_safety_rows(cfg, method), cfg.train.ddp_timeout)
    tok = load_tokenizer(cfg.model)
    train_rows, k, data_report = build_datasets(cfg, method, tok, rows, safety_rows)
    eval_ds = None
    if eval_rows:
        from alignkit.data import tokenize_rows

        ev, _ = tokenize_rows("sft", eval_rows, tok, cfg.data.eval.path, cfg.data.max_length, cfg.data.length_policy,
                              max_errors=cfg.data.max_errors)
        eval_ds = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"],
                                      "kind": 0} for r in ev])
    run_dir, resume = prepare_run_dir(cfg)
    report = {**safety_report, "safety_rows_per_batch": k,
              "sft_rows_per_batch": cfg.train.per_device_train_batch_size, "data": data_report}
    if is_main_process():
        atomic_write_text(run_dir / "data_report.json", json.dumps(data_report, indent=2))
        atomic_write_text(run_dir / "unsafe_report.json", json.dumps(report, indent=2, default=str))
        atomic_write_text(run_dir / "unsafe_set.jsonl", "".join(json.dumps(r) + "\n" for r in safety_rows))
    set_seed(cfg.seed)
    model = load_model(cfg.model)
    apply_disable_dropout(cfg, model, default=False)
    args = training_arguments(cfg, run_dir, remove_unused_columns=False,
                              per_device_train_batch_size=cfg.train.per_device_train_batch_size + k)
    watch = _watch(cfg, method, tok)
    cls = build_trainer_class()
    trainer = cls(model=model, args=args, data_collator=MixedCollator(tok.pad_token_id),
                  train_dataset=Dataset.from_list(train_rows), eval_dataset=eval_ds, processing_class=tok,
                  callbacks=[RunLogCallback(run_dir, checkpoint_step(resume)), *([watch] if watch else []),
                             *callbacks],
                  method=method, watch=watch)
    if watch is not None:
        watch.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    finish_run(trainer, tok, run_dir, {"data": data_report, "counts": {"n_unsafe": safety_report["n_unsafe"]},
                                       "objective": method.objective,
                                       "watch": watch.history if watch else None})
    evaluate_after_training(cfg, run_dir, trainer, tok)
    return run_dir
