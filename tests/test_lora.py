"""LoRA and QLoRA: train a few steps on CPU; the reference is the adapter-disabled policy."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.data import PreferenceCollator, load_rows, tokenize_rows
from alignkit.losses import token_logps
from alignkit.models import load_model, load_tokenizer
from alignkit.recipes import get_recipe, load_config
from conftest import toy_config

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _batch(cfg):
    tok = load_tokenizer(cfg.model)
    rows = load_rows(cfg.data.train, "preference")[:4]
    toks, _ = tokenize_rows("preference", rows, tok, cfg.data.train.path, 64)
    return PreferenceCollator(tok.pad_token_id)(toks)


def _logps(model, batch):
    """Per-sequence completion log-prob sums, the plain way (full padded logits)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_tok = token_logps(logits, batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100))
    return (per_tok * batch["loss_weights"][:, 1:]).sum(-1)


@pytest.mark.parametrize("quant", [False, True], ids=["lora", "qlora"])
def test_lora_trains_and_reference_is_adapter_disabled(tiny_random_model_dir, tiny_qlora_model_dir, toy_data,
                                                       tmp_path, quant):
    model_dir = tiny_qlora_model_dir if quant else tiny_random_model_dir
    raw = toy_config("dpo", model_dir, toy_data["pref"], tmp_path / "run", max_steps=3)
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

    from alignkit.training.preference import PreferenceTrainer

    batch = _batch(cfg)
    policy = load_model(cfg.model)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # a non-trivial adapter
    trainer = PreferenceTrainer(model=policy, ref_model=None, args=TrainingArguments(
        output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True, remove_unused_columns=False),
        data_collator=PreferenceCollator(0))
    ref = trainer.live_reference_logps(trainer.model, batch)
    q = cfg.model.quantization  # kept for QLoRA, with the trainer's fp32 kernel (the packed one computes in bf16)
    base_cfg = cfg.model.model_copy(update={
        "lora": None, "quantization": q.model_copy(update={"cpu_packed_inference": False}) if q else None})
    plain = _logps(load_model(base_cfg, for_training=False), batch)
    torch.testing.assert_close(ref, plain, atol=1e-4, rtol=1e-5)
    pol = _logps(policy, batch)
    assert (pol - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- 4-bit inference on either kind of CPU


def _qlora_cfg(model_dir, toy_data, tmp_path):
    raw = toy_config("dpo", model_dir, toy_data["pref"], tmp_path / "run")
    raw["model"]["lora"] = LORA
    raw["model"]["quantization"] = {"compute_dtype": "float32"}
    return load_config(raw)


def test_qlora_trains_then_evaluates_on_this_cpus_4bit_path(tiny_qlora_model_dir, toy_data, tmp_path):
    """Train a step, then eval-mode forward + generation: the path bitsandbytes takes on *this* CPU
    (packed AVX512-BF16 kernel where the CPU has it, generic elsewhere) must agree with the
    training-mode (generic, fp32) forward, and training must still work afterwards."""
    from alignkit.generation.sampling import generate
    from alignkit.models import configure_cpu_4bit, cpu_4bit_paths
    from conftest import bnb_cpu_4bit_path

    cfg = _qlora_cfg(tiny_qlora_model_dir, toy_data, tmp_path)
    batch = _batch(cfg)
    model = load_model(cfg.model)
    assert cpu_4bit_paths(model)["packed"] == 0  # never packed while training
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.float().logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()

    with torch.no_grad():  # training mode, no grad: the generic fp32 path, the reference
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    counts = configure_cpu_4bit(model, allow_packed=True)  # what evaluation after training does
    from bitsandbytes.functional import has_avx512bf16

    path = "packed" if has_avx512bf16() else "generic"
    print(f"4-bit eval path: {bnb_cpu_4bit_path()}; layers {counts}")
    assert (counts["packed"] > 0) == (path == "packed")
    assert counts["generic_unsupported_shape"] == 0  # the fixture has real-model widths
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    # The packed kernel computes in bf16 (about 3 significant digits); the generic one in fp32.
    tol = 5e-2 if path == "packed" else 1e-4
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=tol * ref.abs().max().item(), rtol=tol)
    tok = load_tokenizer(cfg.model)
    texts = generate(model, tok, ["Tell me about person 1."], n=2, max_new_tokens=6, seed=0, progress=False)
    assert len(texts) == 1 and len(texts[0]) == 2

    # Back to training: packed weights (if any) are restored to the standard layout first.
    configure_cpu_4bit(model, allow_packed=False)
    assert cpu_4bit_paths(model)["packed"] == 0
    model.train()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_packed_4bit_kernel_falls_back_on_layers_it_cannot_take(toy_data, tmp_path, monkeypatch):
    """A model with 32-wide layers on a CPU with AVX512-BF16: bitsandbytes' packed conversion fails
    with "shape '[32, 0]' is invalid" inside its eval forward. Simulate the capable CPU (the
    conversion runs before any AVX512 instruction), and check those layers fall back."""
    import bitsandbytes.functional as bnbf

    from alignkit.models import configure_cpu_4bit, cpu_4bit_paths, packed_4bit_shape_ok

    assert packed_4bit_shape_ok(64, 4096) and packed_4bit_shape_ok(4096, 14336)  # Llama-3-8B layers
    assert not packed_4bit_shape_ok(32, 32) and not packed_4bit_shape_ok(16, 64) and not packed_4bit_shape_ok(64, 96)
    from conftest import build_random_tiny_model

    # hidden 32, MLP 96: no layer fits the packed grid (in_features 32 or 96), so forcing the
    # packed path below never reaches an AVX512 instruction on a CPU that lacks them.
    model_dir = build_random_tiny_model(tmp_path / "narrow", hidden=32, intermediate=96)
    cfg = _qlora_cfg(model_dir, toy_data, tmp_path)
    monkeypatch.setattr(bnbf, "has_avx512bf16", lambda: True)
    base = load_model(cfg.model.model_copy(update={"lora": None}), for_training=False)
    layers = [m for m in base.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert cpu_4bit_paths(base) == {"packed": 0, "generic": len(layers)}
    batch = _batch(cfg)
    with torch.no_grad():
        base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # no shape error

    # What the old code did: bitsandbytes' own flag left on for these layers fails in the eval forward.
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    with pytest.raises(RuntimeError, match="invalid for input of size"), torch.no_grad():
        base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    counts = configure_cpu_4bit(base, allow_packed=True)
    assert counts == {"packed": 0, "generic": 0, "generic_unsupported_shape": len(layers)}

    # Loading for training never enables the packed kernel (it has no backward).
    policy = load_model(cfg.model)
    assert cpu_4bit_paths(policy)["packed"] == 0
