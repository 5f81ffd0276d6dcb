"""Names of transformers' ``TrainingArguments`` fields and LR schedulers, without importing it.

``alignkit validate`` checks ``train.*`` keys against ``TrainingArguments``, but importing
transformers' trainer stack pulls in torch, peft, bitsandbytes and DeepSpeed (seconds,
and their warnings). The names are read from the installed source files with ``ast``
instead: the same names, a few milliseconds. If the source layout ever changes so that
nothing is found, we fall back to the import (slow but correct).
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path


def _transformers_file(module: str) -> Path | None:
    spec = importlib.util.find_spec("transformers")  # locates the package; does not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / f"{module}.py"
    return path if path.exists() else None


def _class_body(path: Path | None, name: str) -> list[ast.stmt]:
    if path is None:
        return []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node.body
    return []


@lru_cache(maxsize=1)
def training_argument_names() -> frozenset[str]:
    """Dataclass field names of ``transformers.TrainingArguments``."""
    body = _class_body(_transformers_file("training_args"), "TrainingArguments")
    names = {s.target.id for s in body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
             and not s.target.id.startswith("_")}
    if "learning_rate" in names and "output_dir" in names:
        return frozenset(names)
    import dataclasses

    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


@lru_cache(maxsize=1)
def scheduler_names() -> tuple[str, ...]:
    """Values of ``transformers.SchedulerType`` (``lr_scheduler_type`` choices)."""
    body = _class_body(_transformers_file("trainer_utils"), "SchedulerType")
    names = [s.value.value for s in body if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)
             and isinstance(s.value.value, str)]
    if "linear" in names and "cosine" in names:
        return tuple(names)
    from transformers import SchedulerType

    return tuple(x.value for x in SchedulerType)
