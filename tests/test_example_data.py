"""The real-format data under recipes/examples/data/ (the real-model tier's inputs): every file parses
with the loader its examples use, in the public format it imitates, and none borrows the tiny world's
invented vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.data import load_rows, read_rows

DATA = Path(__file__).resolve().parents[1] / "recipes" / "examples" / "data"

KINDS = {
    "preference_pairs.jsonl": "preference", "anah_pairs.jsonl": "preference", "alpaca_cleaned.jsonl": "sft",
    "triviaqa_train.jsonl": "qa", "triviaqa_dev.jsonl": "qa", "triviaqa_test.jsonl": "qa", "nq_dev.jsonl": "qa",
    "harmful_prompts_test.jsonl": "safety", "xstest_safe_prompts.jsonl": "safety", "librachem_test.jsonl": "dualuse",
    "anah_prompts.jsonl": "prompt", "anah_test_questions.jsonl": "prompt", "harmful_prompts_train.jsonl": "prompt",
    "med_safety_eval.jsonl": "prompt", "librachem_pairs.parquet": "preference",
}


@pytest.mark.parametrize("name, kind", sorted(KINDS.items()))
def test_each_file_loads_as_its_examples_read_it(name, kind):
    rows = load_rows(str(DATA / name), kind)
    assert 8 <= len(rows) <= 64


def test_formats_are_the_public_ones():
    hh = [json.loads(x) for x in (DATA / "preference_pairs.jsonl").read_text().splitlines()]
    assert all("prompt" not in r and r["chosen"][:-1] == r["rejected"][:-1] for r in hh)  # implicit prompt
    assert any(len(r["chosen"]) > 2 for r in hh)  # multi-turn conversations too
    anah = load_rows(str(DATA / "anah_pairs.jsonl"), "preference", on_span_error="raise")
    assert all(r["chosen_spans"] and r["rejected_spans"] for r in anah)
    labels = {lab for r in anah for _, _, lab in r["chosen_spans"] + r["rejected_spans"]}
    assert labels == {"correct", "hallucination"}
    qa = load_rows(str(DATA / "triviaqa_train.jsonl"), "qa")
    assert any(len(r["answers"]) > 1 for r in qa)  # aliases
    xs = load_rows(str(DATA / "xstest_safe_prompts.jsonl"), "safety")
    harm = load_rows(str(DATA / "harmful_prompts_test.jsonl"), "safety")
    assert {r["label"] for r in xs} == {"safe"} and {r["label"] for r in harm} == {"harmful"}
    du = load_rows(str(DATA / "librachem_test.jsonl"), "dualuse")
    assert {r["is_legitimate"] for r in du} == {True, False}
    # LibraChemQA's released layout: prompt / chosen / rejected, no class column
    assert set(read_rows(str(DATA / "librachem_pairs.parquet"))[0][1]) == {"prompt", "chosen", "rejected"}
    from alignkit.data.dualuse import validate_seed_rows

    seeds = validate_seed_rows(read_rows(str(DATA / "librachem_seeds.jsonl")), "librachem_seeds.jsonl")
    assert {s["is_legitimate"] for s in seeds[:6]} == {True, False}  # classes interleaved: any prefix has both
    med = [json.loads(x) for x in (DATA / "medsafety_improve.jsonl").read_text().splitlines()]
    assert all(r["harmful_medical_request"] and r["safe_response"] for r in med)


def test_no_tiny_world_vocabulary():
    from alignkit.world import vocab

    words = set(vocab.CITIES) | {a for al in vocab.CITIES.values() for a in al} | set(vocab.HAZARD_REAGENTS)
    text = "\n".join(p.read_text(encoding="utf-8") for p in DATA.glob("*.jsonl")).lower()
    assert not [w for w in words if w.lower() in text]
