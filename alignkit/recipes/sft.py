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
    # `alignkit demo --smoke` (make test): every stage of every row, on small budgets
    "smoke": ["data.train.limit=64", "train.max_steps=2", "eval.limit=6"],
}


class Method(Strict):
    completion_only_loss: bool = Field(True, description="train on completion tokens only (else prompt too)")


def check_config(cfg: RunConfig, method: Method) -> list[str]:
    return common_checks(cfg)


def train(cfg: RunConfig, callbacks=()) -> Path:
    from alignkit.core.distributed import is_main_process
    from alignkit.core.io import atomic_write_text
    from alignkit.data import tokenize_rows
    from alignkit.evaluation import evaluate_after_training
    from alignkit.models import load_tokenizer
    from alignkit.training.rundir import load_train_rows, prepare_run_dir
    from alignkit.training.sft import train_sft_rows

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
    train_sft_rows(cfg, tok, train_tok, eval_tok, run_dir, resume, method.completion_only_loss,
                   {"data": report.as_dict()}, callbacks, evaluate=evaluate_after_training)
    return run_dir
