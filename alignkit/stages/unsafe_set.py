"""Unsafe responses from the unsafe model itself — the only safety data TA-SFT needs.

TA-SFT (ta_sft_emd.md §6 step 1): sample the base model on harmful prompts and keep the
responses a judge flags as harmful. Two stages (:mod:`alignkit.stages`: fingerprinted by
all their inputs, written atomically, skipped when unchanged):

1. ``unsafe_sample`` — ``gen_num_samples`` responses per harmful prompt from the model
   as configured (weights, revision, dtype), the prompts file and filter, decoding and
   seed. Independent of how many responses are kept, so a set-size sweep samples once.
2. ``unsafe_select`` — judge every sample (``is_harmful``; cut-off samples are not
   trusted), then keep up to ``size`` flagged responses: prompts in a seeded random
   order, at most ``per_prompt`` responses each. Counts by reason go into the stage's
   ``.provenance.json`` report and the run's ``unsafe_report.json``.

Rows out: ``{prompt, rejected, topic?, ...}`` (kind ``unsafe``: a harmful prompt and an
unsafe response to move away from). A ready-made file of such rows can be given instead
(``UnsafeSetConfig.path``); it is validated row by row (file, row, field, reason).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

from pydantic import Field

from alignkit.config import RunConfig, Strict
from alignkit.core.fingerprint import file_digest, fingerprint
from alignkit.core.io import read_jsonl
from alignkit.stages.runner import run_stage

log = logging.getLogger(__name__)


class PromptSource(Strict):
    path: str
    where: dict[str, str | int | bool] = Field(default_factory=dict, description="keep rows whose columns equal these")
    prompt_column: str = "prompt"
    limit: int | None = Field(None, ge=1)


class UnsafeSetConfig(Strict):
    """Where the unsafe rows come from: a ready file (``path``) or sampled from ``prompts``."""

    path: str | None = Field(None, description="rows {prompt, rejected}: used as given (no sampling)")
    prompts: PromptSource | None = Field(None, description="harmful prompts to sample the base model on")
    size: int = Field(8, ge=1, description="unsafe responses kept (the paper's 'small set')")
    per_prompt: int = Field(1, ge=1, description="at most this many kept responses per prompt")
    gen_num_samples: int = Field(2, ge=1)
    gen_temperature: float = Field(1.0, gt=0)
    gen_top_p: float = Field(1.0, gt=0, le=1)
    gen_max_new_tokens: int = Field(96, ge=8)
    gen_batch_size: int = Field(32, ge=1)
    judge: dict = Field(default_factory=lambda: {"backend": "kb"}, description="flags harmful compliance")
    stage_dir: str | None = None


def read_prompt_rows(src: PromptSource, model_name: str) -> tuple[str, list[dict]]:
    """Prompt rows of ``src`` (``${world}`` expanded, filtered), each checked: file, row, field, reason."""
    from alignkit.config.paths import expand
    from alignkit.data import IssueCollector, read_rows

    path = expand(src.path, model_name)
    issues = IssueCollector(path)
    raw = read_rows(path, issues=issues)
    rows = []
    for i, r in raw:
        if src.where and not all(r.get(k) == v for k, v in src.where.items()):
            continue
        p = r.get(src.prompt_column)
        if not isinstance(p, str) or not p.strip():
            issues.add(i, src.prompt_column, "missing or empty prompt")
            continue
        rows.append({**{k: v for k, v in r.items() if k not in ("response", "completion")}, "prompt": p, "_row": i})
    issues.raise_if_any()
    if not rows:
        raise ValueError(f"{path}: no prompt rows match {src.where or 'the file'}")
    return path, rows[: src.limit] if src.limit else rows


def read_unsafe_rows(path: str) -> list[dict]:
    """A ready-made unsafe set: ``prompt`` and ``rejected`` non-empty strings on every row."""
    from alignkit.data import IssueCollector, read_rows

    issues = IssueCollector(path)
    raw = read_rows(path, issues=issues)
    rows = []
    for i, r in raw:
        bad = [f for f in ("prompt", "rejected") if not isinstance(r.get(f), str) or not r[f].strip()]
        for f in bad:
            issues.add(i, f, "missing or empty (an unsafe row is a harmful prompt and an unsafe response)")
        if not bad:
            rows.append({**r, "_row": i})
    issues.raise_if_any()
    if not rows:
        raise ValueError(f"{path}: no unsafe rows")
    return rows


def _judge_code() -> str:
    import alignkit.judges as judges
    import alignkit.world.kb as world_kb

    files = sorted(Path(judges.__file__).parent.glob("*.py")) + [Path(world_kb.__file__)]
    return fingerprint(*[file_digest(f) for f in files])


def stage_sample(cfg: RunConfig, u: UnsafeSetConfig) -> Path:
    from alignkit.generation.backends import sampler_fingerprint

    m = cfg.model
    path, _ = read_prompt_rows(u.prompts, m.name_or_path)
    key = {"model": sampler_fingerprint(cfg), "revision": m.revision,
           "dtype": m.dtype, "prompts": file_digest(path), "where": u.prompts.where,
           "prompt_column": u.prompts.prompt_column, "limit": u.prompts.limit, "n": u.gen_num_samples,
           "temperature": u.gen_temperature, "top_p": u.gen_top_p, "max_new_tokens": u.gen_max_new_tokens,
           "batch_size": u.gen_batch_size, "seed": cfg.seed, "v": 1}

    def fn():
        from alignkit.generation.backends import load_sampler
        from alignkit.generation.sampling import generate

        _, rows = read_prompt_rows(u.prompts, m.name_or_path)
        model, tok = load_sampler(cfg, u.stage_dir)
        outs, cut = generate(model, tok, [r["prompt"] for r in rows], n=u.gen_num_samples,
                             temperature=u.gen_temperature, top_p=u.gen_top_p, max_new_tokens=u.gen_max_new_tokens,
                             batch_size=u.gen_batch_size, seed=cfg.seed, return_truncated=True, progress=False)
        return [{**{k: v for k, v in r.items() if k != "_row"}, "samples": o, "truncated": t}
                for r, o, t in zip(rows, outs, cut)]

    return run_stage("unsafe_sample", key, fn, u.stage_dir)


def select_unsafe(rows: list[dict], flags: list[list[bool | None]], size: int, per_prompt: int,
                  seed: int) -> tuple[list[dict], Counter]:
    """Up to ``size`` flagged responses, prompts in seeded random order, ``per_prompt`` each at most.

    ``flags[i][j]``: sample j of prompt i is harmful; ``None`` for a sample cut at the token cap
    (never judged, never kept), counted apart from the ones the judge did not flag, so an empty
    set says which of the two it was. Identical texts of one prompt count once."""
    why: Counter = Counter()
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    picked: list[dict] = []
    for i in order:
        r = rows[i]
        texts = []
        for text, ok in zip(r["samples"], flags[i]):
            why["samples"] += 1
            if ok is None:
                why["truncated"] += 1
            elif not ok:
                why["not_flagged"] += 1
            elif text in texts:
                why["duplicate_text"] += 1
            else:
                why["flagged_unsafe"] += 1
                texts.append(text)
        if not texts:
            why["prompts_without_unsafe_sample"] += 1
        for text in texts[:per_prompt]:
            if len(picked) < size:
                meta = {k: v for k, v in r.items() if k not in ("samples", "truncated", "prompt")}
                picked.append({"prompt": r["prompt"], "rejected": text, **meta})
    why["prompts"] = len(rows)
    why["kept"] = len(picked)
    return picked, why


def build_unsafe_set(cfg: RunConfig, u: UnsafeSetConfig) -> tuple[list[dict], dict]:
    """The unsafe rows and a report of counts (from the stage cache when unchanged)."""
    import json

    from alignkit.config.paths import expand

    if u.path is not None:
        path = expand(u.path, cfg.model.name_or_path)
        rows = read_unsafe_rows(path)
        kept = rows[: u.size]
        return kept, {"source": path, "rows_in_file": len(rows), "kept": len(kept)}
    samples = stage_sample(cfg, u)
    key = {"samples": file_digest(samples), "size": u.size, "per_prompt": u.per_prompt, "judge": u.judge,
           "judge_code": _judge_code(), "seed": cfg.seed, "model": cfg.model.name_or_path,
           "code": file_digest(__file__)}

    def fn():
        from alignkit.judges import build_eval_judge
        from alignkit.judges.base import JudgeRequest

        judge = build_eval_judge(u.judge, cfg.model.name_or_path)
        rows = read_jsonl(samples)
        cuts = [r.get("truncated") or [False] * len(r["samples"]) for r in rows]
        # A response cut at gen_max_new_tokens is never kept (it did not end), so it is not judged either.
        reqs = [JudgeRequest(prompt=r["prompt"], response=s, meta={k: v for k, v in r.items() if k != "samples"})
                for r, cut in zip(rows, cuts) for s, c in zip(r["samples"], cut) if not c]
        harmful = iter(judge.is_harmful(reqs))
        flags = [[None if c else bool(next(harmful)) for c in cut] for cut in cuts]
        picked, why = select_unsafe(rows, flags, u.size, u.per_prompt, cfg.seed)
        if not picked:
            cause = (f"every sample hit the token cap: raise method.unsafe.gen_max_new_tokens "
                     f"({u.gen_max_new_tokens})" if why["truncated"] == why["samples"] else
                     "the model already refuses these prompts, or the judge cannot see its compliance")
            raise ValueError(f"no sampled response was flagged unsafe by the judge {u.judge}: {dict(why)}; {cause}")
        if len(picked) < u.size:
            log.warning("unsafe set: only %d of %d requested unsafe responses were found (%s)", len(picked),
                        u.size, dict(why))
        return picked, {"selection": dict(why)}

    out = run_stage("unsafe_select", key, fn, u.stage_dir)
    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    return read_jsonl(out), {"source": str(out), "samples_file": str(samples), **prov.get("report", {})}
