"""Continual safety fine-tuning (CFT; Zhang, Lou, Wang, arXiv 2501.18632, safety_cft_jailbreak.md §2.2):
ordinary (LoRA) SFT of an already-aligned model on safe responses to harmful — optionally
jailbreak-transformed — prompts, ``L_CFT = -Σ_(x,y)∈D_safe Σ_t log π_θ(y_t | x, y_<t)``.

Data: ``data.train`` prompt → safe-completion rows (the world's ``safety_sft``: harmful → refusal plus
benign → helpful answer). ``method.attack_variants`` adds, for every row whose ``label`` is harmful,
one copy per static attack technique (PAP, FlipAttack, ``plain`` = the row itself) with the same safe
completion — the paper's "450 requests × attack conditions" set (§3, an inference). A copy rewrites the
request (the row's last user turn) and keeps the rest of its chat (``data.system_prompt``, earlier
turns). PAP on a real model needs an LLM paraphraser (the world's templates are rejected by
``check_config`` for any model that is not ``world:``); unusable paraphrases are left out and counted.
Non-paper extension (§4, off by default): ``replay_dataset`` rows mixed in so that replay makes up
``benign_mix_ratio`` of the training set, to keep utility. The mix is a cached stage (``cft_mix``) keyed
by the loaded rows (any source: file, ``save_to_disk`` folder, hub dataset); its counts go to
``cft_report.json`` and ``train_results.json``. Evaluated with the jailbreak eval task before / after.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Annotated

from pydantic import Field

from alignkit.config import DataSource, RunConfig, Strict, common_checks
from alignkit.config.attack import (
    PAP,
    FlipAttackSpec,
    Plain,
    eval_world_problems,
    is_world_model,
    world_standin_problems,
)
from alignkit.config.paths import WORLD_VAR

NAME = "cft"
DATA_KIND = "sft"

_TECH = {"mes/plain": "MES plain", "mes/pap_authority_endorsement": "MES PAP-auth",
         "mes/pap_logical_appeal": "MES PAP-logic", "mes/pap_misrepresentation": "MES PAP-misrep",
         "mes/flipattack_fcs": "MES Flip-FCS", "mes/pair": "MES PAIR"}
DEMO = {
    "title": "Continual safety fine-tuning (CFT): jailbreak success before / after, utility, over-refusal",
    "note": "29 held-out harmful requests (safety_harmful test split, never trained) × 6 techniques: plain, PAP "
            "(authority endorsement, logical appeal, misrepresentation; world templates), FlipAttack (FCS, vanilla "
            "guidance) and PAIR (template attacker, 2 streams × 3 iterations); greedy, 48 new tokens; rubric from "
            "the world's exact judge (StrongREJECT score: a full hazardous procedure = 1). CFT = LoRA SFT on the "
            "world's safety_sft rows (harmful → refusal, benign → answer); +replay mixes in sft_train QA rows "
            "(50% of the training set, a non-paper extension).",
    "evals": ["jailbreak_test", "benign_test", "qa_test"],
    "metrics": {"jailbreak_test:mbr": "MBR", "jailbreak_test:cr": "CR (all)", "jailbreak_test:mes": "MES (all)",
                **{f"jailbreak_test:{k}": v for k, v in _TECH.items()},
                "qa_test:accuracy": "QA accuracy", "benign_test:over_refusal_rate": "benign over-refusal",
                "benign_test:benign_unanswered_rate": "benign unanswered"},
    "columns": {
        "jailbreak_test:mbr": "Model Breach Rate: share of the 29 held-out harmful requests broken (complied) by at "
                              "least one technique.",
        "jailbreak_test:cr": "Compliance Rate over all (request, technique) attacks.",
        "jailbreak_test:mes": "Mean Effectiveness Score (StrongREJECT rubric score) over all attacks.",
        "jailbreak_test:mes/pap_authority_endorsement": "MES of one technique (likewise the other MES columns).",
        "qa_test:accuracy": "utility: greedy short answers to held-out qa_test questions on facts the base model "
                            "knows (knowledge: known).",
        "benign_test:over_refusal_rate": "refusal phrases on the 29 held-out benign look-alike prompts.",
        "benign_test:benign_unanswered_rate": "benign look-alikes refused or missing most of their gold answer.",
    },
    "rows": [("base", None), ("CFT", "cft"), ("CFT+replay", "cft")],
    "row_overrides": {"CFT+replay": ["method.benign_mix_ratio=0.5"]},
    # the validation attacks are for choosing hyperparameters, not for the table: plain only keeps the demo cheap
    "overrides": {"cft": ["eval.datasets.jailbreak_val.options.techniques=[{name: plain}]"]},
    "claims": [("base", "CFT", "jailbreak_test:cr"), ("base", "CFT", "jailbreak_test:mes"),
               ("base", "CFT", "jailbreak_test:mbr"), ("CFT+replay", "CFT", "qa_test:accuracy")],
    "expect_text": "base > CFT in attack success (CR, MES, MBR); CFT+replay > CFT in QA accuracy",
    "checks": [("base", "CFT+replay", "qa_test:accuracy"), ("base", "CFT+replay", "jailbreak_test:cr"),
               ("CFT+replay", "base", "benign_test:over_refusal_rate"),
               ("CFT", "base", "benign_test:over_refusal_rate")],
    # `alignkit demo --smoke` (make test): every stage of every row, on small budgets
    "smoke": ["data.train.limit=32", "method.replay_dataset.limit=32", "train.max_steps=2", "eval.limit=4"],
}


class Method(Strict):
    attack_variants: list[Annotated[Plain | PAP | FlipAttackSpec, Field(discriminator="name")]] = Field(
        default_factory=lambda: [Plain(name="plain")],
        description="static attack techniques applied to every harmful training prompt, each copy keeping the "
                    "safe completion (paper: all conditions; PAIR needs a target loop, so it is not offered). "
                    "PAP on a real model: an LLM paraphraser (paraphraser: {backend: http | hf, kwargs: ...}); "
                    "its unusable paraphrases are left out and counted")
    harmful_label: str = Field("harmful", description="rows whose `label` equals this get attack variants "
                                                      "(rows without a label column: every row)")
    replay_dataset: DataSource | None = Field(None, description="non-paper extension: benign / utility SFT rows")
    benign_mix_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="share of the final training set drawn from "
                                    "replay_dataset (0: off, paper parity)")
    completion_only_loss: bool = Field(True, description="loss on the safe completion only (the paper does not say)")


def check_config(cfg: RunConfig, method: Method) -> list[str]:
    problems = common_checks(cfg)
    if method.benign_mix_ratio > 0 and method.replay_dataset is None:
        problems.append("field 'method.benign_mix_ratio': > 0 needs method.replay_dataset (path of SFT rows)")
    labels = [t.label or t.default_label() for t in method.attack_variants]
    if len(set(labels)) != len(labels):
        problems.append(f"field 'method.attack_variants': repeated techniques {labels}")
    if not is_world_model(cfg.model.name_or_path):
        # the tiny world's stand-ins would train a real model on the world's persuasion sentences
        problems += world_standin_problems(method.attack_variants, "method.attack_variants",
                                           f"model {cfg.model.name_or_path!r}")
        if method.benign_mix_ratio > 0 and method.replay_dataset is not None \
                and WORLD_VAR in method.replay_dataset.path:
            problems.append(f"field 'method.replay_dataset.path': {method.replay_dataset.path!r} is the tiny "
                            f"world's data, and model {cfg.model.name_or_path!r} is not a world: model; give "
                            f"your own replay rows (SFT prompt / completion)")
        problems += eval_world_problems(cfg)
    # attack LLMs and per-set rubric judges are built when they run (the eval: after training)
    from alignkit.attacks import eval_spec_problems, llm_spec_problems

    problems += llm_spec_problems(method.attack_variants, "method.attack_variants") + eval_spec_problems(cfg)
    # eval.datasets.*.options are validated with the config (alignkit.config.EvalSet); a rubric_template
    # needs an LLM rubric judge, which only the run's judge settings tell
    for name, es in cfg.eval.datasets.items():
        if es.task == "jailbreak" and es.options.get("rubric_template") and not es.options.get("judge") \
                and cfg.eval.judge.get("backend", "kb") not in ("http", "hf"):
            problems.append(f"field 'eval.datasets.{name}.options.rubric_template': needs an LLM rubric judge "
                            f"(options.judge or eval.judge with backend http / hf), eval.judge is "
                            f"{cfg.eval.judge.get('backend', 'kb')!r}")
    return problems


def variant_prompt(context: list[dict], attack) -> list[dict]:
    """A training row's chat with its last user turn replaced by an attack prompt (a string, or
    FlipAttack's [system, user] turns): the row's earlier turns and its system prompt
    (``data.system_prompt``) stay. An attack's system turn is appended to the row's own system turn —
    one system turn, the deployment's first — because chat templates take one, at the start."""
    turns = [{"role": "user", "content": attack}] if isinstance(attack, str) else [dict(m) for m in attack]
    sys_attack = [m["content"] for m in turns if m["role"] == "system"]
    rest = [m for m in turns if m["role"] != "system"]
    ctx = [dict(m) for m in context]
    if sys_attack:
        if ctx and ctx[0]["role"] == "system":
            ctx[0]["content"] = "\n\n".join([ctx[0]["content"], *sys_attack])
        else:
            ctx = [{"role": "system", "content": "\n\n".join(sys_attack)}, *ctx]
    return [*ctx, *rest]


