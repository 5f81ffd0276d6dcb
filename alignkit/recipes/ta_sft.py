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
SFT rows in the same order (a new seeded order every epoch), plus safety rows appended to
the batches so that their share of all rows is ``unsafe_ratio`` — so the rows of the demo
differ only in what they do with the safety rows:

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
            "(demo time; on world v4, seeds 1–2 sat at 100% benign-unanswered for every λ and N).",
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
                                              "gold answer. Over-alignment shows up here, also as answers that "
                                              "are not refusal phrases (the world's base model refuses some "
                                              "look-alikes itself: its corpus refuses 30% of them).",
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
    cost_embedding_frozen: bool = Field(
        True, description="a copy of the BASE model's embedding taken once at the start and saved in the run "
                          "directory (cost_embedding.safetensors; a resumed run reads it back) (§6); false: the "
                          "current weight, detached every step (EMO's live head: no gradient into the cost)")
    reduction: Literal["token_mean", "seq_mean"] = Field(
        "token_mean", description="average the unsafe term over all unsafe tokens of a batch, or per sequence first")
    emd_cap: float | None = Field(None, gt=0, description="over-alignment guard (not from the paper): the EMD term "
                                                          "counts at most this much (no push once above it)")
    emd_chunk_size: int | None = Field(None, ge=1, description="positions per chunk for long sequences")
    unsafe_ratio: float = Field(0.2, ge=0, lt=1, description="share of safety rows among all rows trained: "
                                                             "r/(1−r)·B per batch of B SFT rows on average "
                                                             "(⌊·⌋ or ⌈·⌉ rows per batch)")
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
    # The tiny world's exact judges have no meaning for a real model: no silent stand-in.
    if not cfg.model.name_or_path.startswith("world:"):
        for field, spec in (("method.watch.judge", method.watch and method.watch.judge),
                            ("method.unsafe.judge", method.objective != "sft" and method.unsafe.path is None
                             and method.unsafe.judge)):
            if spec and dict(spec).get("backend", "kb") == "kb":
                problems.append(f"field '{field}': the 'kb' judge is the tiny world's knowledge base and model "
                                f"{cfg.model.name_or_path!r} is not a world: model; set a real judge, e.g. "
                                f"{field}={{backend: rules}} or {{backend: http, base_url: ..., model: ...}}")
    return problems



# ---------------------------------------------------------------- data


def safety_rows_per_batch(batch_size: int, ratio: float) -> float:
    """Safety rows per batch of ``batch_size`` SFT rows, on average, for a share of ``ratio``
    of all rows: r/(1−r)·B (a batch gets its floor or its ceiling, :func:`mixed_blocks`)."""
    return 0.0 if ratio <= 0 else ratio / (1 - ratio) * batch_size


def mixed_blocks(n_sft: int, n_safety: int, batch: int, ratio: float, seed: int, epoch: int = 0
                 ) -> list[list[tuple[int, int]]]:
    """One epoch's batches as ``(kind, index)`` rows: ``batch`` SFT rows + that batch's safety rows.

    SFT rows: a seeded permutation per epoch (``seed``, ``epoch``; the last batch topped up
    from its start) — the same for every objective. Safety rows: their count per batch is
    the floor or the ceiling of r/(1−r)·B, spread so that the running total never drifts
    from the target by a row (at B=4, r=0.1: 0, 1, 0, 1, 0, 1, 0, 0, 1, … = 10% of all rows,
    where a whole row per batch would be 20%); the rows themselves cycle through seeded
    permutations of the safety set, continuing from one epoch to the next."""
    import random

    sft = list(range(n_sft))
    random.Random(f"{seed}:sft:{epoch}").shuffle(sft)
    blocks = max(1, math.ceil(n_sft / batch))
    sft += sft[: blocks * batch - n_sft]
    per = safety_rows_per_batch(batch, ratio) if n_safety else 0.0

    def cum(j: int) -> int:  # safety rows in the first j batches of the run, rounded half up
        return math.floor(per * j + 0.5 + 1e-9)

    first = epoch * blocks
    counts = [cum(first + b + 1) - cum(first + b) for b in range(blocks)]
    stream: list[int] = []
    rng = random.Random(f"{seed}:safety")
    while n_safety and len(stream) < cum(first + blocks):
        perm = list(range(n_safety))
        rng.shuffle(perm)
        stream += perm
    pos, out = cum(first), []
    for b, k in enumerate(counts):
        out.append([(0, i) for i in sft[b * batch:(b + 1) * batch]] + [(1, i) for i in stream[pos:pos + k]])
        pos += k
    return out


