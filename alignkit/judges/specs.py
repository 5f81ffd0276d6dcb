"""Judge specs (``{backend: ..., **kwargs}`` in a config) checked without building the judge, so
a bad one fails ``alignkit validate`` instead of the run: after sampling, or after training."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from alignkit.config.schema import is_world_model
from alignkit.judges import JUDGE_BACKENDS
from alignkit.judges.hybrid import hybrid_option_problems


def judge_spec_problems(spec: Any, field: str, model_name_or_path: str | None = None,
                        needs: tuple[str, ...] = ()) -> list[str]:
    """Problems of a judge spec found without building it (no model loads), each naming ``field``:
    an unknown backend, keys its constructor does not take (``{backend: hf, model: ...}``), required
    ones missing, the tiny world's ``kb`` judge for a model that is not a ``world:`` model, and
    questions in ``needs`` (``label_sentences``, ``is_harmful``, ...) the backend cannot answer. A
    bad spec used to pass ``alignkit validate`` and fail when the judge was built: after sampling, or
    after training."""
    if not isinstance(spec, Mapping):
        return [f"field '{field}': a judge spec is a mapping with a 'backend' key, got {type(spec).__name__}"]
    backend = spec.get("backend")
    if backend not in JUDGE_BACKENDS:
        return [f"field '{field}.backend': unknown judge backend {backend!r}; valid: {', '.join(sorted(JUDGE_BACKENDS))}"]
    out = []
    if backend == "kb" and model_name_or_path is not None and not is_world_model(model_name_or_path) \
            and not (spec.get("world") or spec.get("world_dir")):
        out.append(f"field '{field}': the 'kb' judge is the tiny world's knowledge base, and model "
                   f"{model_name_or_path!r} is not a world: model; use {{backend: rules}}, {{backend: hf, name_or_path: "
                   f"...}} or {{backend: http, base_url: ..., model: ...}}")
    if backend == "hybrid":
        world = None if model_name_or_path is None else is_world_model(model_name_or_path)
        return out + [f"field '{field}': hybrid judge: {p}" for p in hybrid_option_problems(spec, world)]
    mod, cls = JUDGE_BACKENDS[backend]
    params = inspect.signature(getattr(importlib.import_module(mod), cls)).parameters
    named = {k: p for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    filled_later = {"kb": {"world"}}.get(backend, set())  # build_eval_judge gives the model's world
    unknown = sorted(k for k in spec if k != "backend" and k not in named and not (backend == "kb" and k == "world_dir"))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        hint = "; the model is name_or_path" if backend == "hf" and {"model", "model_path", "path"} & set(unknown) else ""
        out.append(f"field '{field}': judge backend {backend!r} takes no {unknown}{hint}; valid: {', '.join(named)}")
    missing = [k for k, p in named.items() if p.default is p.empty and k not in spec and k not in filled_later]
    if backend == "hf" and not {"name_or_path", "model_or_path"} & set(spec):
        missing.append("name_or_path")
    if missing:
        out.append(f"field '{field}': judge backend {backend!r} needs {missing}")
    if backend == "rules":
        if "label_sentences" in needs:
            out.append(f"field '{field}': the rules judge cannot label sentences (factuality); use an LLM judge "
                       f"({{backend: http, ...}} or {{backend: hf, name_or_path: ...}})")
        if "is_harmful" in needs and not spec.get("harmful_keywords"):
            out.append(f"field '{field}': the rules judge detects harmful compliance only with harmful_keywords")
    return out