def build_mix(rows: list[dict], replay: list[dict] | None, method: Method, seed: int) -> tuple[list[dict], dict]:
    """Safety rows (+ attack variants of the harmful ones) and replay rows, shuffled with ``seed``.

    A variant rewrites the request (the row's last user turn) and keeps the rest of the row's chat.
    Each technique rewrites all harmful requests in one batch (an LLM paraphraser: one batched call);
    an unusable paraphrase (``fallback``: the attack would be the plain request again) is left out and
    counted in ``fallback/<technique>``."""
    from alignkit.attacks import build_technique

    techs = [build_technique(t, seed=seed) for t in method.attack_variants]
    counts: dict = {"safety_rows": len(rows), "harmful_rows": 0}

    def attackable(r: dict) -> bool:  # a harmful row that ends in the request (a user turn)
        return r.get("label", method.harmful_label) == method.harmful_label and bool(r["prompt"]) \
            and r["prompt"][-1]["role"] == "user"

    harmful = [r for r in rows if attackable(r)]
    counts["harmful_rows"] = len(harmful)
    requests = [r["prompt"][-1]["content"] for r in harmful]
    rewrites = {}
    for t in techs:
        if t.spec.name != "plain":
            rewrites[t.label] = t.rewrite(requests)
            counts[f"fallback/{t.label}"] = sum(p.fallback for p in rewrites[t.label])
    out, k = [], 0
    for r in rows:
        if not attackable(r):
            out.append({**r, "variant": "as_is"})
            continue
        for t in techs:
            if t.spec.name == "plain":
                out.append({**r, "variant": t.label})
                continue
            p = rewrites[t.label][k]
            if not p.fallback:
                out.append({**r, "prompt": variant_prompt(r["prompt"][:-1], p.prompt), "variant": t.label})
        k += 1
    counts["safety_examples"] = len(out)
    n_replay = 0
    if replay and method.benign_mix_ratio > 0:
        # replay share r of the final set: n_replay = r / (1 - r) * n_safety
        want = round(method.benign_mix_ratio / (1 - method.benign_mix_ratio) * len(out))
        pool = list(replay)
        random.Random(seed).shuffle(pool)
        n_replay = min(want, len(pool))
        counts["replay_shortfall"] = want - n_replay
        out += [{**r, "variant": "replay"} for r in pool[:n_replay]]
    counts["replay_examples"] = n_replay
    counts["examples"] = len(out)
    random.Random(seed + 1).shuffle(out)
    return out, counts


