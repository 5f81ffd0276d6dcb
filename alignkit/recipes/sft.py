"""Supervised fine-tuning — the papers' common baseline.

Runs on ``trl.SFTTrainer`` with rows tokenised by the shared data module (exact
prompt/completion boundary, stop token trained); loss on completion tokens only.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from alignkit.config import RunConfig, Strict, common_checks

NAME = "sft"
DATA_KIND = "sft"


DEMO = {
    "title": "SFT: QA accuracy — facts taught by fine-tuning (training questions) vs held-out questions",
    "note": "Greedy short answers, judged against the gold answer and its aliases. Only the known / partial / "
            "unknown columns are held out; finetune-only re-asks training questions.",
    "evals": ["qa_finetune", "qa_test"],
    "metrics": {"qa_finetune:accuracy": "finetune-only (train)", "qa_test:accuracy/known": "known (held-out)",
                "qa_test:accuracy/partial": "partial (held-out)", "qa_test:accuracy/unknown": "unknown (held-out)",
                "qa_test:refusal_rate": "refusal (held-out)"},
    "columns": {
        "qa_finetune:accuracy": "NOT held out: the qa_train questions, in their training wording, about facts "
                                "absent from pretraining that sft_train teaches — memorisation of trained answers.",
        "qa_test:accuracy/known": "held-out qa_test questions (never in sft_train) on facts stated in pretraining "
                                  "with every exposure; SFT on unknown answers can cost accuracy here.",
        "qa_test:accuracy/partial": "held-out qa_test questions on facts pretraining stated less often.",
        "qa_test:accuracy/unknown": "held-out qa_test questions on facts in neither pretraining nor SFT data: "
                                    "correct only by chance.",
        "qa_test:refusal_rate": "share of all qa_test answers that refuse / say they do not know.",
    },
    "rows": [("base", None), ("SFT", "sft")],
    "claims": [("SFT", "base", "qa_finetune:accuracy")],
    "expect_text": "SFT > base on the facts it teaches",
    # the cost CRaFT targets: does SFT lower held-out accuracy on what the model knew?
    "checks": [("base", "SFT", "qa_test:accuracy/known")],
}


class Method(Strict):
    completion_only_loss: bool = Field(True, description="train on completion tokens only (else prompt too)")


def check_config(cfg: RunConfig, method: Method) -> list[str]:
    return common_checks(cfg)


def train(cfg: RunConfig, callbacks=()) -> Path:
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from alignkit.data import tokenize_rows
    from alignkit.models import load_model, load_tokenizer
    from alignkit.training import (
        RunLogCallback,
        apply_disable_dropout,
        atomic_write_text,
        checkpoint_step,
        finish_run,
        is_main_process,
        load_train_rows,
        prepare_run_dir,
        run_eval_after_training,
        training_arguments,
    )

    method = Method.model_validate(cfg.method)
    rows, eval_rows = load_train_rows(cfg, DATA_KIND)
    d = cfg.data
    tok = load_tokenizer(cfg.model)
    train_tok, report = tokenize_rows("sft", rows, tok, d.train.path, d.max_length, d.length_policy,
                                      max_errors=d.max_errors)
    eval_tok = None
    if eval_rows:
        eval_tok, _ = tokenize_rows("sft", eval_rows, tok, d.eval.path, d.max_length, d.length_policy,
                                    max_errors=d.max_errors)
    run_dir, resume = prepare_run_dir(cfg)
    if is_main_process():
        atomic_write_text(run_dir / "data_report.json", json.dumps(report.as_dict(), indent=2))
    set_seed(cfg.seed)
    model = load_model(cfg.model)
    apply_disable_dropout(cfg, model, default=False)  # TRL's SFT keeps dropout; opt in with model.disable_dropout
    strip = lambda rs: [{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rs]  # noqa: E731
    args = training_arguments(
        # Lengths are already enforced by data.length_policy; TRL must not truncate again.
        cfg, run_dir, cls=SFTConfig, max_length=None, padding_free=d.padding_free,
        completion_only_loss=method.completion_only_loss, dataset_num_proc=None,
    )
    resume_step = checkpoint_step(resume)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(strip(train_tok)),
        eval_dataset=Dataset.from_list(strip(eval_tok)) if eval_tok else None, processing_class=tok,
        callbacks=[RunLogCallback(run_dir, resume_step), *callbacks],
    )
    trainer.train(resume_from_checkpoint=resume)
    finish_run(trainer, tok, run_dir, {"data": report.as_dict()})
    run_eval_after_training(cfg, run_dir, trainer, tok)
    return run_dir
