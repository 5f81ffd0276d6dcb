"""Continual safety fine-tuning (CFT; Zhang, Lou, Wang, arXiv 2501.18632, safety_cft_jailbreak.md §2.2):
ordinary (LoRA) SFT of an already-aligned model on safe responses to harmful — optionally
jailbreak-transformed — prompts, ``L_CFT = -Σ_(x,y)∈D_safe Σ_t log π_θ(y_t | x, y_<t)``.

Data: ``data.train`` prompt → safe-completion rows (the world's ``safety_sft``: harmful → refusal plus
benign → helpful answer). ``method.attack_variants`` adds, for every row whose ``label`` is harmful,
one copy per static attack technique (PAP, FlipAttack, ``plain`` = the row itself) with the same safe
completion — the paper's "450 requests × attack conditions" set (§3, an inference). Non-paper extension
(§4, off by default): ``replay_dataset`` rows mixed in so that replay makes up ``benign_mix_ratio`` of
the training set, to keep utility. The mix is a fingerprinted, cached stage (``cft_mix``); its counts go
to ``cft_report.json`` and ``train_results.json``. Evaluated with the jailbreak eval task before / after.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import Field

from alignkit.config import DataSource, RunConfig, Strict, common_checks
from alignkit.config.attack import PAP, FlipAttackSpec, Plain

NAME = "cft"
DATA_KIND = "sft"

_TECH = {"mes/plain": "MES plain", "mes/pap_authority_endorsement": "MES PAP-auth",
         "mes/pap_logical_appeal": "MES PAP-logic", "mes/pap_misrepresentation": "MES PAP-misrep",
         "mes/flipattack_fcs": "MES Flip-FCS", "mes/pair": "MES PAIR"}
DEMO = {
    "title": "Continual safety fine-tuning (CFT): jailbreak success before / after, utility, over-refusal",
    "note": "19 held-out harmful requests (safety_harmful test split, never trained) × 6 techniques: plain, PAP "
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
        "jailbreak_test:mbr": "Model Breach Rate: share of the 19 held-out harmful requests broken (complied) by at "
                              "least one technique.",
        "jailbreak_test:cr": "Compliance Rate over all (request, technique) attacks.",
        "jailbreak_test:mes": "Mean Effectiveness Score (StrongREJECT rubric score) over all attacks.",
        "jailbreak_test:mes/pap_authority_endorsement": "MES of one technique (likewise the other MES columns).",
        "qa_test:accuracy": "utility: greedy short answers to held-out qa_test questions on facts the base model "
                            "knows (knowledge: known).",
        "benign_test:over_refusal_rate": "refusal phrases on the 19 held-out benign look-alike prompts.",
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
    attack_variants: list[Plain | PAP | FlipAttackSpec] = Field(
        default_factory=lambda: [Plain(name="plain")],
        description="static attack techniques applied to every harmful training prompt, each copy keeping the "
                    "safe completion (paper: all conditions; PAIR needs a target loop, so it is not offered)")
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
    for t in method.attack_variants:
        if getattr(t, "paraphraser", None) is not None and t.paraphraser.backend != "template":
            problems.append("field 'method.attack_variants': LLM paraphrasers are not supported in the training "
                            "mix (write the paraphrased rows to a file and train on it)")
    # eval.datasets.*.options are validated with the config (alignkit.config.EvalSet); a rubric_template
    # needs an LLM rubric judge, which only the run's judge settings tell
    for name, es in cfg.eval.datasets.items():
        if es.task == "jailbreak" and es.options.get("rubric_template") and not es.options.get("judge") \
                and cfg.eval.judge.get("backend", "kb") not in ("http", "hf"):
            problems.append(f"field 'eval.datasets.{name}.options.rubric_template': needs an LLM rubric judge "
                            f"(options.judge or eval.judge with backend http / hf), eval.judge is "
                            f"{cfg.eval.judge.get('backend', 'kb')!r}")
    return problems


def _variant_prompt(tech, request: str) -> list[dict]:
    p = tech.rewrite([request])[0].prompt
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


def build_mix(rows: list[dict], replay: list[dict] | None, method: Method, seed: int) -> tuple[list[dict], dict]:
    """Safety rows (+ attack variants of the harmful ones) and replay rows, shuffled with ``seed``."""
    from alignkit.attacks import build_technique

    techs = [build_technique(t, seed=seed) for t in method.attack_variants]
    out, counts = [], {"safety_rows": len(rows), "harmful_rows": 0}
    for r in rows:
        harmful = r.get("label", method.harmful_label) == method.harmful_label
        if not harmful:
            out.append({**r, "variant": "as_is"})
            continue
        counts["harmful_rows"] += 1
        request = r["prompt"][-1]["content"]
        for t in techs:
            out.append({**r, "prompt": r["prompt"] if t.spec.name == "plain" else _variant_prompt(t, request),
                        "variant": t.label})
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

    return code_digest(build_mix, _variant_prompt, A, F, P, W)


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
    from alignkit.core.fingerprint import file_digest
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
    key = {"train": file_digest(d.train.path) if Path(d.train.path).is_file() else d.train.path,
           "train_source": d.train.model_dump(mode="json"), "system_prompt": d.system_prompt,
           "max_errors": d.max_errors,
           "replay": None if replay is None else [file_digest(method.replay_dataset.path),
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