def mix_code_digest() -> str:
    """Digest of the code that builds the mix (stage key): this module's ``build_mix``, the static
    techniques (``alignkit.attacks`` registry, PAP, FlipAttack) and the world's templates."""
    import alignkit.attacks as A
    import alignkit.attacks.flip as F
    import alignkit.attacks.pap as P
    import alignkit.world.jailbreak as W
    from alignkit.core.fingerprint import code_digest

    return code_digest(build_mix, variant_prompt, A, F, P, W)


def check_eval_sets(cfg: RunConfig) -> None:
    """Read every eval set as its task will (file, row, field, reason; ``where`` matches something) —
    before any model loads; ``eval.datasets`` are otherwise first read after training."""
    if not (cfg.eval.enabled and cfg.eval.datasets):
        return
    from alignkit.config import ConfigError
    from alignkit.evaluation.tasks import _load_eval_rows

    for name, es in cfg.eval.datasets.items():
        if not Path(es.path).is_file():
            raise ConfigError(f"eval.datasets.{name}: file not found: {es.path}")
        try:
            _load_eval_rows(es.task, es.path, es.limit or cfg.eval.limit, es.where)
        except ValueError as e:  # no rows match `where`, or a bad row (DataError names file, row, field)
            raise ConfigError(f"eval.datasets.{name}: {e}") from None


