"""Every shipped YAML validates; every public module imports (torchtune's lesson, ANCHORS §4)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import alignkit
from alignkit.recipes import load_config

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_there_are_shipped_recipes():
    names = {p.stem for p in YAMLS}
    assert {"sft", "dpo", "mask_dpo"} <= names
    assert any(p.parent.name == "examples" for p in YAMLS)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_yaml_validates(path):
    from alignkit.config.attack import is_attack_config, load_attack_config

    if is_attack_config(path):  # `alignkit attack` configs (kind: attack) have their own schema
        assert load_attack_config(path).techniques
        return
    cfg = load_config(path)
    cfg.method_config()  # the recipe's own schema


def test_validate_cli_on_all_recipes():
    r = subprocess.run([sys.executable, "-m", "alignkit", "validate", *map(str, YAMLS)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok:") == len(YAMLS)


MODULES = sorted(m.name for m in pkgutil.walk_packages(alignkit.__path__, "alignkit.") if m.name != "alignkit.__main__")


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name):
    importlib.import_module(name)


def test_shipped_accelerate_and_deepspeed_configs_parse():
    import json

    import yaml

    acc = {p.stem for p in (ROOT / "configs/accelerate").glob("*.yaml")}
    assert {"single", "ddp", "zero2", "zero3", "fsdp", "multinode"} <= acc
    for p in (ROOT / "configs/accelerate").glob("*.yaml"):
        cfg = yaml.safe_load(p.read_text())
        ds = cfg.get("deepspeed_config", {}).get("deepspeed_config_file")
        if ds:
            assert (ROOT / ds).exists(), p
    for p in (ROOT / "configs/deepspeed").glob("*.json"):
        assert "zero_optimization" in json.loads(p.read_text())
