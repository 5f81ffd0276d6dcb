"""LoRA and QLoRA: train a few steps on CPU; the reference is the adapter-disabled policy."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.config import load_config
from alignkit.data import PreferenceCollator, load_rows, tokenize_rows
from alignkit.losses import token_logps
from alignkit.models import load_model, load_tokenizer
from alignkit.recipes import get_recipe
from conftest import toy_config

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _batch(cfg):
    tok = load_tokenizer(cfg.model)
    rows = load_rows(cfg.data.train, "preference")[:4]
    toks, _ = tokenize_rows("preference", rows, tok, cfg.data.train.path, 64)
    return PreferenceCollator(tok.pad_token_id)(toks)


def _logps(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_logps(logits, batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100))


@pytest.mark.parametrize("quant", [False, True], ids=["lora", "qlora"])
def test_lora_trains_and_reference_is_adapter_disabled(tiny_random_model_dir, toy_data, tmp_path, quant):
    raw = toy_config("dpo", tiny_random_model_dir, toy_data["pref"], tmp_path / "run", max_steps=3)
    raw["model"]["lora"] = LORA
    if quant:
        raw["model"]["quantization"] = {"compute_dtype": "float32"}
    cfg = load_config(raw)
    run = get_recipe("dpo").train(cfg)
    assert json.loads((run / "model" / "adapter_config.json").read_text())["r"] == 4
    losses = [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1 under LoRA

    # The trainer's reference (adapter disabled) == a plain base model, while the policy differs.
    from transformers import TrainingArguments

    from alignkit.training import PreferenceTrainer

    batch = _batch(cfg)
    policy = load_model(cfg.model)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # a non-trivial adapter
    trainer = PreferenceTrainer(model=policy, ref_model=None, args=TrainingArguments(
        output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True, remove_unused_columns=False),
        data_collator=PreferenceCollator(0))
    ref = trainer._ref_token_logps(trainer.model, batch)[:, 1:]
    base_cfg = cfg.model.model_copy(update={"lora": None})  # keeps 4-bit quantisation for QLoRA
    plain = _logps(load_model(base_cfg, for_training=False), batch)
    torch.testing.assert_close(ref, plain, atol=1e-5, rtol=1e-5)
    pol = _logps(policy, batch)
    assert (pol - plain).abs().max() > 1e-3
