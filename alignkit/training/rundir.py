"""Run directories, resume and logging, shared by every trainer.

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

from alignkit.config import ConfigError, RunConfig, dump_config
from alignkit.core.distributed import is_main_process
from alignkit.core.io import atomic_write_text

log = logging.getLogger(__name__)


COMPLETE_MARKER = "COMPLETE"


RUN_MARKER = "RUN_COMPLETE"


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


def prepare_run_dir(cfg: RunConfig, run_state: tuple[str, ...] = ()) -> tuple[Path, str | None]:
    """Create the run dir, refusing to clobber an earlier run unless resuming or told to.
    ``run_state``: a recipe's own files that only a resume may read back (TA-SFT's frozen cost
    embedding); like the logs, they are dropped when ``auto`` finds nothing to resume."""
    run = Path(cfg.output_dir)
    resume = resolve_resume(cfg)
    # Only rank 0 decides: other ranks would see the directory rank 0 just created. If
    # rank 0 refuses, the launcher tears the other ranks down.
    if is_main_process() and run.exists() and any(run.iterdir()) and resume is None:
        if cfg.train.resume_from_checkpoint == "auto" and not (run / RUN_MARKER).exists():
            # auto with nothing complete to resume: start over, dropping the killed run's logs and
            # incomplete checkpoints so they don't mix with the new run's.
            for stale in ("metrics.jsonl", "tb", "checkpoints", *run_state):
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


def load_train_rows(cfg: RunConfig, kind: str, on_span_error: str = "raise") -> tuple[list[dict], list[dict] | None]:
    """Validate train/eval rows — the first thing a run does, before any model loads.
    ``on_span_error="ignore"``: sentence annotations are not read (recipes that never use them)."""
    from alignkit.config.paths import expand_config
    from alignkit.data import load_rows

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
