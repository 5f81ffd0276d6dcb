"""Judges: one small protocol (:mod:`alignkit.judges.base`), several backends.

``build_judge({"backend": "rules", ...kwargs})`` builds one from a config dict.
Backends are imported lazily, so using the rules judge never imports torch and
using the HTTP judge never loads transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from alignkit.judges.base import SENTENCE_LABELS, Judge, JudgeRequest

# backend name -> (module, class)
JUDGE_BACKENDS: dict[str, tuple[str, str]] = {
    "kb": ("alignkit.judges.kb", "KBJudge"),
    "rules": ("alignkit.judges.rules", "RulesJudge"),
    "hf": ("alignkit.judges.hf", "HFJudge"),
    "http": ("alignkit.judges.http", "HTTPJudge"),
    "hybrid": ("alignkit.judges.hybrid", "HybridJudge"),
}

_LAZY = {cls: mod for mod, cls in JUDGE_BACKENDS.values()} | {"HTTPJudgeError": "alignkit.judges.http"}

__all__ = ["JUDGE_BACKENDS", "SENTENCE_LABELS", "Judge", "JudgeRequest", "build_eval_judge", "build_judge",
           *sorted(_LAZY)]


def build_judge(spec: Mapping[str, Any]) -> Judge:
    """Build a judge from ``{"backend": "kb"|"rules"|"hf"|"http", **constructor kwargs}``.

    Raises ``ValueError`` naming the valid backends for an unknown or missing backend,
    and naming the backend for constructor arguments it does not take.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"judge spec must be a mapping with a 'backend' key, got {type(spec).__name__}")
    kwargs = dict(spec)
    backend = kwargs.pop("backend", None)
    if backend not in JUDGE_BACKENDS:
        raise ValueError(
            f"unknown judge backend {backend!r}; valid backends: {', '.join(sorted(JUDGE_BACKENDS))}"
        )
    module, cls_name = JUDGE_BACKENDS[backend]
    cls = getattr(importlib.import_module(module), cls_name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        # Bad keys in a config are a config error; name the backend so the fix is obvious.
        raise ValueError(f"judge backend {backend!r}: {e}") from e


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_eval_judge(judge_spec: dict, model_name_or_path: str) -> Judge:
    spec = dict(judge_spec)
    if spec.get("backend", "kb") == "kb" and not spec.get("world_dir"):
        from alignkit.config.schema import is_world_model

        if not is_world_model(model_name_or_path):
            # the last line of defence (configs are checked by config.schema.world_only_problems):
            # never judge a real model against the tiny world's knowledge base
            raise ValueError(f"judge backend 'kb' is the tiny world's knowledge base, and model "
                             f"{model_name_or_path!r} is not a world: model; configure a judge of your own "
                             f"(rules, hf, http, hybrid)")
    if spec.get("backend", "kb") == "kb":
        from alignkit.config.paths import world_uri
        from alignkit.judges.kb import KBJudge
        from alignkit.world import world_dir_for_uri

        return KBJudge(spec.get("world_dir") or world_dir_for_uri(world_uri(model_name_or_path)))
    if spec.get("backend") == "hybrid" and isinstance(spec.get("llm"), dict) \
            and spec["llm"].get("backend") == "kb" and not spec["llm"].get("world"):
        from alignkit.config.paths import world_uri
        from alignkit.world import world_dir_for_uri

        # the hybrid judge's exact tiny-world vote: the world the model comes from
        spec["llm"] = {**spec["llm"], "world": spec["llm"].get("world_dir")
                       or str(world_dir_for_uri(world_uri(model_name_or_path)))}
        spec["llm"].pop("world_dir", None)
    from alignkit.judges import build_judge

    return build_judge(spec)