class MixedBatches:
    """The train batch sampler: :func:`mixed_blocks` of the current epoch, as dataset indices
    (SFT rows first, then the safety rows). The Trainer calls ``set_epoch`` before every epoch
    (also through accelerate's ``BatchSamplerShard``, which hands process i every i-th batch,
    and after ``skip_first_batches`` on resume), so each epoch has its own order."""

    def __init__(self, n_sft: int, n_safety: int, batch: int, ratio: float, seed: int):
        self.n_sft, self.n_safety, self.batch, self.ratio, self.seed = n_sft, n_safety, batch, ratio, seed
        self.epoch = 0
        self.batch_size = None  # variable-size batches (accelerate: "dynamic length")
        self.drop_last = False
        self.sampler = self  # where accelerate looks for set_epoch under a wrapping batch sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return max(1, math.ceil(self.n_sft / self.batch))

    def __iter__(self):
        for block in mixed_blocks(self.n_sft, self.n_safety, self.batch, self.ratio, self.seed, self.epoch):
            yield [i if kind == 0 else self.n_sft + i for kind, i in block]


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

COST_FILE = "cost_embedding.safetensors"


def full_weight(w):
    """The whole ``[V, d]`` tensor behind a possibly sharded parameter: FSDP2 ``DTensor``
    (all-gathered; every rank must call this, as compute_loss does) or a ZeRO-3 partition
    (gathered for the copy). A plain tensor is returned as is."""
    if hasattr(w, "ds_id"):  # ZeRO-3: gather once on every rank (§6 notes)
        import deepspeed

        with deepspeed.zero.GatheredParameters([w], modifier_rank=None):
            return w.detach().clone()
    from torch.distributed.tensor import DTensor

    if isinstance(w, DTensor):
        return w.detach().full_tensor()
    if w.dim() != 2:  # FSDP1 outside forward: a flat shard, not the matrix
        raise RuntimeError(f"cost embedding weight has shape {tuple(w.shape)}, not [vocab, dim]: a sharded FSDP1 "
                           "parameter; use FSDP2 (configs/accelerate/fsdp.yaml) or cost_embedding_frozen: true")
    return w


def cost_layer_weight(model, which: str):
    layer = model.get_input_embeddings() if which == "input_embeddings" else model.get_output_embeddings()
    return layer.weight


