"""Packed preference batches on every model family and CPU attention kernel (issue 21).

Tiny random models built from configs (no download): Llama, Qwen2 with sliding layers,
Qwen3, Mistral with a sliding window, Gemma-2 and Gemma-3 (alternating sliding/full layers,
soft-capping) and Phi-3 with a sliding window. For each, every layout the collator can choose
(shared prompt, separate sequences, padded) under every attention kernel the CPU has
(``eager``, ``sdpa``; ``flex_attention`` forward-only: torch has no flex backward on CPU) must
give the per-sequence log-probs, DPO losses and parameter gradients of the plain padded path
(full logits, :func:`token_logps`, :func:`mask_dpo_loss`), with sequences longer than the
window. flash-attention (CUDA only) is checked through the exact keyword arguments its
function receives, with a CPU stand-in registered in its place.

``python tests/test_families.py`` prints the family x layout x kernel table of maximum
absolute differences (docs/performance.md).
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

WINDOW = 4

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]
KERNELS = ["eager", "sdpa", "flex_attention"]
LAYOUTS = ["shared_prompt", "separate", "padded"]
TOL = 2e-5
# Per-sequence sums reach ~100 nats here, where one float32 ulp is ~8e-6; the bugs this guards
# against (a dropped window, sequences leaking into each other) move them by nats.
TOL_LOGPS = 1e-4


def build_family(family: str, seed: int = 0):
    """A tiny random causal LM of ``family`` in float32 (dropout off)."""
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False, attention_dropout=0.0)
    if family == "llama":
        cfg, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif family == "qwen2":  # sliding layers from layer 1 on: a mix of full and sliding
        cfg, cls = tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW,
                                  max_window_layers=1), tf.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = tf.Qwen3Config(**common, head_dim=8), tf.Qwen3ForCausalLM
    elif family == "mistral":
        cfg, cls = tf.MistralConfig(**common, sliding_window=WINDOW), tf.MistralForCausalLM
    elif family == "gemma2":
        cfg, cls = tf.Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                                   final_logit_softcapping=5.0, attn_logit_softcapping=20.0), tf.Gemma2ForCausalLM
    elif family == "gemma3":
        cfg, cls = tf.Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                                       layer_types=["sliding_attention", "full_attention"],
                                       final_logit_softcapping=5.0), tf.Gemma3ForCausalLM
    elif family == "phi3":
        cfg, cls = tf.Phi3Config(**common, sliding_window=WINDOW, resid_pdrop=0.0, embd_pdrop=0.0), tf.Phi3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).float()
    with torch.no_grad():  # random weights of a size that gives non-trivial attention patterns
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def examples(seed: int, n: int = 4, vocab: int = 96) -> list[dict]:
    """Pairs whose prompt + completion are 9-22 tokens: every sequence is longer than the window."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, c, r = rng.randint(3, 8), rng.randint(6, 14), rng.randint(6, 14)
        ex = {"prompt_ids": [rng.randrange(5, vocab) for _ in range(p)],
              "chosen_ids": [rng.randrange(5, vocab) for _ in range(c)],
              "rejected_ids": [rng.randrange(5, vocab) for _ in range(r)]}
        for side, k in (("chosen", c), ("rejected", r)):
            ex[f"{side}_weights"] = [float(rng.random() < 0.7) for _ in range(k)]
        out.append(ex)
    return out


def collator(layout: str, config):
    """The collator the trainer builds for this model (``preference_collator``), forced to one layout."""
    from alignkit.training.preference import preference_collator

    if layout == "padded":
        return preference_collator(0, False, config)
    packed = preference_collator(0, True, config)
    return dataclasses.replace(packed, shared_prompt=layout == "shared_prompt")


def plain_logps(model, batch):
    """The plain path: right-padded rows, a 2D mask, full logits, token_logps."""
    from alignkit.losses import token_logps

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return token_logps(logits, batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100))


