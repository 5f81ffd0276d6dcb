"""The preference fast path against the plain path (issue #13).

Fast path: packed rows (shared prompt, tree mask), LM head on completion-predicting
positions only (``logits_to_keep``), chunked float32 normalisers, reference sums from a
precomputed table cached on disk. Plain path: right-padded rows, full ``[2B, T, V]``
logits, :func:`token_logps`, :func:`mask_dpo_loss`, a live reference forward.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from alignkit.data import PackedPreferenceCollator, PreferenceCollator
from alignkit.losses import mask_dpo_loss, target_logps, token_logps
from conftest import toy_config

# ---------------------------------------------------------------- target_logps vs a naive loop


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_target_logps_matches_naive_log_softmax(dtype, chunk):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(7, 50, generator=g)).to(dtype).requires_grad_()
    rows = torch.tensor([0, 0, 2, 3, 6, 6, 5])  # rows shared by several targets (a shared prompt's last token)
    ids = torch.randint(0, 50, (7,), generator=g)
    got = target_logps(logits, rows, ids, chunk_size=chunk)
    want = torch.stack([torch.log_softmax(logits[r].float(), -1)[t] for r, t in zip(rows, ids)])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    w = torch.rand(7, generator=g)
    (ga,) = torch.autograd.grad((got * w).sum(), logits)
    (gb,) = torch.autograd.grad((want * w).sum(), logits)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16 gradients: a rounding step of 2**-8
    torch.testing.assert_close(ga, gb, atol=tol, rtol=tol)


# ---------------------------------------------------------------- loss and gradients: fast == plain


def _random_examples(rng: random.Random, n: int, vocab: int, weighted: bool) -> list[dict]:
    out = []
    for _ in range(n):
        p, c, r = rng.randint(1, 9), rng.randint(1, 14), rng.randint(1, 14)
        ex = {"prompt_ids": [rng.randrange(5, vocab) for _ in range(p)],
              "chosen_ids": [rng.randrange(5, vocab) for _ in range(c)],
              "rejected_ids": [rng.randrange(5, vocab) for _ in range(r)]}
        for side, k in (("chosen", c), ("rejected", r)):
            ex[f"{side}_weights"] = [float(rng.random() < 0.6) if weighted else 1.0 for _ in range(k)]
        out.append(ex)
    return out


def _plain_loss(policy, ref, batch, loss_type):
    def per_token(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_logps(logits, batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100))

    lp = per_token(policy)
    with torch.no_grad():
        rp = per_token(ref)
    w = batch["loss_weights"][:, 1:]
    b = lp.size(0) // 2
    losses, _, _ = mask_dpo_loss(lp[:b], lp[b:], rp[:b], rp[b:], w[:b], w[b:], beta=0.1, loss_type=loss_type)
    return losses.mean()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("layout", ["packed_shared_prompt", "packed_sequences", "padded"])
def test_fast_path_loss_and_grads_equal_plain_path(tiny_random_model_dir, tmp_path, loss_type, layout):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from alignkit.training.preference import PreferenceTrainer

    policy = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float32)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ex = _random_examples(random.Random(7), 5, policy.config.vocab_size, weighted=True)
    plain_batch = PreferenceCollator(0)(ex)
    fast_batch = (PreferenceCollator(0) if layout == "padded"
                  else PackedPreferenceCollator(0, shared_prompt=layout == "packed_shared_prompt"))(ex)

    want = _plain_loss(policy, ref, plain_batch, loss_type)
    want_grads = torch.autograd.grad(want, list(policy.parameters()))

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False)
    trainer = PreferenceTrainer(model=policy, ref_model=ref, args=args, data_collator=None, loss_type=loss_type,
                                logps_chunk_size=5)
    policy.train()
    got = trainer.compute_loss(policy, fast_batch)
    got_grads = torch.autograd.grad(got, list(policy.parameters()))
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_without_logits_to_keep_and_with_eager_attention_the_sums_are_unchanged(tiny_random_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from alignkit.training.preference import PreferenceTrainer

    sdpa = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float32).eval()
    eager = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()

    class NoKeep(type(sdpa)):  # a model whose forward has no logits_to_keep: full logits, then selected
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache)

    nokeep = copy.deepcopy(sdpa)
    nokeep.__class__ = NoKeep
    batch = PackedPreferenceCollator(0)(_random_examples(random.Random(3), 4, sdpa.config.vocab_size, True))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False)
    out = {}
    for name, m in (("sdpa", sdpa), ("eager", eager), ("nokeep", nokeep)):
        trainer = PreferenceTrainer(model=m, args=args)
        with torch.no_grad():
            out[name] = trainer.sequence_logps(m, batch)[0]
    assert trainer._keeps_logits == {NoKeep: False}
    torch.testing.assert_close(out["eager"], out["sdpa"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["nokeep"], out["sdpa"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the reference cache


def _run(tmp_path, name, model_dir, data, monkeypatch, cache_root, **method):
    from alignkit.recipes import get_recipe, load_config

    monkeypatch.setenv("ALIGNKIT_CACHE", str(cache_root))
    raw = toy_config("dpo", model_dir, data, tmp_path / name, max_steps=2)
    raw["method"] = method
    run = get_recipe("dpo").train(load_config(raw))
    losses = [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    return losses, json.loads((run / "train_results.json").read_text())["timings"]


def test_reference_cache_is_reused_only_when_data_and_model_match(tiny_random_model_dir, toy_data, tmp_path,
                                                                  monkeypatch):
    cache = tmp_path / "cache"
    first, t1 = _run(tmp_path, "a", tiny_random_model_dir, toy_data["pref"], monkeypatch, cache)
    again, t2 = _run(tmp_path, "b", tiny_random_model_dir, toy_data["pref"], monkeypatch, cache, beta=0.3)
    assert t1["ref_logps_train_cache"] == "miss" and t2["ref_logps_train_cache"] == "hit"
    assert len(list((cache / "ref_logps").glob("*.pt"))) == 1
    # β does not change the reference sums: step 1 (policy == reference) is ln 2 for both.
    assert first[0] == pytest.approx(again[0], abs=1e-6)

    # Other data (one pair dropped) -> a miss.
    rows = toy_data["pref"].read_text().splitlines()
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("\n".join(rows[1:]) + "\n")
    _, t3 = _run(tmp_path, "c", tiny_random_model_dir, fewer, monkeypatch, cache)
    assert t3["ref_logps_train_cache"] == "miss"

    # Other weights (same architecture, one parameter changed) -> a miss.
    import shutil

    from transformers import AutoModelForCausalLM

    other = tmp_path / "other_model"
    shutil.copytree(tiny_random_model_dir, other)
    m = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        next(m.parameters()).add_(0.01)
    m.save_pretrained(other)
    _, t4 = _run(tmp_path, "d", other, toy_data["pref"], monkeypatch, cache)
    assert t4["ref_logps_train_cache"] == "miss"
    _, t5 = _run(tmp_path, "e", tiny_random_model_dir, toy_data["pref"], monkeypatch, cache, ref_logps_cache=False)
    assert t5["ref_logps_train_cache"] == "off"
    assert len(list((cache / "ref_logps").glob("*.pt"))) == 3


def test_reference_cache_key_covers_weights_and_tokens():
    from datasets import Dataset

    from alignkit.training.reference import ReferenceCache

    rows = [{"pair_index": i, "prompt_ids": [1, 2], "chosen_ids": [3, i], "rejected_ids": [4],
             "chosen_weights": [1.0, 1.0], "rejected_weights": [1.0]} for i in range(3)]
    c = ReferenceCache("/nonexistent", "model-a")
    base = c.key(Dataset.from_list(rows))
    assert c.key(Dataset.from_list(rows)) == base
    assert ReferenceCache("/nonexistent", "model-b").key(Dataset.from_list(rows)) != base
    masked = copy.deepcopy(rows)
    masked[1]["chosen_weights"] = [1.0, 0.0]  # a Mask-DPO mask changes the sums
    assert c.key(Dataset.from_list(masked)) != base
    tokens = copy.deepcopy(rows)
    tokens[2]["prompt_ids"] = [1, 9]
    assert c.key(Dataset.from_list(tokens)) != base
