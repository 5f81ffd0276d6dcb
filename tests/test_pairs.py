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


def test_incorrect_label_is_a_hallucination():
    from alignkit.data.schemas import LABEL_MAP

    assert LABEL_MAP["incorrect"] == "hallucination" and LABEL_MAP[True] == "correct"


def test_fallback_unmasked_trains_the_whole_pair_unmasked(tiny_random_model_dir, tmp_path):
    import json

    from alignkit.config import load_config
    from alignkit.recipes import get_recipe
    from conftest import toy_config

    good = {"prompt": "P", "chosen": "A is in Velm. B.", "rejected": "A is in Tarn. C.",
            "chosen_sentences": ["A is in Velm. ", "B."], "chosen_labels": ["correct", "hallucination"],
            "rejected_sentences": ["A is in Tarn. ", "C."], "rejected_labels": ["hallucination", "correct"]}
    bad = {**good, "rejected_sentences": ["A is in Tarn. ", "NOT THERE."]}  # chosen side locatable, rejected not
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [good] * 3 + [bad]))
    raw = toy_config("mask_dpo", tiny_random_model_dir, data, tmp_path / "run", max_steps=1)
    raw["method"] = {"on_mask_mismatch": "fallback_unmasked"}
    captured = {}

    mask_dpo_mod = get_recipe("mask_dpo")
    orig = mask_dpo_mod.train_preference

    def spy(cfg, method, rows, eval_rows, weight_fn, callbacks):
        captured["rows"] = rows
        return orig(cfg, method, rows, eval_rows, weight_fn, callbacks)

    mask_dpo_mod.train_preference = spy
    try:
        run = mask_dpo_mod.train(load_config(raw))
    finally:
        mask_dpo_mod.train_preference = orig
    rows = captured["rows"]
    assert [r["chosen_spans"] is None and r["rejected_spans"] is None for r in rows] == [False] * 3 + [True]
    rep = json.loads((run / "mask_report.json").read_text())
    assert rep["rows_without_usable_annotations"] == 1 and "NOT THERE" in rep["examples"][0]


def test_template_problem_is_a_row_error(tiny_random_model_dir):
    from transformers import AutoTokenizer

    from alignkit.data import DataError

    tok = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    rows = validate_rows("sft", [(1, {"prompt": "a", "completion": "ok"}), (2, {"prompt": "b", "completion": "x\n"})],
                         "f.jsonl")
    with pytest.raises(DataError, match=r"f.jsonl, row 2.*altered the assistant content"):
        tokenize_rows("sft", rows, tok, "f.jsonl")
