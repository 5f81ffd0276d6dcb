"""Direct Preference Optimization (Rafailov et al. 2023) — the response-level baseline.

Same trainer and, given prompts, the same self-sampled pairs as Mask-DPO
(:mod:`alignkit.stages.pairs`), with every completion token weighted 1 — so the two differ
only in their masks, the comparison of Mask-DPO's Table 2 (68.44 vs 77.53).
"""

from __future__ import annotations

from pathlib import Path

from alignkit.config import PreferenceOptions, RunConfig, preference_checks
from alignkit.stages.pairs import PairsConfig, check_pairs_config, resolve_train_pairs

NAME = "dpo"
DATA_KIND = "preference"


class Method(PairsConfig, PreferenceOptions):
    pass


def check_config(cfg: RunConfig, method: Method) -> list[str]:
    return preference_checks(cfg, method) + check_pairs_config(cfg, method)


def train(cfg: RunConfig, callbacks=()) -> Path:
    from alignkit.config.paths import expand_config
    from alignkit.evaluation import evaluate_after_training
    from alignkit.training.preference import train_preference
    from alignkit.training.rundir import load_train_rows

    method = Method.model_validate(cfg.method)
    expand_config(cfg)
    resolve_train_pairs(cfg, method)
    # Plain DPO never reads sentence annotations, so broken ones must not stop it.
    rows, eval_rows = load_train_rows(cfg, DATA_KIND, on_span_error="ignore")
    return train_preference(cfg, method, rows, eval_rows, None, callbacks, evaluate=evaluate_after_training)
