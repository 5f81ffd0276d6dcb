"""Self-sampled, judge-labelled preference pairs — shared by the DPO-family recipes.

Stages (each fingerprinted and skipped when unchanged, :mod:`alignkit.stages`):

1. ``sample`` — K responses per prompt from the policy itself (Mask-DPO Table 3:
   on-policy data matters, 77.53 vs 59.43).
2. ``label``  — split each response into sentences (character spans kept) and label
   each with the judge: correct / hallucination / nofact. Score = share of correct
   among checkable sentences (ANAH-v2 score of one response).
3. ``pair``   — per prompt, ``max_min`` (highest vs lowest score, then 2nd vs 2nd-last...)
   or ``random`` (uniformly random eligible pairs). A pair is eligible when
   ``score(chosen) - score(rejected) >= min_score_margin`` and the gap is > 0; a sample
   is used at most once per prompt. Responses cut at ``gen_max_new_tokens`` are dropped
   from pairing by default (``truncated_responses``). Skips are counted by reason in the
   log and in the stage's ``.provenance.json`` (``report``).

Prompts are read through the data module exactly as training will see them
(``data.train.columns``, ``data.system_prompt``; kind ``prompt``) and sampled as message
lists, so the pairs are on-policy for the prompt actually trained.

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
from alignkit.core.fingerprint import file_digest
from alignkit.core.io import read_jsonl
from alignkit.data import read_rows
from alignkit.stages.runner import run_stage

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
    pair_selector: Literal["max_min", "random"] = Field(
        "max_min", description="max_min: best vs worst (then 2nd vs 2nd-last...); random: uniformly random "
                               "eligible pairs (score gap >= min_score_margin and > 0), no sample used twice")
    min_score_margin: float = Field(0.0, ge=0, le=1, description="keep a pair when its score gap is >= this (and > 0)")
    pairs_per_prompt: int = Field(1, ge=1)
    truncated_responses: Literal["drop", "no_end_of_turn"] = Field(
        "drop", description="samples that hit gen_max_new_tokens: drop from pairing, or train them without the "
                            "end-of-turn token (they did not end)")
    judge: dict = Field(default_factory=lambda: {"backend": "kb"}, description="sentence labeller for stage 2")
    stage_dir: str | None = None


def is_preference_file(path: str) -> bool:
    """Peek at the first parsable row; bad rows are reported later, all together, by load_rows."""
    from alignkit.data import IssueCollector

    rows = read_rows(path, issues=IssueCollector(path))
    return bool(rows) and "chosen" in rows[0][1]


def _code_digest(*objs) -> str:
    """Digest of the source files defining ``objs`` (modules, classes, functions): a changed
    judge backend or splitter must not reuse labels produced by the old code."""
    import hashlib
    import inspect

    h = hashlib.sha256()
    for obj in objs:
        # A callable instance or functools.partial: its class / wrapped function defines the code.
        target = obj if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj) else \
            getattr(obj, "func", type(obj))
        try:
            h.update(Path(inspect.getsourcefile(target)).read_bytes())
        except (TypeError, OSError):  # built-ins, REPL code: the qualified name is all there is
            # (never repr(): it can hold a memory address, different on every process and rank)
            h.update(f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', type(target).__name__)}"
                     .encode())
    return h.hexdigest()[:16]


def _judge_code_digest() -> str:
    import alignkit.judges as judges
    import alignkit.world.kb as world_kb  # the knowledge-base judge's labelling logic lives here

    files = sorted(Path(judges.__file__).parent.glob("*.py")) + [Path(world_kb.__file__)]
    from alignkit.core.fingerprint import fingerprint

    return fingerprint(*[file_digest(f) for f in files])


def load_prompts(cfg: RunConfig, prompts_path: str) -> list[dict]:
    """Prompt rows as training will see them: columns mapped, system prompt added, message lists."""
    from alignkit.data import load_rows

    d = cfg.data
    src = d.train.model_copy(update={"path": prompts_path})
    return load_rows(src, "prompt", d.max_errors, d.system_prompt)


def _judge_prompt(messages: list[dict]) -> str:
    # Judges take the question as text: the last user turn.
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def stage_sample(cfg: RunConfig, p: PairsConfig, prompts_path: str) -> Path:
    from alignkit.generation.backends import sampler_fingerprint

    d = cfg.data
    m = cfg.model
    # Everything that changes the samples: the model (weights, revision, dtype) or the engine
    # serving it (cfg.generation), the prompts as rendered (file, columns, limit, system prompt),
    # decoding and batching (per-batch seeds, sampling.py).
    key = {"model": sampler_fingerprint(cfg), "revision": m.revision,
           "dtype": m.dtype, "prompts": file_digest(prompts_path), "format": d.train.format,
           "split": d.train.split, "columns": d.train.columns, "system_prompt": d.system_prompt,
           "where": d.train.where, "limit": d.train.limit, "n": p.gen_num_samples, "temperature": p.gen_temperature, "top_p": p.gen_top_p,
           "max_new_tokens": p.gen_max_new_tokens, "batch_size": p.gen_batch_size, "seed": cfg.seed, "v": 2}

    def fn():
        from alignkit.generation.backends import load_sampler
        from alignkit.generation.sampling import generate

        rows = load_prompts(cfg, prompts_path)
        model, tok = load_sampler(cfg, p.stage_dir)
        outs, cut = generate(model, tok, [r["prompt"] for r in rows], n=p.gen_num_samples,
                             temperature=p.gen_temperature, top_p=p.gen_top_p, max_new_tokens=p.gen_max_new_tokens,
                             batch_size=p.gen_batch_size, seed=cfg.seed, return_truncated=True)
        return [{**{k: v for k, v in r.items() if k != "_row"}, "samples": o, "truncated": t}
                for r, o, t in zip(rows, outs, cut)]

    return run_stage("pairs_sample", key, fn, p.stage_dir)


def stage_label(cfg: RunConfig, p: PairsConfig, samples_path: Path) -> Path:
    from alignkit.data import get_splitter
    from alignkit.data import sentences as sentences_mod
    from alignkit.judges.base import JudgeRequest

    try:
        splitter = get_splitter(p.sentence_splitter)
    except ValueError:
        splitter = None
    # The samples' content, the judge's config and code, and the splitter's code.
    key = {"samples": file_digest(samples_path), "judge": p.judge, "judge_code": _judge_code_digest(),
           "splitter": p.sentence_splitter, "splitter_code": _code_digest(sentences_mod, splitter),
           "model": cfg.model.name_or_path}

    def fn():
        from alignkit.data import split_sentences
        from alignkit.judges import build_eval_judge

        judge = build_eval_judge(p.judge, cfg.model.name_or_path)
        rows = read_jsonl(samples_path)
        reqs, owner, cut = [], [], []
        for i, r in enumerate(rows):
            meta = {k: v for k, v in r.items() if k not in ("samples", "truncated")}
            flags = r.get("truncated") or [False] * len(r["samples"])
            for text, t in zip(r["samples"], flags):
                sents = split_sentences(text, p.sentence_splitter) if text.strip() else []
                prompt = r["prompt"] if isinstance(r["prompt"], str) else _judge_prompt(r["prompt"])
                reqs.append(JudgeRequest(prompt=prompt, response=text, sentences=sents, meta=meta))
                owner.append(i)
                cut.append(bool(t))
        labels = judge.label_sentences(reqs)
        out = [{**{k: v for k, v in r.items() if k not in ("samples", "truncated")}, "samples": []} for r in rows]
        for i, req, lab, t in zip(owner, reqs, labels, cut):
            n_c, n_h = lab.count("correct"), lab.count("hallucination")
            out[i]["samples"].append({"text": req.response, "sentences": req.sentences, "labels": lab,
                                      "score": n_c / (n_c + n_h) if n_c + n_h else None, "truncated": t})
        return out

    return run_stage("pairs_label", key, fn, p.stage_dir)


# Scores are ratios of small counts; a gap equal to the margin must not fail by a rounding ulp.
_EPS = 1e-9


def _eligible(hi: dict, lo: dict, margin: float) -> bool:
    gap = hi["score"] - lo["score"]
    return gap > _EPS and gap >= margin - _EPS


def _pair_row(r: dict, hi: dict, lo: dict) -> dict:
    meta = {k: v for k, v in r.items() if k not in ("samples", "prompt", "_row")}
    out = {
        "prompt": r["prompt"], "chosen": hi["text"], "rejected": lo["text"],
        "chosen_sentences": hi["sentences"], "chosen_labels": hi["labels"],
        "rejected_sentences": lo["sentences"], "rejected_labels": lo["labels"],
        "chosen_score": hi["score"], "rejected_score": lo["score"], **meta,
    }
    for side, s in (("chosen", hi), ("rejected", lo)):
        if s.get("truncated"):  # only reached under truncated_responses=no_end_of_turn
            out[f"{side}_truncated"] = True
    return out


def select_pairs(rows: list[dict], p: PairsConfig, seed: int = 0) -> tuple[list[dict], Counter]:
    """Preference pairs from labelled samples; counts why prompts yield no (or fewer) pairs.

    Eligible pair: score gap >= ``min_score_margin`` and > 0 (ties never pair), texts
    differ. ``max_min`` pairs the k-th best with the k-th worst and stops at the first
    ineligible gap (gaps only shrink inward). ``random`` draws pairs one at a time,
    each uniformly among the eligible pairs whose samples are still unused.
    """
    rng = random.Random(seed)
    pairs, why = [], Counter()
    for r in rows:
        scored = [s for s in r["samples"] if s["score"] is not None and s["text"].strip()]
        cands = scored
        if p.truncated_responses == "drop":
            cands = [s for s in scored if not s.get("truncated")]
            why["truncated_samples_dropped"] += len(scored) - len(cands)
        why["truncated_samples"] += sum(bool(s.get("truncated")) for s in r["samples"])
        if len(cands) < 2:
            why["fewer_than_2_scored_samples"] += 1
            continue
        if p.pair_selector == "max_min":
            cands = sorted(cands, key=lambda s: s["score"], reverse=True)
            for k in range(min(p.pairs_per_prompt, len(cands) // 2)):
                hi, lo = cands[k], cands[-1 - k]
                if not _eligible(hi, lo, p.min_score_margin):
                    why["score_margin_too_small"] += 1
                    break
                if hi["text"] == lo["text"]:
                    why["identical_texts"] += 1
                    continue
                pairs.append(_pair_row(r, hi, lo))
                why["pairs"] += 1
        else:
            options = [(i, j) for i, a in enumerate(cands) for j, b in enumerate(cands)
                       if _eligible(a, b, p.min_score_margin) and a["text"] != b["text"]]
            if not options:
                why["score_margin_too_small"] += 1
                continue
            used: set[int] = set()
            for _ in range(p.pairs_per_prompt):
                free = [(i, j) for i, j in options if i not in used and j not in used]
                if not free:
                    break
                i, j = free[rng.randrange(len(free))]
                used |= {i, j}
                pairs.append(_pair_row(r, cands[i], cands[j]))
                why["pairs"] += 1
    return pairs, Counter({k: v for k, v in why.items() if v})


def build_pairs(cfg: RunConfig, p: PairsConfig) -> Path:
    """Run the three stages on ``data.train`` (prompts); return the pairs file."""
    samples = stage_sample(cfg, p, cfg.data.train.path)
    labelled = stage_label(cfg, p, samples)
    key = {"labelled": file_digest(labelled), "selector": p.pair_selector, "margin": p.min_score_margin,
           "per_prompt": p.pairs_per_prompt, "truncated": p.truncated_responses, "seed": cfg.seed,
           "code": _code_digest(select_pairs)}

    def fn():
        pairs, why = select_pairs(read_jsonl(labelled), p, cfg.seed)
        log.info("pair selection: %s", dict(why))
        if not pairs:
            raise ValueError(f"no preference pairs could be built from {cfg.data.train.path}: {dict(why)}")
        return pairs, {"pair_selection": dict(why)}

    return run_stage("pairs_select", key, fn, p.stage_dir)


def judge_problems(cfg: RunConfig, p: PairsConfig) -> list[str]:
    """What is wrong with ``method.judge`` (the sentence labeller of prompts mode) for this model,
    found without building it (:func:`alignkit.judges.judge_spec_problems`)."""
    from alignkit.judges.specs import judge_spec_problems

    return judge_spec_problems(p.judge, "method.judge", cfg.model.name_or_path, needs=("label_sentences",))


def check_pairs_config(cfg: RunConfig, p: PairsConfig) -> list[str]:
    """Config-time checks of a recipe that may build its own pairs: the judge, when ``data.train``
    holds prompts (``input: prompts``, or ``auto`` with a readable file of prompts). Annotated
    preference rows never reach the judge, so its default (the world's kb) does not matter then."""
    mode = p.input
    if mode == "auto":
        from alignkit.config.paths import WORLD_VAR

        path = cfg.data.train.path if cfg.data.train is not None else None
        if path is None or WORLD_VAR in path or not Path(path).is_file():
            return []  # decided at run time, before any sampling (resolve_train_pairs)
        try:
            mode = "annotated" if is_preference_file(path) else "prompts"
        except Exception:  # noqa: BLE001 - unreadable rows are reported, with file and row, when loaded
            return []
    return judge_problems(cfg, p) if mode == "prompts" else []


def resolve_train_pairs(cfg: RunConfig, p: PairsConfig) -> None:
    """If ``data.train`` holds prompts, build pairs and point ``data.train`` at them (in place)."""
    mode = p.input
    if mode == "auto":
        mode = "annotated" if is_preference_file(cfg.data.train.path) else "prompts"
    if mode == "prompts":
        problems = judge_problems(cfg, p)
        if problems:  # before sampling: a bad judge spec used to fail only after every sample was drawn
            from alignkit.config import ConfigError

            raise ConfigError("\n".join(problems))
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Sample and judge once: rank 0 builds, the other ranks then hit the stage cache.
            from accelerate import PartialState

            with PartialState().main_process_first():
                path = build_pairs(cfg, p)
        else:
            path = build_pairs(cfg, p)
        # The pairs file has canonical columns, and where / limit / system prompt were applied when sampling.
        cfg.data.train.path = str(path)
        cfg.data.train.where = {}
        cfg.data.train.limit = None
        cfg.data.train.format = "jsonl"
        cfg.data.train.columns = {}