def plain_loss(policy, ref, batch, grad: bool):
    from alignkit.losses import mask_dpo_loss

    with torch.set_grad_enabled(grad):
        lp = plain_logps(policy, batch)
    with torch.no_grad():
        rp = plain_logps(ref, batch)
    w = batch["loss_weights"][:, 1:]
    b = lp.size(0) // 2
    losses, _, _ = mask_dpo_loss(lp[:b], lp[b:], rp[:b], rp[b:], w[:b], w[b:], beta=0.1)
    return losses, (lp * w).sum(-1)


def _trainer(policy, ref, tmp_path):
    from transformers import TrainingArguments

    from alignkit.training.preference import PreferenceTrainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False)
    return PreferenceTrainer(model=policy, ref_model=ref, args=args, data_collator=None, logps_chunk_size=7)


class KernelUnsupported(Exception):
    """transformers does not offer this kernel for this family."""


def family_diffs(family: str, kernel: str, tmp_path) -> dict[str, dict[str, float]]:
    """Per layout: max |difference| from the plain padded path of the per-sequence weighted
    log-prob sums, the per-pair DPO losses and (where the kernel has a backward) the gradients."""
    policy = build_family(family)
    try:
        policy.set_attn_implementation(kernel)
    except ValueError as e:  # e.g. Gemma-2 has no sdpa (its attention soft-capping)
        raise KernelUnsupported(str(e).split(".")[0]) from None
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    grad = kernel != "flex_attention"
    ex = examples(7)
    plain = collator("padded", policy.config)(ex)
    policy.train()
    want_losses, want_sums = plain_loss(policy, ref, plain, grad)
    want_grads = torch.autograd.grad(want_losses.mean(), list(policy.parameters())) if grad else None
    trainer = _trainer(policy, ref, tmp_path)
    out = {}
    for layout in LAYOUTS:
        batch = collator(layout, policy.config)(ex)
        with torch.set_grad_enabled(grad):
            loss, extra = trainer.compute_loss(policy, batch, return_outputs=True)
            sums = trainer.sequence_logps(policy, batch)[0]
        d = {"logps": (sums - want_sums).abs().max().item(),
             "loss": (extra["losses"] - want_losses).abs().max().item()}
        if grad:
            got = torch.autograd.grad(loss, list(policy.parameters()))
            d["grad"] = max((a - b).abs().max().item() for a, b in zip(got, want_grads))
        out[layout] = d
    return out


@pytest.fixture
def static_flex_compile():
    """transformers compiles flex_attention with torch's default automatic dynamic shapes; on
    the CPU, torch 2.13's inductor emits C++ that does not compile for the dynamic-shape flex
    template (``cur_kvSplitSize5 was not declared``). Static shapes compile fine."""
    import torch._dynamo

    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
        yield


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_equals_the_padded_path(family, kernel, tmp_path, static_flex_compile):
    try:
        diffs = family_diffs(family, kernel, tmp_path)
    except KernelUnsupported as e:
        pytest.skip(str(e))
    for layout, d in diffs.items():
        for what, v in d.items():
            assert v < (TOL_LOGPS if what == "logps" else TOL), f"{family} / {kernel} / {layout}: {what} differs by {v:.3g}"


def test_sliding_window_really_matters_here(tmp_path):
    """The matrix could pass by accident if the window never cut anything: a full-attention
    tree mask on the windowed Mistral gives other log-probs."""
    from alignkit.data.collate import PackedPreferenceCollator

    model = build_family("mistral").eval()
    ex = examples(7)
    plain = collator("padded", model.config)(ex)
    with torch.no_grad():
        _, want = plain_loss(model, model, plain, grad=False)
        full = PackedPreferenceCollator(0, shared_prompt=True)(ex)  # no window in the mask
        trainer = _trainer(model, None, tmp_path)
        got = trainer.sequence_logps(model, full)[0]
    assert (got - want).abs().max() > 1e-2


# ---------------------------------------------------------------- what the collator chooses


