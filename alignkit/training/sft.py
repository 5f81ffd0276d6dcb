"""Plain SFT on pre-tokenised rows: the last step of every recipe that ends in SFT."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers import Trainer

from alignkit.config import RunConfig
from alignkit.training.rundir import (
    RunLogCallback,
    apply_disable_dropout,
    checkpoint_step,
    finish_run,
    training_arguments,
)


def train_sft_rows(cfg: RunConfig, tok, train_tok: list[dict], eval_tok: list[dict] | None, run_dir: Path,
                   resume: str | None, completion_only_loss: bool, extra: dict, callbacks=(),
                   evaluate: Callable | None = None) -> Trainer:
    """Plain SFT on pre-tokenised rows (``input_ids`` + ``completion_mask``) with ``trl.SFTTrainer``:
    load the policy, train, save, then ``evaluate(cfg, run_dir, trainer, tokenizer)`` when given
    (:func:`alignkit.evaluation.evaluate_after_training`). The last step of every recipe that ends
    in SFT (``sft``; CRaFT's RAIT); returns the trainer."""
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
        cfg, run_dir, cls=SFTConfig, max_length=None, padding_free=bool(cfg.data.padding_free),
        completion_only_loss=completion_only_loss, dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=strip(train_tok), eval_dataset=strip(eval_tok) if eval_tok else None,
        processing_class=tok, callbacks=[RunLogCallback(run_dir, checkpoint_step(resume)), *callbacks],
    )
    trainer.train(resume_from_checkpoint=resume)
    finish_run(trainer, tok, run_dir, extra)
    if evaluate is not None:
        evaluate(cfg, run_dir, trainer, tok)
    return trainer
