"""The DPO benchmarks' data generator and FLOP formula (benchmarks/dpo_common.py); no timing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dpo_common as dc  # noqa: E402


def test_pair_lengths_are_deterministic_and_hit_the_issue_targets():
    lens = dc.pair_lengths(256, seed=0)
    assert lens == dc.pair_lengths(256, seed=0)
    other = dc.pair_lengths(256, seed=1)
    assert other != lens  # another order...
    assert sorted(p + c for p, c, _ in other) == sorted(p + c for p, c, _ in lens)  # ...of the same lengths
    pc = dc.percentiles([p + c for p, c, _ in lens])
    assert pc["p50"] == pytest.approx(47, abs=1)
    assert pc["p90"] == pytest.approx(118, abs=2)
    assert pc["p100"] == 262
    pr = dc.percentiles([p + r for p, _, r in lens])
    assert pr["p90"] == pytest.approx(118, abs=3) and pr["p100"] <= 262
    assert all(p >= 2 and c >= 2 and r >= 2 for p, c, r in lens)
    # Small runs (what `make bench` uses) keep the median, the tail and the maximum.
    small = dc.percentiles([p + c for p, c, _ in dc.pair_lengths(48)])
    assert small["p50"] == pytest.approx(47, abs=1) and small["p90"] == pytest.approx(118, abs=3)
    assert small["p100"] == 262


def test_rows_are_token_exact_for_both_trainers():
    tok = dc.build_tokenizer(1500)
    lens = dc.pair_lengths(32, seed=3) + dc.fixed_lengths(2, 128)
    rows = dc.make_rows(lens, 1500, seed=3)
    assert rows == dc.make_rows(lens, 1500, seed=3)
    assert len(tok) == 1500

    def n(text: str) -> int:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        return len(ids)

    for (p, c, r), row in zip(lens, rows):
        assert n(row["prompt"]) == p
        # TRL: prompt + completion + EOS as one string; alignkit: prompt, then completion + EOS.
        assert n(row["prompt"] + row["chosen"] + tok.eos_token) == p + c
        assert n(row["prompt"] + row["rejected"] + tok.eos_token) == p + r
        assert n(row["chosen"] + tok.eos_token) == c and row["chosen"] != row["rejected"]
    assert dc.real_tokens(lens) == sum(2 * p + c + r for p, c, r in lens)
    assert all(p + c == 128 and p + r == 128 for p, c, r in dc.fixed_lengths(3, 128))


@pytest.mark.parametrize("tied", [True, False])
def test_flop_formula_counts_what_it_says(tied):
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    # vocab 50, hidden 16, 2 heads of 8 with 1 KV head (GQA), MLP 24, 2 layers.
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    per_layer = (16 * 16 + 16 * 8 + 16 * 8 + 16 * 16) + 3 * 16 * 24 + 2 * 16  # q k v o, MLP, 2 norms
    head = 50 * 16  # counted whether or not it is tied to the embedding
    assert dc.flop_params(model) == 2 * per_layer + 16 + head
    assert dc.train_flops(1000, 7) == 6 * 1000 * 7

    # Independent count: torch's FLOP counter over one forward+backward of one sequence. It counts
    # matmuls only, so the norm weights (elementwise) are the whole difference from 6*N*T.
    s = 10
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 50, (1, s))).logits.sum().backward()
    assert counter.get_total_flops() == dc.train_flops(dc.flop_params(model) - norms, s) + dc.attention_flops(cfg, [s])


def test_noise_warning_flags_repeats_that_disagree():
    assert dc.noise_warning({"wide/alignkit": [6.1, 6.3, 5.7], "wide/trl_fastest": [21.6, 21.2]}) is None
    msg = dc.noise_warning({"wide/alignkit": [78.7, 5.7, 6.0], "wide/trl_fastest": [21.6, 21.2]})
    assert "wide/alignkit 5.7-78.7 s" in msg and "trl_fastest" not in msg