def base_cost_embedding(model, method: Method, run_dir: Path | None = None):
    """The frozen cost embedding Ê (L2-normalised, float32, on the CPU), taken from the model
    as loaded — the BASE weights, before any step — and saved as ``run_dir/cost_embedding.safetensors``.
    When that file is already there (a resumed run), it is read back instead: by then the
    model holds fine-tuned weights, and "frozen" must mean the copy the run started with."""
    from safetensors.torch import load_file, save_file

    from alignkit.core.distributed import is_main_process
    from alignkit.losses import normalized_embeddings

    path = Path(run_dir) / COST_FILE if run_dir is not None else None
    w = cost_layer_weight(model, method.cost_embedding)
    if path is not None and path.exists():
        cost = load_file(str(path))["cost_embedding"]
        if w.dim() == 2 and tuple(cost.shape) != tuple(w.shape):
            raise ValueError(f"{path}: shape {tuple(cost.shape)} does not match the model's {method.cost_embedding} "
                             f"{tuple(w.shape)}; it belongs to another model")
        return cost
    cost = normalized_embeddings(full_weight(w), detach=True).cpu().contiguous()
    if path is not None and is_main_process():
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"cost_embedding": cost}, str(tmp), metadata={"cost_embedding": method.cost_embedding})
        tmp.replace(path)
    return cost


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
        probability of the unsafe tokens) and ``watch/*`` from the over-alignment watch.

        ``batches``: the :class:`MixedBatches` sampler of the train set (None: the Trainer's
        own sampler). ``cost``: the frozen cost embedding (:func:`base_cost_embedding`); taken
        from the model on first use when not given."""

        def __init__(self, *args, method: Method, watch=None, batches: MixedBatches | None = None, cost=None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.method, self.watch, self.batches = method, watch, batches
            self.model_accepts_loss_kwargs = False  # per-batch means; Trainer divides by GA steps
            self._cost = cost
            self._stats: dict[str, list[float]] = {}

        def get_train_dataloader(self):
            if self.batches is None:
                return super().get_train_dataloader()
            from torch.utils.data import DataLoader

            dl = DataLoader(self.train_dataset, batch_sampler=self.batches, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
            return self.accelerator.prepare(dl)

        def cost_embedding(self, model):
            m = self.method
            unwrapped = self.accelerator.unwrap_model(model)
            w = cost_layer_weight(unwrapped, m.cost_embedding)
            if not m.cost_embedding_frozen:
                # The live weight, DETACHED (EMO's instruction-tuning setting): TA-SFT maximises the
                # EMD, and a gradient through the cost would push the embeddings apart to inflate
                # it instead of moving the next-token distributions.
                return normalized_embeddings(full_weight(w), detach=True)
            if self._cost is None:
                self._cost = base_cost_embedding(unwrapped, m)
            if self._cost.device != w.device:
                self._cost = self._cost.to(w.device)
            return self._cost

        def unsafe_term(self, model, logits, labels, emb=None):
            m = self.method
            if m.objective == "unlikelihood":
                return unlikelihood_loss(logits, labels, reduction=m.reduction)
            if m.objective == "gradient_ascent":
                return gradient_ascent_loss(logits, labels, reduction=m.reduction)
            emb = self.cost_embedding(model) if emb is None else emb
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
            # Every rank, every step, before the safety rows are looked at: gathering a sharded live
            # weight is a collective, and one rank's batch may have no safety row while another's has.
            emb = self.cost_embedding(model) if m.objective == "emd" else None
            if m.objective in WEIGHTED:
                # the same keys on every rank (gathered below); NaN = no safety row in this batch
                nan = torch.tensor(float("nan"), device=logits.device)
                stats.update({"loss/unsafe_term": nan, "unsafe/p_target": nan})
            if m.objective in WEIGHTED and bool(safety.any()):
                s_logits, s_labels = logits[safety], labels[safety]
                term = self.unsafe_term(model, s_logits, s_labels, emb)
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
                x = float(torch.nanmean(self.accelerator.gather(v.float().reshape(1))))
                if x == x:  # batches without safety rows on any rank add nothing to the unsafe means
                    self._stats.setdefault(k, []).append(x)

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
    from alignkit.data import read_rows
    from alignkit.judges import build_eval_judge
    from alignkit.judges.rules import benign_gold
    from alignkit.stages.unsafe_set import read_prompt_rows
    from alignkit.training.callbacks import OverAlignmentWatch

    path, rows = read_prompt_rows(w.benign, cfg.model.name_or_path)
    rows = rows[: w.limit]
    # The gold answers of the benign look-alikes (column response / compliant_response): a reply
    # that misses most of it counts as unanswered, the eval's benign_unanswered_rate — refusal
    # phrases alone read 0 where a model over-aligns by answering off the point (the tiny world).
    raw = dict(read_rows(path))
    golds = [benign_gold(raw[r["_row"]]) for r in rows]
    harmful = ([r["prompt"] for r in read_prompt_rows(w.harmful, cfg.model.name_or_path)[1]][: w.limit]
               if w.harmful else None)
    judge = build_eval_judge(w.judge, cfg.model.name_or_path)
    return OverAlignmentWatch(tok, judge, [r["prompt"] for r in rows], harmful, every=w.every,
                              max_new_tokens=w.max_new_tokens, batch_size=cfg.eval.batch_size, benign_golds=golds)


def build_datasets(cfg: RunConfig, method: Method, tok, sft_rows, safety_rows):
    """Tokenised SFT rows then safety rows (``kind`` 0 / 1) and their batch sampler
    (:class:`MixedBatches`); returns (rows, batches, reports)."""
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
    batches = MixedBatches(len(sft_tok), len(safety_tok), cfg.train.per_device_train_batch_size,
                           method.unsafe_ratio if safety_tok else 0.0, cfg.seed)
    rows = [{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"], "kind": kind}
            for kind, part in ((0, sft_tok), (1, safety_tok)) for r in part]
    return rows, batches, {"sft": sft_report.as_dict(), "safety": safety_report.as_dict() if safety_report else None}


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
    train_rows, batches, data_report = build_datasets(cfg, method, tok, rows, safety_rows)
    eval_ds = None
    if eval_rows:
        from alignkit.data import tokenize_rows

        ev, _ = tokenize_rows("sft", eval_rows, tok, cfg.data.eval.path, cfg.data.max_length, cfg.data.length_policy,
                              max_errors=cfg.data.max_errors)
        eval_ds = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"],
                                      "kind": 0} for r in ev])
    # a killed run's frozen cost copy is not this run's when auto finds nothing to resume (the
    # model may have changed since); a resume reads it back (base_cost_embedding)
    run_dir, resume = prepare_run_dir(cfg, run_state=(COST_FILE,))
    b = cfg.train.per_device_train_batch_size
    per = safety_rows_per_batch(b, batches.ratio)
    report = {**safety_report, "safety_rows_per_batch": per, "sft_rows_per_batch": b,
              "safety_share": per / (b + per), "data": data_report}
    if is_main_process():
        atomic_write_text(run_dir / "data_report.json", json.dumps(data_report, indent=2))
        atomic_write_text(run_dir / "unsafe_report.json", json.dumps(report, indent=2, default=str))
        atomic_write_text(run_dir / "unsafe_set.jsonl", "".join(json.dumps(r) + "\n" for r in safety_rows))
    set_seed(cfg.seed)
    model = load_model(cfg.model)
    apply_disable_dropout(cfg, model, default=False)
    # The frozen cost embedding: from these base weights (a resume reads the copy saved at the start)
    cost = base_cost_embedding(model, method, run_dir) \
        if method.objective == "emd" and method.cost_embedding_frozen else None
    # per_device_train_batch_size only sizes logs here: the batches come from MixedBatches
    args = training_arguments(cfg, run_dir, remove_unused_columns=False,
                              per_device_train_batch_size=b + math.ceil(per))
    watch = _watch(cfg, method, tok)
    cls = build_trainer_class()
    trainer = cls(model=model, args=args, data_collator=MixedCollator(tok.pad_token_id),
                  train_dataset=Dataset.from_list(train_rows), eval_dataset=eval_ds, processing_class=tok,
                  callbacks=[RunLogCallback(run_dir, checkpoint_step(resume)), *([watch] if watch else []),
                             *callbacks],
                  method=method, watch=watch, batches=batches, cost=cost)
    if watch is not None:
        watch.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    finish_run(trainer, tok, run_dir, {"data": data_report, "counts": {"n_unsafe": safety_report["n_unsafe"]},
                                       "objective": method.objective,
                                       "watch": watch.history if watch else None})
    evaluate_after_training(cfg, run_dir, trainer, tok)
    return run_dir
