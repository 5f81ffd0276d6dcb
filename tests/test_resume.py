"""Exact resume: a killed run resumed with `resume_from_checkpoint: auto` reproduces the
uninterrupted run's per-step losses and final weights (ANCHORS §5)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from alignkit.config import ConfigError
from alignkit.recipes import get_recipe, load_config
from alignkit.training.rundir import latest_complete_checkpoint
from conftest import toy_config, write_toy_data


class Kill(TrainerCallback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"simulated kill after step {self.at}")


def _losses(run):
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in m}


@pytest.mark.parametrize("recipe,rows,bs,ga", [("dpo", 14, 4, 1), ("mask_dpo", 16, 2, 2), ("sft", 14, 4, 1)])
def test_killed_run_resumes_exactly(tiny_random_model_dir, tmp_path, recipe, rows, bs, ga):
    # 14 rows with batch 4: the epoch does not divide the global batch (OpenRLHF#1350).
    data = write_toy_data(tmp_path / "data", rows)["sft" if recipe == "sft" else "pref"]
    kw = dict(max_steps=7, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, save_steps=2)
    full = load_config(toy_config(recipe, tiny_random_model_dir, data, tmp_path / "full", **kw))
    get_recipe(recipe).train(full)

    cut = toy_config(recipe, tiny_random_model_dir, data, tmp_path / "cut", **kw)
    with pytest.raises(KeyboardInterrupt):
        get_recipe(recipe).train(load_config(cut), callbacks=[Kill(5)])
    assert latest_complete_checkpoint(tmp_path / "cut").name == "checkpoint-4"
    assert not (tmp_path / "cut" / "RUN_COMPLETE").exists()
    # Re-running without resume must refuse to clobber the interrupted run.
    with pytest.raises(ConfigError, match="already holds a run"):
        get_recipe(recipe).train(load_config(cut))
    get_recipe(recipe).train(load_config(cut, ["train.resume_from_checkpoint=auto"]))

    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 8))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), step
    wa = load_file(tmp_path / "full" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


def test_auto_ignores_incomplete_checkpoint(tiny_random_model_dir, toy_data, tmp_path):
    cfg = load_config(toy_config("dpo", tiny_random_model_dir, toy_data["pref"], tmp_path / "r", max_steps=4,
                                 save_steps=2))
    get_recipe("dpo").train(cfg)
    ck = tmp_path / "r" / "checkpoints"
    broken = ck / "checkpoint-6"
    broken.mkdir()  # a crash mid-save: no COMPLETE marker
    assert latest_complete_checkpoint(tmp_path / "r").name == "checkpoint-4"


def test_auto_with_nothing_complete_starts_over_cleanly(tiny_random_model_dir, toy_data, tmp_path):
    raw = toy_config("dpo", tiny_random_model_dir, toy_data["pref"], tmp_path / "r", max_steps=3, save_steps=10)
    with pytest.raises(KeyboardInterrupt):
        get_recipe("dpo").train(load_config(raw), callbacks=[Kill(2)])  # killed before any checkpoint
    get_recipe("dpo").train(load_config(raw, ["train.resume_from_checkpoint=auto"]))
    steps = [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3]  # the killed run's lines are gone, not mixed in


def test_auto_with_nothing_complete_drops_a_recipes_run_state(tiny_random_model_dir, toy_data, tmp_path):
    """A recipe's own run state (TA-SFT's frozen cost embedding) is read back only by a resume: when
    auto finds nothing complete, it goes with the killed run's logs, so a restart (perhaps on another
    model of the same shape) takes the copy from its own base weights."""
    from alignkit.recipes.ta_sft import COST_FILE
    from alignkit.training.rundir import prepare_run_dir

    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / COST_FILE).write_bytes(b"the killed run's copy")
    (run / "notes.txt").write_text("a user's file")
    raw = toy_config("dpo", tiny_random_model_dir, toy_data["pref"], run)
    got, resume = prepare_run_dir(load_config(raw, ["train.resume_from_checkpoint=auto"]), run_state=(COST_FILE,))
    assert got == run and resume is None
    assert not (run / COST_FILE).exists() and not (run / "metrics.jsonl").exists()
    assert (run / "notes.txt").exists()
