"""Pair selection, stage caching and Mask-DPO's mask semantics (no world needed)."""

from __future__ import annotations

import pytest

from alignkit.config import ModelConfig
from alignkit.data import tokenize_rows, validate_rows
from alignkit.models import load_tokenizer
from alignkit.pairs import PairsConfig, select_pairs
from alignkit.recipes.mask_dpo import Method, weights_for
from alignkit.stages import run_stage


def _sample(text, labels):
    c, h = labels.count("correct"), labels.count("hallucination")
    return {"text": text, "sentences": [text], "labels": labels, "score": c / (c + h) if c + h else None}


def test_select_pairs_max_min_margin_ties_and_counts():
    rows = [
        {"prompt": "p1", "entity": "A", "samples": [_sample("a", ["correct"]), _sample("b", ["hallucination"]),
                                                    _sample("c", ["correct", "hallucination"])]},
        {"prompt": "p2", "samples": [_sample("x", ["correct"]), _sample("y", ["correct"])]},  # tie
        {"prompt": "p3", "samples": [_sample("z", ["nofact"]), _sample("w", ["correct"])]},  # 1 scored
    ]
    pairs, why = select_pairs(rows, PairsConfig())
    assert len(pairs) == 1
    p = pairs[0]
    assert (p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"]) == ("a", "b", 1.0, 0.0)
    assert p["entity"] == "A" and p["chosen_labels"] == ["correct"]
    assert why == {"pairs": 1, "score_margin_too_small": 1, "fewer_than_2_scored_samples": 1}
    # A margin of 0.6 rejects a 1.0 vs 0.5 pair but keeps 1.0 vs 0.0.
    pairs, _ = select_pairs(rows[:1], PairsConfig(min_score_margin=0.6))
    assert len(pairs) == 1
    rows2 = [{"prompt": "p", "samples": [_sample("a", ["correct"]), _sample("c", ["correct", "hallucination"])]}]
    assert select_pairs(rows2, PairsConfig(min_score_margin=0.6))[0] == []


def test_run_stage_skips_unchanged_and_is_atomic(tmp_path):
    calls = []

    def fn():
        calls.append(1)
        return [{"x": len(calls)}]

    a = run_stage("s", {"k": 1}, fn, tmp_path)
    b = run_stage("s", {"k": 1}, fn, tmp_path)
    c = run_stage("s", {"k": 2}, fn, tmp_path)
    assert a == b != c and len(calls) == 2
    assert a.with_suffix(".provenance.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]

    def boom():
        raise RuntimeError("judge down")

    with pytest.raises(RuntimeError):
        run_stage("s", {"k": 3}, boom, tmp_path)
    assert len(list(tmp_path.glob("s-*.jsonl"))) == 2  # nothing half-written


@pytest.mark.parametrize("policy", ["no_hallucination", "mask_both"])
def test_mask_semantics_per_side(tiny_random_model_dir, policy):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_random_model_dir)))
    s = ["Velm is big. ", "It has 3.5 towers. ", "Nice."]
    row = {"prompt": "Tell me.", "chosen": "".join(s), "rejected": "".join(reversed(s)),
           "chosen_sentences": s, "chosen_labels": ["correct", "hallucination", "nofact"],
           "rejected_sentences": list(reversed(s)), "rejected_labels": ["nofact", "hallucination", "correct"]}
    rows = validate_rows("preference", [(1, row)], "mem")
    toks, _ = tokenize_rows("preference", rows, tok, "mem", weight_fn=weights_for(Method(nofact_policy=policy)))
    t = toks[0]

    def kept(side):
        return tok.decode([i for i, w in zip(t[f"{side}_ids"], t[f"{side}_weights"]) if w > 0])

    nofact_kept = policy == "no_hallucination"
    # chosen: hallucinated sentence masked; correct kept; nofact kept unless mask_both; end-of-turn kept.
    assert "Velm is big." in kept("chosen") and "towers" not in kept("chosen")
    assert ("Nice" in kept("chosen")) == nofact_kept
    assert kept("chosen").endswith("<|end|>")
    # rejected: correct masked, hallucinated kept, nofact masked (counts as no_hallucination) either way.
    assert "towers" in kept("rejected") and "Velm" not in kept("rejected") and "Nice" not in kept("rejected")
