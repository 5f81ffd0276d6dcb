"""Shared evaluation: generate on held-out sets, judge, and compute the papers' metrics.

Tasks (``eval.datasets: {name: {task, path}}``):

* ``qa`` — greedy short answers; accuracy (judge ``is_correct`` against gold aliases),
  refusal rate; broken down by the ``knowledge`` column when present.
* ``factuality`` — long-form answers split into sentences and labelled by the judge;
  factuality score = correct / (correct + incorrect) (ANAH-v2 score, mask_dpo.md §6).
* ``safety`` — harmful-compliance rate on ``label: harmful`` prompts and over-refusal
  rate on ``label: benign`` look-alikes.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from alignkit.data import load_rows, split_sentences, write_jsonl_atomic
from alignkit.judges.base import Judge, JudgeRequest


def build_eval_judge(judge_spec: dict, model_name_or_path: str) -> Judge:
    spec = dict(judge_spec)
    if spec.get("backend", "kb") == "kb":
        from alignkit.judges.kb import KBJudge
        from alignkit.paths import world_uri
        from alignkit.world import world_dir_for_uri

        return KBJudge(spec.get("world_dir") or world_dir_for_uri(world_uri(model_name_or_path)))
    from alignkit.judges import build_judge

    return build_judge(spec)


def _generate(model, tokenizer, prompts, ecfg, seed: int) -> tuple[list[str], int]:
    from alignkit.sampling import generate

    greedy = ecfg.temperature == 0
    outs = generate(model, tokenizer, prompts, n=1 if greedy else ecfg.num_samples, greedy=greedy,
                    temperature=ecfg.temperature or 1.0, max_new_tokens=ecfg.max_new_tokens,
                    batch_size=ecfg.batch_size, seed=seed, progress=False)
    return [o for group in outs for o in group], (1 if greedy else ecfg.num_samples)


def task_qa(model, tokenizer, rows, judge: Judge, ecfg, seed: int = 0) -> tuple[dict, list[dict]]:
    outs, n = _generate(model, tokenizer, [r["question"] for r in rows], ecfg, seed)
    reqs = [JudgeRequest(prompt=rows[i // n]["question"], response=o, golds=rows[i // n]["answers"],
                         meta=_meta(rows[i // n])) for i, o in enumerate(outs)]
    correct = judge.is_correct(reqs)
    refused = judge.is_refusal(reqs)
    by: dict[str, list] = defaultdict(list)
    for r, c, f in zip(reqs, correct, refused):
        by[r.meta.get("knowledge", "all")].append((c, f))
    res = {"n": len(reqs), "accuracy": _mean(correct), "refusal_rate": _mean(refused)}
    for k, vals in by.items():
        if k != "all":
            res[f"accuracy/{k}"] = _mean([c for c, _ in vals])
            res[f"refusal_rate/{k}"] = _mean([f for _, f in vals])
    samples = [{"prompt": r.prompt, "response": r.response, "correct": c, "refusal": f}
               for r, c, f in zip(reqs, correct, refused)]
    return res, samples


def task_factuality(model, tokenizer, rows, judge: Judge, ecfg, seed: int = 0) -> tuple[dict, list[dict]]:
    from alignkit.metrics import factuality_from_labels

    outs, n = _generate(model, tokenizer, [r["prompt"] for r in rows], ecfg, seed)
    reqs = []
    for i, o in enumerate(outs):
        r = rows[i // n]
        reqs.append(JudgeRequest(prompt=r["prompt"], response=o, sentences=split_sentences(o) if o else [],
                                 meta=_meta(r)))
    labels = judge.label_sentences(reqs)
    res = factuality_from_labels(labels)
    res["n"] = len(reqs)
    res["sentences_per_response"] = sum(len(x) for x in labels) / max(len(labels), 1)
    samples = [{"prompt": r.prompt, "response": r.response, "sentences": r.sentences, "labels": lab}
               for r, lab in zip(reqs, labels)]
    return res, samples


def task_safety(model, tokenizer, rows, judge: Judge, ecfg, seed: int = 0) -> tuple[dict, list[dict]]:
    outs, n = _generate(model, tokenizer, [r["prompt"] for r in rows], ecfg, seed)
    reqs = [JudgeRequest(prompt=rows[i // n]["prompt"], response=o, meta=_meta(rows[i // n]))
            for i, o in enumerate(outs)]
    harmful = judge.is_harmful(reqs)
    refused = judge.is_refusal(reqs)
    lab = [str(r.meta.get("label")) for r in reqs]
    harm_idx = [i for i, x in enumerate(lab) if x in ("harmful", "illegitimate", "1", "True")]
    benign_idx = [i for i, x in enumerate(lab) if i not in set(harm_idx)]
    res = {
        "n": len(reqs),
        "harmful_compliance_rate": _mean([harmful[i] for i in harm_idx]),
        "harmful_refusal_rate": _mean([refused[i] for i in harm_idx]),
        "over_refusal_rate": _mean([refused[i] for i in benign_idx]),
    }
    samples = [{"prompt": r.prompt, "response": r.response, "label": lab[i], "harmful": harmful[i],
                "refusal": refused[i]} for i, r in enumerate(reqs)]
    return res, samples


TASKS = {"qa": ("qa", "question", task_qa), "factuality": (None, "prompt", task_factuality),
         "safety": ("safety", "prompt", task_safety)}


def _meta(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(bool(x) for x in xs) / len(xs)) if xs else float("nan")


def _load_eval_rows(task: str, path: str, limit: int | None, where: dict | None = None) -> list[dict]:
    kind, key, _ = TASKS[task]
    if kind is not None:
        rows = load_rows(path, kind)
    else:  # free-form prompts with metadata (e.g. {"prompt": "Tell me about X.", "entity": X})
        from alignkit.data import read_rows
        from alignkit.data.errors import IssueCollector

        raw = read_rows(path)
        issues = IssueCollector(path)
        rows = []
        for i, r in raw:
            if not isinstance(r.get(key), str) or not r[key].strip():
                issues.add(i, key, "missing or empty")
            rows.append(r)
        issues.raise_if_any()
    if where:
        rows = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
        if not rows:
            raise ValueError(f"{path}: no rows match {where}")
    return rows[:limit] if limit else rows


def evaluate_model(model, tokenizer, ecfg, judge: Judge, out_dir: Path | None = None, seed: int = 0,
                   datasets: dict | None = None) -> dict:
    """Run every eval set; write ``metrics.json`` and ``eval_<name>.jsonl`` under ``out_dir``."""
    datasets = ecfg.datasets if datasets is None else datasets
    results, timings = {}, {}
    for name, es in datasets.items():
        t0 = time.time()
        rows = _load_eval_rows(es.task, es.path, es.limit or ecfg.limit, es.where)
        res, samples = TASKS[es.task][2](model, tokenizer, rows, judge, ecfg, seed)
        results[name] = res
        timings[name] = round(time.time() - t0, 2)
        if out_dir is not None:
            write_jsonl_atomic(Path(out_dir) / f"eval_{name}.jsonl", samples)
    out = {"eval": results, "eval_seconds": timings}
    if out_dir is not None:
        from alignkit.training import atomic_write_text

        atomic_write_text(Path(out_dir) / "metrics.json", json.dumps(out, indent=2))
    return out


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """``alignkit eval RUN_DIR``: load the run's final model and config, evaluate."""
    from alignkit.config import load_config
    from alignkit.models import load_for_inference
    from alignkit.paths import expand_config

    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").exists():
        cfg = load_config(run_dir / "config.yaml", overrides)
        model_path = str(run_dir / "model") if (run_dir / "model").exists() else cfg.model.name_or_path
        out_dir = run_dir
    else:  # a recipe config: evaluate its (untrained) model, beside — never over — a run's results
        cfg = load_config(run_dir, overrides)
        model_path, out_dir = cfg.model.name_or_path, Path(cfg.output_dir) / "base_eval"
        out_dir.mkdir(parents=True, exist_ok=True)
    expand_config(cfg)
    model, tok = load_for_inference(model_path, cfg.model.dtype)
    judge = build_eval_judge(cfg.eval.judge, cfg.model.name_or_path)
    return evaluate_model(model, tok, cfg.eval, judge, out_dir, seed=cfg.seed)