def test_collator_never_chooses_an_inexact_layout():
    from transformers import Qwen2Config

    from alignkit.data import PackedPreferenceCollator, PreferenceCollator
    from alignkit.training.preference import preference_collator

    # Sliding-window families: the tree mask carries the window, so sharing the prompt stays allowed.
    mistral = build_family("mistral").config
    coll = preference_collator(0, True, mistral)
    assert isinstance(coll, PackedPreferenceCollator) and coll.shared_prompt is None
    assert coll.layers == {"full_attention": ("sliding", WINDOW)}
    gemma = build_family("gemma2").config
    coll = preference_collator(0, True, gemma)
    assert coll.mapping and coll.layers == {"sliding_attention": ("sliding", WINDOW), "full_attention": ("full", None)}
    batch = coll(examples(1))
    if "attention_mask" in batch:
        assert set(batch["attention_mask"]) == {"sliding_attention", "full_attention"}

    # A layer type no attention mask describes (linear attention, as in Qwen3-Next): its recurrent
    # state would flow from one packed sequence into the next, so right-padded rows, under every kernel.
    odd = Qwen2Config(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"])
    for kernel in ("sdpa", "flex_attention", "flash_attention_2"):
        odd._attn_implementation = kernel
        assert type(preference_collator(0, True, odd)) is PreferenceCollator, kernel

    # flash-attention: one row, explicit sequence boundaries, never a 4D mask.
    flash = copy.deepcopy(mistral)
    flash._attn_implementation = "flash_attention_2"
    coll = preference_collator(0, True, flash)
    assert coll.varlen and coll.shared_prompt is False
    b = coll(examples(3))
    assert b["input_ids"].shape[0] == 1 and "attention_mask" not in b and "cu_seq_lens_q" in b

    # A kernel nothing is known about: right padding with a 2D mask.
    other = copy.deepcopy(mistral)
    other._attn_implementation = "some_hub/custom-attention"
    assert isinstance(preference_collator(0, True, other), PreferenceCollator)


def test_tree_mask_window_counts_positions_not_row_indices():
    from alignkit.data.collate import PackedPreferenceCollator

    ex = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12, 13],
           "chosen_weights": [1.0] * 4, "rejected_weights": [1.0] * 2}]
    b = PackedPreferenceCollator(0, layers={"full_attention": ("sliding", 3)})(ex)
    m = b["attention_mask"][0, 0]
    # Row: p0 p1 p2 c0 c1 c2 c3 r0 r1; r0 is at position 3, so with W=3 it sees p1, p2 and itself.
    assert m[7].nonzero().squeeze(-1).tolist() == [1, 2, 7]
    assert m[6].nonzero().squeeze(-1).tolist() == [4, 5, 6]  # c3 (position 6): c1, c2, c3


# ---------------------------------------------------------------- flash-attention: the kwargs it receives


