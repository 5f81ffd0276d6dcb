"""Self-sampled, judge-labelled preference pairs — shared by the DPO-family recipes.

Stages (each fingerprinted and skipped when unchanged, :mod:`alignkit.stages`):

1. ``sample`` — K responses per prompt from the policy itself (Mask-DPO Table 3:
   on-policy data matters, 77.53 vs 59.43).
2. ``label``  — split each response into sentences (character spans kept) and label
   each with the judge: correct / hallucination / nofact. Score = share of correct
   among checkable sentences (ANAH-v2 score of one response).
3. ``pair``   — per prompt, highest- vs lowest-scoring sample; ties and margins below
   ``min_score_margin`` are skipped and counted.

The pairs file is a ``preference`` dataset with ``chosen_sentences``/``chosen_labels``
annotations, so response-level DPO and Mask-DPO train on exactly the same pairs.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignkit.config import RunConfig, Strict
from alignkit.data import read_rows
from alignkit.stages import file_digest, read_jsonl, run_stage

log = logging.getLogger(__name__)


class PairsConfig(Strict):
    """``method`` options of recipes that can build their own pairs from prompts."""

    input: Literal["auto", "prompts", "annotated"] = Field(
        "auto", description="prompts: run sample/label/pair stages; annotated: preference rows")
    sentence_splitter: str = "regex"
    gen_num_samples: int = Field(8, ge=2)
    gen_temperature: float = Field(1.0, gt=0)
    gen_top_p: float = Field(1.0, gt=0, le=1)
    gen_max_new_tokens: int = Field(128, ge=8)
    gen_batch_size: int = Field(32, ge=1)
    pair_selector: Literal["max_min", "random"] = "max_min"
    min_score_margin: float = Field(0.0, ge=0, le=1)
    pairs_per_prompt: int = Field(1, ge=1)
    judge: dict = Field(default_factory=lambda: {"backend": "kb"}, description="sentence labeller for stage 2")
    stage_dir: str | None = None


def is_preference_file(path: str) -> bool:
    """Peek at the first parsable row; bad rows are reported later, all together, by load_rows."""
    from alignkit.data import IssueCollector

    rows = read_rows(path, issues=IssueCollector(path))
    return bool(rows) and "chosen" in rows[0][1]


def stage_sample(cfg: RunConfig, p: PairsConfig, prompts_path: str) -> Path:
    from alignkit.models import resolve_path
    from alignkit.sampling import model_fingerprint

    limit = cfg.data.train.limit
    key = {"model": model_fingerprint(resolve_path(cfg.model.name_or_path)), "prompts": file_digest(prompts_path),
           "n": p.gen_num_samples, "temperature": p.gen_temperature, "top_p": p.gen_top_p,
           "max_new_tokens": p.gen_max_new_tokens, "seed": cfg.seed, "limit": limit}

    def fn():
        from alignkit.models import load_for_inference
        from alignkit.sampling import generate

        rows = [r for _, r in read_rows(prompts_path)][:limit]
        model, tok = load_for_inference(cfg.model.name_or_path, cfg.model.dtype)
        outs = generate(model, tok, [r["prompt"] for r in rows], n=p.gen_num_samples, temperature=p.gen_temperature,
                        top_p=p.gen_top_p, max_new_tokens=p.gen_max_new_tokens, batch_size=p.gen_batch_size,
                        seed=cfg.seed)
        return [{**r, "samples": o} for r, o in zip(rows, outs)]

    return run_stage("pairs_sample", key, fn, p.stage_dir)


def stage_label(cfg: RunConfig, p: PairsConfig, samples_path: Path) -> Path:
    from alignkit.judges.base import JudgeRequest

    key = {"samples": samples_path.name, "judge": p.judge, "splitter": p.sentence_splitter}

    def fn():
        from alignkit.data import split_sentences
        from alignkit.evaluation import build_eval_judge

        judge = build_eval_judge(p.judge, cfg.model.name_or_path)
        rows = read_jsonl(samples_path)
        reqs, owner = [], []
        for i, r in enumerate(rows):
            meta = {k: v for k, v in r.items() if k != "samples"}
            for text in r["samples"]:
                sents = split_sentences(text, p.sentence_splitter) if text.strip() else []
                reqs.append(JudgeRequest(prompt=r["prompt"], response=text, sentences=sents, meta=meta))
                owner.append(i)
        labels = judge.label_sentences(reqs)
        out = [{**{k: v for k, v in r.items() if k != "samples"}, "samples": []} for r in rows]
        for i, req, lab in zip(owner, reqs, labels):
            n_c, n_h = lab.count("correct"), lab.count("hallucination")
            out[i]["samples"].append({"text": req.response, "sentences": req.sentences, "labels": lab,
                                      "score": n_c / (n_c + n_h) if n_c + n_h else None})
        return out

    return run_stage("pairs_label", key, fn, p.stage_dir)


def select_pairs(rows: list[dict], p: PairsConfig, seed: int = 0) -> tuple[list[dict], Counter]:
    """Preference pairs from labelled samples; counts why prompts yield no pair."""
    rng = random.Random(seed)
    pairs, why = [], Counter()
    for r in rows:
        cands = [s for s in r["samples"] if s["score"] is not None and s["text"].strip()]
        if len(cands) < 2:
            why["fewer_than_2_scored_samples"] += 1
            continue
        if p.pair_selector == "random":
            rng.shuffle(cands)
        cands.sort(key=lambda s: s["score"], reverse=True)  # stable: random order breaks ties
        meta = {k: v for k, v in r.items() if k not in ("samples", "prompt")}
        for k in range(min(p.pairs_per_prompt, len(cands) // 2)):
            hi, lo = cands[k], cands[-1 - k]
            if hi["score"] - lo["score"] <= p.min_score_margin or hi["score"] == lo["score"]:
                why["score_margin_too_small"] += 1
                break
            if hi["text"] == lo["text"]:
                why["identical_texts"] += 1
                continue
            pairs.append({
                "prompt": r["prompt"], "chosen": hi["text"], "rejected": lo["text"],
                "chosen_sentences": hi["sentences"], "chosen_labels": hi["labels"],
                "rejected_sentences": lo["sentences"], "rejected_labels": lo["labels"],
                "chosen_score": hi["score"], "rejected_score": lo["score"], **meta,
            })
            why["pairs"] += 1
    return pairs, why


def build_pairs(cfg: RunConfig, p: PairsConfig) -> Path:
    """Run the three stages on ``data.train`` (prompts); return the pairs file."""
    samples = stage_sample(cfg, p, cfg.data.train.path)
    labelled = stage_label(cfg, p, samples)
    key = {"labelled": labelled.name, "selector": p.pair_selector, "margin": p.min_score_margin,
           "per_prompt": p.pairs_per_prompt, "seed": cfg.seed}

    def fn():
        pairs, why = select_pairs(read_jsonl(labelled), p, cfg.seed)
        log.info("pair selection: %s", dict(why))
        if not pairs:
            raise ValueError(f"no preference pairs could be built from {cfg.data.train.path}: {dict(why)}")
        return pairs

    return run_stage("pairs_select", key, fn, p.stage_dir)


def resolve_train_pairs(cfg: RunConfig, p: PairsConfig) -> None:
    """If ``data.train`` holds prompts, build pairs and point ``data.train`` at them (in place)."""
    mode = p.input
    if mode == "auto":
        mode = "annotated" if is_preference_file(cfg.data.train.path) else "prompts"
    if mode == "prompts":
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Sample and judge once: rank 0 builds, the other ranks then hit the stage cache.
            from accelerate import PartialState

            with PartialState().main_process_first():
                path = build_pairs(cfg, p)
        else:
            path = build_pairs(cfg, p)
        cfg.data.train.path = str(path)
        cfg.data.train.limit = None
