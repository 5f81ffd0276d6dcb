"""Shared training plumbing: run directories, resume, logging, and the preference trainer.

Run directory layout (``output_dir``)::

    config.yaml          the resolved config (diffed on resume)
    data_report.json     rows in/out and drops by reason
    metrics.jsonl        one JSON line per logging step (loss, rewards, masks, lr, ...)
    tb/                  TensorBoard events
    checkpoints/checkpoint-N/   HF Trainer checkpoints; COMPLETE is written last
    model/               the final weights (or LoRA adapter) + tokenizer
    RUN_COMPLETE         written after the final model is saved
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from alignkit.config import ConfigError, RunConfig, common_checks, dump_config, preference_checks  # noqa: F401 (re-exported)
from alignkit.data.io import atomic_write_text
from alignkit.losses import mask_dpo_loss

log = logging.getLogger(__name__)
COMPLETE_MARKER = "COMPLETE"
RUN_MARKER = "RUN_COMPLETE"


# ---------------------------------------------------------------- run directory


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def checkpoint_step(path: str | Path | None) -> int:
    """Global step of a checkpoint, from its trainer_state.json (folder names can be anything)."""
    if not path:
        return 0
    state = Path(path) / "trainer_state.json"
    return int(json.loads(state.read_text())["global_step"]) if state.exists() else 0


def latest_complete_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose completion marker exists (a crash mid-save leaves none)."""
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return None
    done = [p for p in ckpts.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def resolve_resume(cfg: RunConfig) -> str | None:
    r = cfg.train.resume_from_checkpoint
    if r in (None, "", "false", "False"):
        return None
    if r == "auto":
        ck = latest_complete_checkpoint(cfg.output_dir)
        return str(ck) if ck else None
    if not (Path(r) / COMPLETE_MARKER).exists() and not Path(r, "trainer_state.json").exists():
        raise ConfigError(f"field 'train.resume_from_checkpoint': {r} is not a complete checkpoint")
    return r


def prepare_run_dir(cfg: RunConfig) -> tuple[Path, str | None]:
    """Create the run dir, refusing to clobber an earlier run unless resuming or told to."""
    run = Path(cfg.output_dir)
    resume = resolve_resume(cfg)
    # Only rank 0 decides: other ranks would see the directory rank 0 just created. If
    # rank 0 refuses, the launcher tears the other ranks down.
    if is_main_process() and run.exists() and any(run.iterdir()) and resume is None:
        if cfg.train.resume_from_checkpoint == "auto" and not (run / RUN_MARKER).exists():
            # auto with nothing complete to resume: start over, dropping the killed run's logs and
            # incomplete checkpoints so they don't mix with the new run's.
            for stale in ("metrics.jsonl", "tb", "checkpoints"):
                p = run / stale
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        elif not cfg.overwrite_output_dir:
            raise ConfigError(
                f"output_dir '{run}' already holds a run; choose another output_dir, resume it with "
                "train.resume_from_checkpoint=auto, or set overwrite_output_dir=true"
            )
        else:
            # Set the old run aside; it is deleted only once the new run completes (finish_run),
            # so a failed overwrite still leaves it on disk.
            aside = run.with_name(f".{run.name}.replaced")
            if aside.exists():
                shutil.rmtree(aside)
            run.rename(aside)
            log.warning("overwrite_output_dir: previous run moved to %s until this run completes", aside)
    if is_main_process():
        run.mkdir(parents=True, exist_ok=True)
        if resume is not None and (run / "config.yaml").exists():
            old = (run / "config.yaml").read_text()
            new = dump_config(cfg)
            if _strip_resume(old) != _strip_resume(new):
                log.warning("config differs from the run being resumed (%s); continuing with the new one", run)
        atomic_write_text(run / "config.yaml", dump_config(cfg))
    return run, resume


def _strip_resume(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "resume_from_checkpoint" not in line)


def training_arguments(cfg: RunConfig, run_dir: Path, cls=TrainingArguments, **extra) -> TrainingArguments:
    t = cfg.train.model_dump()
    t.pop("resume_from_checkpoint", None)
    save_steps = t.pop("save_steps")
    eval_steps = t.pop("eval_steps")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tb")
    args = dict(
        output_dir=str(run_dir / "checkpoints"),
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        eval_strategy="steps" if (eval_steps and cfg.data.eval) else "no",
        eval_steps=eval_steps,
        disable_tqdm=bool(os.environ.get("TQDM_DISABLE")),
        use_cpu=not torch.cuda.is_available(),
        **t,
    )
    args.update(extra)
    return cls(**args)


class RunLogCallback(TrainerCallback):
    """metrics.jsonl (one line per log) and checkpoint completion markers."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step and self.path.exists() and is_main_process():
            # Drop lines a killed run logged after the checkpoint we resume from.
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ck.is_dir():
                (ck / COMPLETE_MARKER).write_text(str(state.global_step))


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x] if p.exists() else []


def finish_run(trainer: Trainer, tokenizer, run_dir: Path, extra: dict | None = None) -> None:
    """Save the final model + tokenizer and the completion marker (main process writes)."""
    final = run_dir / "model"
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final))
        summary = {"global_step": trainer.state.global_step, **(extra or {})}
        atomic_write_text(run_dir / "train_results.json", json.dumps(summary, indent=2))
        (run_dir / RUN_MARKER).write_text("ok")
        aside = run_dir.with_name(f".{run_dir.name}.replaced")
        if aside.exists():
            shutil.rmtree(aside)


# ---------------------------------------------------------------- preference trainer


def pair_stats(lp, w, comp, cr, rr) -> dict[str, torch.Tensor]:
    """Per-pair metric vectors ``[B]`` from the ``[2B, T]`` token tensors and per-pair rewards."""
    b = lp.size(0) // 2
    kept = (w * comp).sum(-1) / comp.sum(-1).clamp(min=1)
    return {
        "rewards/chosen": cr, "rewards/rejected": rr,
        "rewards/accuracies": (cr > rr).float(), "rewards/margins": cr - rr,
        "logps/chosen": (lp[:b] * comp[:b]).sum(-1), "logps/rejected": (lp[b:] * comp[b:]).sum(-1),
        "mask/chosen_masked_frac": 1 - kept[:b], "mask/rejected_masked_frac": 1 - kept[b:],
    }


def accumulate_pair_stats(acc: dict[str, tuple[float, int]], stats: dict[str, torch.Tensor], gather) -> None:
    """Add per-pair vectors to running ``(sum, count)`` totals, gathered over ranks first.

    Gathering the per-pair vectors (not per-rank means) lets ``gather_for_metrics`` drop
    exactly the samples the sampler duplicated to even out the last batch, and weights
    every pair once however batches, ranks and accumulation steps split them — so a
    logged value is the mean over all pairs of the logging window.
    """
    for k, v in stats.items():
        g = gather(v.detach().float().reshape(-1))
        total, count = acc.get(k, (0.0, 0))
        acc[k] = (total + g.sum().item(), count + g.numel())


class PreferenceTrainer(Trainer):
    """DPO-family trainer over ``transformers.Trainer`` public hooks.

    Why not ``trl.DPOTrainer``: since TRL v0.29 it re-tokenises the dataset inside
    ``__init__`` (``_prepare_dataset``) with no public opt-out, which would throw away
    the exact character-span token weights Mask-DPO needs. Everything else follows
    TRL's layout: one forward over ``[chosen; rejected]`` (2B rows), a multiplicative
    completion mask, reference = adapter-disabled policy under LoRA or a frozen copy,
    reference forwards under ``no_grad``, loss scaled by gradient-accumulation steps.
    The loss is :func:`alignkit.losses.mask_dpo_loss`, which *is* sigmoid DPO when the
    weights equal the completion mask.
    """

    def __init__(self, *args, ref_model=None, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        # Our loss is a per-pair mean; let Trainer divide by GA steps (trl#2615).
        self.model_accepts_loss_kwargs = False
        self.ref_model = ref_model
        if ref_model is not None:
            if self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                self.ref_model = prepare_deepspeed(ref_model, self.accelerator)
            else:
                self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        # mode -> metric -> (sum over pairs, number of pairs) since the last log.
        self._stats: dict[str, dict[str, tuple[float, int]]] = {"train": {}, "eval": {}}

    # Per-token log-probs aligned with input tokens: lp[:, t] = log p(x_t | x_<t), lp[:, 0] = 0.
    def _token_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from alignkit.data import unpack
        from alignkit.losses import token_logps

        kw = {"input_ids": inputs["input_ids"], "use_cache": False}
        if "position_ids" in inputs:  # padding-free: no attention mask, packed sequences
            kw["position_ids"] = inputs["position_ids"]
        else:
            kw["attention_mask"] = inputs["attention_mask"]
        logits = model(**kw).logits
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        lp = token_logps(logits, labels)
        lp = torch.cat([lp.new_zeros(lp.size(0), 1), lp], dim=1)
        w, comp = inputs["loss_weights"], inputs["completion_mask"]
        if "seq_lens" in inputs:
            lp, w, comp = (unpack(x, inputs["seq_lens"]) for x in (lp, w, comp))
        return lp, w, comp

    def _ref_token_logps(self, model, inputs) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_model is not None:
                return self._token_logps(self.ref_model, inputs)[0]
            unwrapped = self.accelerator.unwrap_model(model)
            if hasattr(unwrapped, "disable_adapter"):
                with unwrapped.disable_adapter():
                    return self._token_logps(model, inputs)[0]
            raise RuntimeError("no reference: pass ref_model, use LoRA, or precompute reference log-probs")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        lp, w, comp = self._token_logps(model, inputs)
        b = lp.size(0) // 2
        if "ref_chosen_logps" in inputs:  # precomputed reference sums (same weights)
            losses, cr, rr = self._loss_from_sums(lp, w, b, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
        else:
            ref = self._ref_token_logps(model, inputs)
            losses, cr, rr = mask_dpo_loss(lp[:b], lp[b:], ref[:b], ref[b:], w[:b], w[b:], beta=self.beta,
                                           label_smoothing=self.label_smoothing, loss_type=self.loss_type)
        loss = losses.mean()
        with torch.no_grad():
            accumulate_pair_stats(self._stats[mode], pair_stats(lp, w, comp, cr, rr), self._gather_pairs)
        return (loss, {"losses": losses}) if return_outputs else loss

    def _gather_pairs(self, v: torch.Tensor) -> torch.Tensor:
        # Trainer fetches a whole accumulation window before computing it, so accelerate's
        # end-of-dataloader flag is already set on the window's earlier micro-batches and
        # gather_for_metrics would cut real pairs from them. Only the window's last
        # micro-batch (sync step) can be the epoch's last batch, the one holding padding
        # duplicates to trim.
        if self.model.training and not self.accelerator.gradient_state.sync_gradients:
            return self.accelerator.gather(v)
        return self.accelerator.gather_for_metrics(v)

    def _loss_from_sums(self, lp, w, b, ref_chosen, ref_rejected):
        from alignkit.losses import dpo_loss

        pc, pr = (lp[:b] * w[:b]).sum(-1), (lp[b:] * w[b:]).sum(-1)
        rc, rr = ref_chosen.to(pc), ref_rejected.to(pr)
        if self.loss_type == "ipo":  # mask_dpo.md §2: average over unmasked tokens
            nc, nr = w[:b].sum(-1).clamp(min=1), w[b:].sum(-1).clamp(min=1)
            pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
        return dpo_loss(pc, pr, rc, rr, beta=self.beta, label_smoothing=self.label_smoothing, loss_type=self.loss_type)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for k, (total, count) in self._stats[mode].items():
            if count:
                logs[prefix + k] = total / count
        self._stats[mode].clear()
        super().log(logs, start_time)

    @torch.no_grad()
    def precompute_reference(self, dataset, batch_size: int = 8):
        """Add ``ref_chosen_logps``/``ref_rejected_logps`` columns (masked sums) in one pass.

        Must run before the first optimiser step (the policy *is* the reference then,
        unless a ref model or adapter is present). Frees the reference model afterwards.
        """
        from torch.utils.data import DataLoader

        model = self.model
        model.eval()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.data_collator)
        chosen, rejected = [], []
        dev = self.args.device
        for batch in loader:
            batch = {k: v.to(dev) for k, v in batch.items()}
            if self.ref_model is not None or hasattr(self.accelerator.unwrap_model(model), "disable_adapter"):
                lp = self._ref_token_logps(model, batch)
            else:
                lp = self._token_logps(model, batch)[0]
            w = batch["loss_weights"] if "seq_lens" not in batch else None
            if w is None:
                from alignkit.data import unpack

                w = unpack(batch["loss_weights"], batch["seq_lens"])
            sums = (lp * w).sum(-1).float().cpu()
            b = sums.numel() // 2
            chosen += sums[:b].tolist()
            rejected += sums[b:].tolist()
        model.train()
        self.ref_model = None
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)


# ---------------------------------------------------------------- shared recipe flows


def load_train_rows(cfg: RunConfig, kind: str, on_span_error: str = "raise") -> tuple[list[dict], list[dict] | None]:
    """Validate train/eval rows — the first thing a run does, before any model loads.
    ``on_span_error="ignore"``: sentence annotations are not read (recipes that never use them)."""
    from alignkit.data import load_rows
    from alignkit.paths import expand_config

    expand_config(cfg)
    d = cfg.data
    train = load_rows(d.train, kind, d.max_errors, d.system_prompt, on_span_error)
    evals = load_rows(d.eval, kind, d.max_errors, d.system_prompt, on_span_error) if d.eval else None
    return train, evals


def apply_disable_dropout(cfg: RunConfig, model, default: bool) -> None:
    """``model.disable_dropout`` (unset: the recipe's ``default``) -> every dropout to 0."""
    on = cfg.model.disable_dropout
    if on if on is not None else default:
        from alignkit.models import disable_dropout

        n = disable_dropout(model)
        log.info("disable_dropout: %d dropout settings set to 0", n)


def train_sft_rows(cfg: RunConfig, tok, train_tok: list[dict], eval_tok: list[dict] | None, run_dir: Path,
                   resume: str | None, completion_only_loss: bool, extra: dict, callbacks=()) -> Trainer:
    """Plain SFT on pre-tokenised rows (``input_ids`` + ``completion_mask``) with ``trl.SFTTrainer``:
    load the policy, train, save, evaluate. The last step of every recipe that ends in SFT
    (``sft``; CRaFT's RAIT); returns the trainer."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from alignkit.models import load_model

    set_seed(cfg.seed)
    model = load_model(cfg.model)
    apply_disable_dropout(cfg, model, default=False)  # TRL's SFT keeps dropout; opt in with model.disable_dropout

    def strip(rs):
        return Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rs])

    args = training_arguments(
        # Lengths are already enforced by data.length_policy; TRL must not truncate again.
        cfg, run_dir, cls=SFTConfig, max_length=None, padding_free=cfg.data.padding_free,
        completion_only_loss=completion_only_loss, dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=strip(train_tok), eval_dataset=strip(eval_tok) if eval_tok else None,
        processing_class=tok, callbacks=[RunLogCallback(run_dir, checkpoint_step(resume)), *callbacks],
    )
    trainer.train(resume_from_checkpoint=resume)
    finish_run(trainer, tok, run_dir, extra)
    run_eval_after_training(cfg, run_dir, trainer, tok)
    return trainer


def run_eval_after_training(cfg: RunConfig, run_dir: Path, trainer: Trainer, tokenizer) -> dict | None:
    """Evaluate on the main process. Under ZeRO-3/FSDP the in-memory weights are sharded
    (a forward on one rank would wait forever for the others), so the saved, gathered
    model is reloaded instead."""
    if not (cfg.eval.enabled and cfg.eval.datasets):
        return None
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None
    from alignkit.evaluation import build_eval_judge, evaluate_model
    from alignkit.models import load_for_inference

    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        # A plain single-process load: while TrainingArguments holds a ZeRO-3 config,
        # from_pretrained would partition the weights through deepspeed.zero.Init and
        # broadcast to ranks that have already left (gloo: "Connection closed by peer").
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        model, tokenizer = load_for_inference(str(run_dir / "model"), cfg.model.dtype)
    else:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if cfg.model.quantization is not None:
            from alignkit.models import configure_cpu_4bit

            # Training is over (the final model is saved): the fast packed 4-bit CPU kernel may be used now.
            configure_cpu_4bit(model, allow_packed=cfg.model.quantization.cpu_packed_inference)
    model.eval()
    judge = build_eval_judge(cfg.eval.judge, cfg.model.name_or_path)
    return evaluate_model(model, tokenizer, cfg.eval, judge, run_dir, seed=cfg.seed)


def train_preference(cfg: RunConfig, method, rows: list[dict], eval_rows: list[dict] | None,
                     weight_fn=None, callbacks=()) -> Path:
    """Tokenise preference rows (with optional per-token weights) and run PreferenceTrainer."""
    from datasets import Dataset
    from transformers import set_seed

    from alignkit.data import PaddingFreePreferenceCollator, PreferenceCollator, tokenize_rows
    from alignkit.models import load_model, load_reference, load_tokenizer

    d = cfg.data
    tok = load_tokenizer(cfg.model)
    src = d.train.path
    train_tok, report = tokenize_rows("preference", rows, tok, src, d.max_length, d.length_policy, weight_fn,
                                      d.max_errors)
    eval_tok = None
    if eval_rows:
        eval_tok, _ = tokenize_rows("preference", eval_rows, tok, d.eval.path, d.max_length, d.length_policy,
                                    weight_fn, d.max_errors)
    run_dir, resume = prepare_run_dir(cfg)
    if is_main_process():
        atomic_write_text(run_dir / "data_report.json", json.dumps(report.as_dict(), indent=2))
    set_seed(cfg.seed)
    model = load_model(cfg.model)
    # Before the reference copy is taken, so policy and reference forwards are the same function at step 1.
    apply_disable_dropout(cfg, model, default=True)
    ref = None if method.precompute_ref_logps else load_reference(cfg.model, model)
    collator = (PaddingFreePreferenceCollator(tok.pad_token_id) if d.padding_free
                else PreferenceCollator(tok.pad_token_id))
    args = training_arguments(cfg, run_dir, remove_unused_columns=False)
    resume_step = checkpoint_step(resume)
    trainer = PreferenceTrainer(
        model=model, ref_model=ref, args=args, data_collator=collator,
        train_dataset=Dataset.from_list(train_tok), eval_dataset=Dataset.from_list(eval_tok) if eval_tok else None,
        processing_class=tok, callbacks=[RunLogCallback(run_dir, resume_step), *callbacks],
        beta=method.beta, loss_type=method.loss_type, label_smoothing=method.label_smoothing,
    )
    if method.precompute_ref_logps:
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise ConfigError("field 'method.precompute_ref_logps': not supported under DeepSpeed/FSDP launches")
        trainer.train_dataset = trainer.precompute_reference(trainer.train_dataset, args.per_device_eval_batch_size)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = trainer.precompute_reference(trainer.eval_dataset, args.per_device_eval_batch_size)
    trainer.train(resume_from_checkpoint=resume)
    finish_run(trainer, tok, run_dir, {"data": report.as_dict()})
    run_eval_after_training(cfg, run_dir, trainer, tok)
    return run_dir
