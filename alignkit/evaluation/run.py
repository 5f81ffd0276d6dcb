"""Evaluating a model on a config's eval sets: after training, of a finished run, or of a base model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from alignkit.config import RunConfig
from alignkit.core.io import atomic_write_text, write_jsonl_atomic
from alignkit.evaluation.tasks import TASKS, _load_eval_rows
from alignkit.judges import Judge, build_eval_judge
from alignkit.metrics.records import metric_ci, read_records

if TYPE_CHECKING:
    from transformers import Trainer


def attach_ths(out_dir: str | Path, reference: dict[str, list[dict]], names: list[str] | None = None) -> dict:
    """Add THS relative to a reference model (CRaFT: the initial model, Basic prompt) to the
    qa results in ``out_dir/metrics.json``: ``ths``, ``p_correct0``, ``p_wrong0`` and
    ``ci95.ths``; each record of ``eval_<set>.jsonl`` gets ``ths_k = P_c0 / P_w0``.
    ``reference``: eval set -> the reference model's records on the same prompts."""
    from alignkit.metrics import qa_rates, truthful_helpfulness_score

    out_dir = Path(out_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for name, ref in reference.items():
        if names is not None and name not in names:
            continue
        path = out_dir / f"eval_{name}.jsonl"
        if name not in metrics.get("eval", {}) or not path.exists():
            continue
        recs = read_records(path)
        r0 = qa_rates([r["correct"] for r in ref], [r["refusal"] for r in ref])
        r1 = qa_rates([r["correct"] for r in recs], [r["refusal"] for r in recs])
        if r0["p_wrong"] == 0:
            continue  # THS undefined: the reference is never wrong
        k = r0["p_correct"] / r0["p_wrong"]
        recs = [{**r, "ths_k": k} for r in recs]
        write_jsonl_atomic(path, recs)
        res = metrics["eval"][name]
        res.update(p_correct0=r0["p_correct"], p_wrong0=r0["p_wrong"],
                   ths=truthful_helpfulness_score(r1["p_correct"], r1["p_wrong"], r0["p_correct"], r0["p_wrong"]))
        c = metric_ci("qa", recs, "ths")
        if c is not None:
            res.setdefault("ci95", {})["ths"] = [c["lo"], c["hi"]]
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def evaluate_model(model, tokenizer, ecfg, judge: Judge, out_dir: Path | None = None, seed: int = 0,
                   datasets: dict | None = None) -> dict:
    """Run every eval set; write ``metrics.json`` and ``eval_<name>.jsonl`` under ``out_dir``."""
    if datasets is None:
        datasets = {k: v for k, v in ecfg.datasets.items() if ecfg.run is None or k in ecfg.run}
    results, timings = {}, {}
    for name, es in datasets.items():
        t0 = time.time()
        rows = _load_eval_rows(es.task, es.path, es.limit or ecfg.limit, es.where)
        task_kw = {"options": es.options} if es.task in ("jailbreak", "qa", "dualuse") else {}
        res, samples = TASKS[es.task][2](model, tokenizer, rows, judge, ecfg, seed, **task_kw)
        cis = {k: metric_ci(es.task, samples, k) for k in list(res)}
        res["ci95"] = {k: [c["lo"], c["hi"]] for k, c in cis.items() if c is not None}
        results[name] = res
        timings[name] = round(time.time() - t0, 2)
        if out_dir is not None:
            write_jsonl_atomic(Path(out_dir) / f"eval_{name}.jsonl", samples)
    out = {"eval": results, "eval_seconds": timings}
    if out_dir is not None:
        from alignkit.core.io import atomic_write_text

        atomic_write_text(Path(out_dir) / "metrics.json", json.dumps(out, indent=2))
    return out


def evaluate_after_training(cfg: RunConfig, run_dir: Path, trainer: Trainer, tokenizer) -> dict | None:
    """Evaluate on the main process. Under ZeRO-3/FSDP the in-memory weights are sharded
    (a forward on one rank would wait forever for the others), so the saved, gathered
    model is reloaded instead."""
    if not (cfg.eval.enabled and cfg.eval.datasets):
        return None
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None
    from alignkit.evaluation.run import evaluate_model
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
