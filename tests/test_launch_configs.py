"""Every shipped accelerate config launches every shipped recipe YAML, evaluation included.

The command is the one the README gives a user, with the shipped files as they are:

    accelerate launch --config_file configs/accelerate/<cfg>.yaml -m alignkit train recipes/<recipe>.yaml

plus dotted overrides that only shrink the run (a few optimiser steps, a few eval rows)
and a fresh output_dir. Two CPU processes (gloo) stand in for two GPUs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]

# Shipped configs that cannot run on a CPU-only single machine, and why. Every other config
# in configs/accelerate/ is launched below; a new one is picked up without editing this file.
NOT_ON_CPU = {
    "fsdp": "FSDP in accelerate needs CUDA devices",
    "multinode": "needs several machines (num_machines: 2)",
}
ACCEL = sorted(p.stem for p in (ROOT / "configs" / "accelerate").glob("*.yaml") if p.stem not in NOT_ON_CPU)
# Training recipes only: `kind: attack` configs (alignkit attack) are not launched with `alignkit train`.
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml") if "recipe" in yaml.safe_load(p.read_text())
                 and yaml.safe_load(p.read_text()).get("kind") != "attack")
# Recipes that bring their own trainer (or the shared trainers' first users) get every config.
# The others run prepare stages and then train through one of those trainers
# (alignkit.training.train_sft_rows / train_preference): what a launch can break for them is
# the rank-0-first stages and the evaluation after training, so they get one plain
# multi-process config and the ZeRO-3 one (partitioned weights, gathered eval); the other
# DeepSpeed flavours would re-test the shared trainer at ~30 s a launch.
FULL_MATRIX = {"sft", "dpo", "mask_dpo", "ta_sft"}
STAGE_RECIPE_CONFIGS = {"ddp", "zero3"}
MATRIX = [(accel, recipe) for recipe in RECIPES for accel in ACCEL
          if recipe in FULL_MATRIX or accel in STAGE_RECIPE_CONFIGS]


def test_the_matrix_covers_every_shipped_config():
    shipped = {p.stem for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert {"single", "ddp", "zero2", "zero3", "zero3_offload"} <= set(ACCEL)
    assert shipped == set(ACCEL) | set(NOT_ON_CPU)
    assert {"sft", "dpo", "mask_dpo"} <= set(RECIPES)
    assert STAGE_RECIPE_CONFIGS <= set(ACCEL) and FULL_MATRIX <= set(RECIPES)
    for recipe in RECIPES:  # every training recipe is launched multi-process and under ZeRO-3
        assert {(a, recipe) for a in STAGE_RECIPE_CONFIGS} <= set(MATRIX)
    for accel in ACCEL:  # every config launches every recipe that owns a trainer
        assert {(accel, r) for r in FULL_MATRIX} <= set(MATRIX)


def _cpu_tag() -> str:
    """DeepSpeed JIT-builds its CPU Adam op (zero3_offload) for this CPU's instruction set;
    a per-CPU build folder keeps a shared cache from handing it to a different CPU."""
    import hashlib
    import platform

    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def _env() -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions" / _cpu_tag()))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.parametrize(("accel", "recipe"), MATRIX)
def test_shipped_config_launches_shipped_recipe(accel, recipe, tiny_world_dir, tmp_path):
    out = tmp_path / f"{accel}-{recipe}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/accelerate/{accel}.yaml",
           "-m", "alignkit", "train", f"recipes/{recipe}.yaml",
           f"output_dir={out}", "train.max_steps=2", "train.logging_steps=1", "eval.limit=4"]
    if recipe in ("dpo", "mask_dpo"):
        # Run the reference pass under this launcher instead of reading another test's cached table.
        cmd.append("method.ref_logps_cache=false")
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=840)
    assert r.returncode == 0, f"exit {r.returncode}\n" + r.stdout[-3000:] + r.stderr[-6000:]
    assert (out / "RUN_COMPLETE").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"], metrics  # the evaluation ran and wrote its results
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps and all(m["loss"] == m["loss"] for m in steps)  # logged, not NaN
    if recipe in ("dpo", "mask_dpo"):
        # Precomputed reference sums (the default), gathered over ranks by pair: at step 1 the policy is the
        # reference, so the loss is exactly ln 2 only if every pair got its own reference log-probs.
        assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4), steps[0]
