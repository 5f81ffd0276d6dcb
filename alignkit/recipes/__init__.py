"""Recipe registry. One module per recipe; each defines:

* ``Method`` — a strict pydantic schema for the config's ``method`` section;
* ``DATA_KIND`` — the row schema of ``data.train`` (see :mod:`alignkit.data.schemas`);
* ``check_config(cfg, method) -> list[str]`` — impossible combinations, before any load;
* ``train(cfg, callbacks=()) -> Path`` — run it, return the run directory.

Evaluation is shared (:mod:`alignkit.evaluation`), driven by ``eval.datasets``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from alignkit.config import RunConfig, load_run_config

RECIPES: dict[str, str] = {
    "sft": "alignkit.recipes.sft",
    "dpo": "alignkit.recipes.dpo",
    "mask_dpo": "alignkit.recipes.mask_dpo",
    "craft": "alignkit.recipes.craft",
    "ta_sft": "alignkit.recipes.ta_sft",
    "cft": "alignkit.recipes.cft",
    "se_abstention": "alignkit.recipes.se_abstention",
    "balanced_dpo": "alignkit.recipes.balanced_dpo",
}


def get_recipe(name: str) -> ModuleType:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; available: {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[name])


def load_config(path: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Load, override and validate a recipe config, including its ``method`` section (by the
    recipe's ``Method``) and the recipe's ``check_config``: every problem at once, with field
    paths and fixes, before any model loads (:class:`alignkit.config.ConfigError`)."""
    return load_run_config(path, overrides, RECIPES, get_recipe)
