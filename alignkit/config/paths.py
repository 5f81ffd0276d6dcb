"""``${world}`` in data paths: the directory of the tiny world the model comes from.

Shipped recipes train on ``world:tiny`` and read its datasets, e.g.
``data.train.path: ${world}/data/sft_train.jsonl``; ``model.name_or_path:
world:tiny?seed=3`` switches both model and data to that world.
"""

from __future__ import annotations

WORLD_VAR = "${world}"

# Model names alignkit resolves itself (alignkit.models.resolvers): scheme -> variants.
REAL_MODELS: dict[str, tuple[str, ...]] = {"smollm2": ("135m-instruct",)}
_SCHEMES = ("world", *REAL_MODELS)


def model_scheme(name_or_path: str | None) -> str | None:
    """``world`` / ``smollm2`` for a name alignkit resolves itself, else None (a folder, a hub id)."""
    scheme, sep, _ = str(name_or_path).partition(":")
    return scheme if sep and scheme in _SCHEMES else None


def is_world_model(name_or_path: str | None) -> bool:
    """Whether a model is the tiny-world testbed's (``world:...``): only those have the world's
    knowledge base, datasets (``${world}``) and template stand-ins."""
    return model_scheme(name_or_path) == "world"


def world_uri(name_or_path: str) -> str:
    return name_or_path if name_or_path.startswith("world:") else "world:tiny"


def expand(path: str, model_name_or_path: str) -> str:
    if WORLD_VAR not in path:
        return path
    from alignkit.world import world_dir_for_uri

    return path.replace(WORLD_VAR, str(world_dir_for_uri(world_uri(model_name_or_path))))


def expand_config(cfg) -> None:
    """Expand ``${world}`` in every data and eval path of a config, in place."""
    m = cfg.model.name_or_path
    for src in (cfg.data.train, cfg.data.eval):
        if src is not None:
            src.path = expand(src.path, m)
    for ev in cfg.eval.datasets.values():
        ev.path = expand(ev.path, m)
    if "world_dir" in cfg.eval.judge:
        cfg.eval.judge["world_dir"] = expand(cfg.eval.judge["world_dir"], m)