class _RecordingVarlenAttention:
    """Stands in for transformers' flash-attention function on CPU. It dispatches as
    ``_flash_attention_forward`` does (explicit ``cu_seq_lens`` -> varlen; else position ids
    that restart -> varlen, *only for a single row*; else plain causal attention over the
    row) and computes each case exactly with eager math, so both the arguments and the
    results of a packed batch can be checked."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                 softcap=None, **kwargs):
        self.calls.append({"attention_mask": attention_mask, "sliding_window": sliding_window,
                           **{k: kwargs.get(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                                         "max_length_k", "position_ids")}})
        b, h, n, d = query.shape
        groups = h // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        i = torch.arange(n)
        allowed = (i[None, :] <= i[:, None]).expand(b, n, n).clone()
        cu = kwargs.get("cu_seq_lens_q")
        pos = kwargs.get("position_ids")
        if cu is not None:
            seq = torch.bucketize(torch.arange(b * n), cu[1:].long(), right=True).view(b, n)
        elif pos is not None and b == 1 and bool((pos != torch.arange(n)).any()):
            seq = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        else:
            seq = torch.zeros(b, n, dtype=torch.long)
        allowed &= seq[:, :, None] == seq[:, None, :]
        if attention_mask is not None:  # a 2D padding mask (the padded layout)
            allowed &= attention_mask[:, None, :].bool()
        if sliding_window is not None:
            allowed &= (i[None, :] > i[:, None] - sliding_window)
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        out = torch.softmax(scores.float(), -1).to(value.dtype) @ value
        return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def fake_flash(monkeypatch):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    rec = _RecordingVarlenAttention()
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", rec)

    def padding_mask_only(batch_size, q_length, kv_length, attention_mask=None, **kw):
        return attention_mask  # what flash's mask interface hands on: the 2D padding mask or None

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", padding_mask_only)
    return rec


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_flash_attention_gets_one_row_and_explicit_sequence_boundaries(fake_flash, family, tmp_path):
    from alignkit.training.preference import preference_collator

    model = build_family(family)
    model.config._attn_implementation = "flash_attention_2"  # the stand-in above computes it on CPU
    model.train()
    ex = examples(11, n=5)
    coll = preference_collator(0, True, model.config)
    batch = coll(ex)
    trainer = _trainer(model, copy.deepcopy(model), tmp_path)
    fake_flash.calls.clear()
    loss, extra = trainer.compute_loss(model, batch, return_outputs=True)
    sums = trainer.sequence_logps(model, batch)[0]
    got_grads = torch.autograd.grad(loss, list(model.parameters()))

    # The exact arguments: one row, every sequence's offsets, the longest sequence as an int.
    lens = [len(e["prompt_ids"]) + len(e[f"{s}_ids"]) for s in ("chosen", "rejected") for e in ex]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    assert fake_flash.calls, "the model did not call the registered flash-attention function"
    for call in fake_flash.calls:
        assert call["attention_mask"] is None
        assert torch.equal(call["cu_seq_lens_q"].cpu(), cu) and torch.equal(call["cu_seq_lens_k"].cpu(), cu)
        assert call["max_length_q"] == call["max_length_k"] == max(lens)
        assert isinstance(call["max_length_q"], int) and call["cu_seq_lens_q"].dtype == torch.int32
    assert batch["input_ids"].shape == (1, sum(lens))

    # And the numbers: equal to the padded path under the same kernel.
    padded = collator("padded", model.config)(ex)
    want_losses, want_sums = plain_loss(model, trainer.ref_model, padded, grad=True)
    want_grads = torch.autograd.grad(want_losses.mean(), list(model.parameters()))
    torch.testing.assert_close(sums, want_sums, atol=TOL_LOGPS, rtol=0)
    torch.testing.assert_close(extra["losses"], want_losses, atol=TOL, rtol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


# ---------------------------------------------------------------- the fused LM head


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_fused_head_matches_the_models_own_logits(family, tmp_path):
    """The fused LM head (hidden states out of the model, projection + soft-capping +
    log-softmax in chunks) against the logits path on the same batch, with gradients."""
    model = build_family(family).train()
    batch = collator("separate", model.config)(examples(5))
    trainer = _trainer(model, None, tmp_path)
    assert trainer._fused_head(model) is not None
    fused = trainer.sequence_logps(model, batch)[0]
    g_fused = torch.autograd.grad(fused.sum(), list(model.parameters()))
    trainer.fused_lm_head = False
    plain = trainer.sequence_logps(model, batch)[0]
    g_plain = torch.autograd.grad(plain.sum(), list(model.parameters()))
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The head is a plain Linear again afterwards (generation, saving), and soft-capping is back.
    assert "forward" not in vars(model.get_output_embeddings())
    assert getattr(model.config, "final_logit_softcapping", None) == (5.0 if family == "gemma2" else None)
    # Never under nn.DataParallel (plain `train` with several visible GPUs): each replica would run
    # the patched forward with the original head's device and the whole batch's rows.
    trainer.fused_lm_head = True
    assert trainer._fused_head(torch.nn.DataParallel(model)) is None


def _table(tmp_path) -> str:
    lines = ["| family | kernel | layout | log-probs | DPO loss | gradients |", "|---|---|---|---|---|---|"]
    for family in FAMILIES:
        for kernel in KERNELS:
            try:
                diffs = family_diffs(family, kernel, tmp_path)
            except KernelUnsupported:
                lines.append(f"| {family} | {kernel} | all | kernel not offered by transformers for this family | | |")
                continue
            for layout, d in diffs.items():
                g = f"{d['grad']:.1e}" if "grad" in d else "n/a (no CPU backward)"
                lines.append(f"| {family} | {kernel} | {layout} | {d['logps']:.1e} | {d['loss']:.1e} | {g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    import torch._dynamo

    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
        print(_table(Path(tempfile.mkdtemp())))