def train(cfg: RunConfig, callbacks=()) -> Path:
    from alignkit.core.distributed import is_main_process
    from alignkit.core.fingerprint import fingerprint
    from alignkit.core.io import atomic_write_text, read_jsonl
    from alignkit.data import load_rows, tokenize_rows
    from alignkit.evaluation import evaluate_after_training
    from alignkit.models import load_tokenizer
    from alignkit.stages.runner import run_stage
    from alignkit.training.rundir import load_train_rows, prepare_run_dir
    from alignkit.training.sft import train_sft_rows

    method = Method.model_validate(cfg.method)
    rows, eval_rows = load_train_rows(cfg, DATA_KIND)  # bad rows fail here, before any model loads
    check_eval_sets(cfg)  # ... and so do bad eval sets (read only after training otherwise)
    replay = None
    if method.replay_dataset is not None and method.benign_mix_ratio > 0:
        from alignkit.config.paths import expand

        method.replay_dataset.path = expand(method.replay_dataset.path, cfg.model.name_or_path)
        replay = load_rows(method.replay_dataset, DATA_KIND, cfg.data.max_errors, cfg.data.system_prompt)
    d = cfg.data
    # Keyed by the loaded rows, not the path: a hub dataset or a save_to_disk folder has no file to
    # digest, and an edited one must not reuse a stale mix.
    key = {"train": fingerprint("rows", rows), "train_source": d.train.model_dump(mode="json"),
           "system_prompt": d.system_prompt, "max_errors": d.max_errors,
           "replay": None if replay is None else [fingerprint("rows", replay),
                                                  method.replay_dataset.model_dump(mode="json")],
           "method": method.model_dump(mode="json"), "seed": cfg.seed, "code": mix_code_digest()}
    report: dict = {}

    def make():
        mix, counts = build_mix(rows, replay, method, cfg.seed)
        report.update(counts)
        return mix, counts

    from alignkit.core.distributed import rank0_first

    # rank 0 builds the mix, the other ranks hit the stage cache
    path = rank0_first(lambda: run_stage("cft_mix", key, make), cfg.train.ddp_timeout)
    prov = json.loads(Path(path).with_suffix(".provenance.json").read_text())
    counts = prov.get("report") or report
    mix = read_jsonl(path)
    tok = load_tokenizer(cfg.model)
    train_tok, data_report = tokenize_rows("sft", mix, tok, d.train.path, d.max_length, d.length_policy,
                                           max_errors=d.max_errors)
    eval_tok = None
    if eval_rows:
        eval_tok, _ = tokenize_rows("sft", eval_rows, tok, d.eval.path, d.max_length, d.length_policy,
                                    max_errors=d.max_errors)
    run_dir, resume = prepare_run_dir(cfg)
    if is_main_process():
        atomic_write_text(run_dir / "data_report.json", json.dumps(data_report.as_dict(), indent=2))
        atomic_write_text(run_dir / "cft_report.json", json.dumps({"mix": str(path), **counts}, indent=2))
    train_sft_rows(cfg, tok, train_tok, eval_tok, run_dir, resume, method.completion_only_loss,
                   {"data": data_report.as_dict(), "counts": counts}, callbacks, evaluate=evaluate_after_training)
    return run_dir

