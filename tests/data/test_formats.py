"""Every dataset format TRL documents for its SFT and DPO trainers goes through the recipes'
data path (load_rows -> tokenize_rows); sentence labels; content location in templates."""

from __future__ import annotations

import json

import pytest

from alignkit.config import ModelConfig
from alignkit.data import DataError, load_rows, tokenize_rows, validate_rows
from alignkit.data.schemas import split_implicit_prompt
from alignkit.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_random_model_dir):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_random_model_dir)))


def _write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _through(tmp_path, tok, kind, rows):
    """The recipe data path: load + validate, then tokenise."""
    path = _write(tmp_path, rows)
    loaded = load_rows(path, kind)
    toks, report = tokenize_rows(kind, loaded, tok, path, max_length=None)
    assert report.rows_out == len(rows)
    return loaded, toks


USER = {"role": "user", "content": "What color is the sky?"}
BLUE, GREEN = {"role": "assistant", "content": "It is blue."}, {"role": "assistant", "content": "It is green."}

PREFERENCE_FORMATS = {
    "standard_explicit": {"prompt": "What color is the sky?", "chosen": "It is blue.", "rejected": "It is green."},
    "standard_implicit": {"chosen": "What color is the sky? It is blue.", "rejected": "What color is the sky? It is green."},
    "conversational_explicit": {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]},
    "conversational_implicit": {"chosen": [USER, BLUE], "rejected": [USER, GREEN]},
    # TRL's maybe_extract_prompt: a string prompt beside whole conversations is extracted anew.
    "string_prompt_with_conversations": {"prompt": "What color is the sky?", "chosen": [USER, BLUE],
                                         "rejected": [USER, GREEN]},
}


@pytest.mark.parametrize("fmt", sorted(PREFERENCE_FORMATS))
def test_preference_formats(tmp_path, tok, fmt):
    (row,), (t,) = _through(tmp_path, tok, "preference", [PREFERENCE_FORMATS[fmt]])
    if fmt == "standard_implicit":  # TRL's rule: the space before the first difference goes to the completions
        # ... and, as in TRL, a standard row is raw text: no chat template around the extracted prompt.
        assert row["prompt"] == "What color is the sky? It is"
        assert (row["chosen"], row["rejected"]) == (" blue.", " green.")
        assert tok.decode(t["prompt_ids"] + t["chosen_ids"]) == "What color is the sky? It is blue.<|end|>"
    else:
        assert row["prompt"] == [USER]
        assert (row["chosen"], row["rejected"]) == ("It is blue.", "It is green.")
    assert tok.decode(t["chosen_ids"]).endswith("blue.<|end|>") and t["chosen_weights"] == [1.0] * len(t["chosen_ids"])


@pytest.mark.parametrize("chosen,rejected", [
    ("What color is the sky? It is blue.", "What color is the sky? It is green."),
    ("Q: 2+2? A: 4", "Q: 2+2? A: 5"),
    ("Same start blue", "Same start black"),  # mid-word difference: TRL does not back up to the word
    ("Prefix and more", "Prefix and more text"),  # one is a prefix of the other
    ("Q?\nA: yes", "Q?\nA:  no"),
])
def test_implicit_string_prompt_matches_trl(chosen, rejected):
    from trl import extract_prompt

    ref = extract_prompt({"chosen": chosen, "rejected": rejected})
    assert split_implicit_prompt(chosen, rejected) == (ref["prompt"], ref["chosen"], ref["rejected"])


def test_no_prompt_and_no_shared_prefix_names_file_row_field(tmp_path):
    path = _write(tmp_path, [PREFERENCE_FORMATS["standard_implicit"],
                             {"chosen": "Blue.", "rejected": "Green."},
                             {"chosen": [BLUE], "rejected": [GREEN]}])
    with pytest.raises(DataError) as e:
        load_rows(path, "preference")
    msg = str(e.value)
    assert f"{path}, row 2, field 'prompt'" in msg and "no leading text" in msg
    assert f"{path}, row 3, field 'prompt'" in msg and "row 1" not in msg


SFT_FORMATS = {
    "language_modeling": {"text": "The sky is blue."},
    "conversational_language_modeling": {"messages": [USER, BLUE]},
    "prompt_completion": {"prompt": "What color is the sky?", "completion": "It is blue."},
    "conversational_prompt_completion": {"prompt": [USER], "completion": [BLUE]},
}


@pytest.mark.parametrize("fmt", sorted(SFT_FORMATS))
def test_sft_formats(tmp_path, tok, fmt):
    (row,), (t,) = _through(tmp_path, tok, "sft", [SFT_FORMATS[fmt]])
    ids, mask = t["input_ids"], t["completion_mask"]
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    if fmt == "language_modeling":
        # No prompt, no chat template: the whole text is trained, EOS appended (as TRL does).
        assert row["prompt"] == [] and all(mask)
        assert tok.decode(ids) == "The sky is blue.<|end|>"
    else:
        assert trained == "It is blue.<|end|>"
        assert tok.decode(ids).startswith("<|user|>\nWhat color is the sky?<|end|>\n<|assistant|>\n")


def test_language_modeling_text_ignores_system_prompt_and_errors_name_the_field(tmp_path):
    rows = load_rows(_write(tmp_path, [{"text": "Plain text."}]), "sft", system_prompt="Be brief.")
    assert rows[0]["prompt"] == []
    path = _write(tmp_path, [{"text": "  "}], "bad.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl, row 1, field 'text': expected a non-empty string"):
        load_rows(path, "sft")


# ---------------------------------------------------------------- sentence labels


def _pref(labels, sents=("A is big. ", "B is small. ", "C.")):
    return {"prompt": "P", "chosen": "".join(sents), "rejected": "Other.", "chosen_sentences": list(sents),
            "chosen_labels": labels}


def test_labels_case_insensitive_and_unknown_is_a_row_error():
    (row,) = validate_rows("preference", [(1, _pref([" Correct", "HALLUCINATION", "NoFact "]))], "f.jsonl")
    assert [lab for _, _, lab in row["chosen_spans"]] == ["correct", "hallucination", "nofact"]
    with pytest.raises(DataError, match=r"f.jsonl, row 1, field 'chosen_labels\[2\]': unknown sentence label 'maybe'"):
        validate_rows("preference", [(1, _pref(["correct", "correct", "maybe"]))], "f.jsonl")
    # Under Mask-DPO's drop / fallback policies it is an annotation problem, kept and counted.
    (row,) = validate_rows("preference", [(1, _pref(["correct", "correct", "maybe"]))], "f.jsonl",
                           on_span_error="keep")
    assert row["chosen_spans"] is None and row["_span_error"].startswith("chosen_labels[2]")


def test_dpo_recipe_ignores_broken_annotations(tiny_random_model_dir, tmp_path):
    from alignkit.recipes import get_recipe, load_config
    from conftest import toy_config

    bad = [{**_pref(["correct", "correct", "Maybe"]), "rejected_sentences": ["not there"],
            "rejected_labels": ["correct"]}] * 2
    raw = toy_config("dpo", tiny_random_model_dir, _write(tmp_path, bad), tmp_path / "run")
    import alignkit.training.preference as training_mod

    dpo = get_recipe("dpo")
    captured = {}
    orig = training_mod.train_preference  # the recipe imports it when train() runs
    training_mod.train_preference = lambda cfg, method, rows, *a, **kw: captured.setdefault("rows", rows) and tmp_path
    try:
        dpo.train(load_config(raw))
    finally:
        training_mod.train_preference = orig
    assert len(captured["rows"]) == 2 and captured["rows"][0]["chosen_spans"] is None
    with pytest.raises(DataError, match="chosen_labels"):  # Mask-DPO, which uses them, still refuses
        raw["recipe"] = "mask_dpo"
        get_recipe("mask_dpo").train(load_config(raw))


# ---------------------------------------------------------------- content location


THINK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}<think>\nOK.\n</think>\n{% endif %}{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_render_locates_content_after_template_text(tiny_random_model_dir):
    from transformers import AutoTokenizer

    from alignkit.data import render
    from alignkit.recipes.mask_dpo import Method, weights_for

    tok = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    tok.chat_template = THINK_TEMPLATE
    # The template's think block contains the whole answer: a first-match search would put
    # the content (and every Mask-DPO span) inside the think block.
    _, segment, offset = render(tok, [{"role": "user", "content": "Hi"}], "OK.")
    assert segment[:offset] == "<think>\nOK.\n</think>\n" and segment[offset:] == "OK.<|end|>"

    row = {"prompt": "Hi", "chosen": "OK.", "rejected": "No.", "chosen_sentences": ["OK."],
           "chosen_labels": ["hallucination"]}
    rows = validate_rows("preference", [(1, row)], "mem")
    (t,), _ = tokenize_rows("preference", rows, tok, "mem", weight_fn=weights_for(Method()))
    kept = tok.decode([i for i, w in zip(t["chosen_ids"], t["chosen_weights"]) if w > 0])
    assert kept == "<think>\nOK.\n</think>\n<|end|>"  # the content's "OK." is masked, the think block's is not


def test_truncated_response_is_trained_without_end_of_turn(tok):
    row = {"prompt": "P", "chosen": "It was founded in", "rejected": "It is old.", "chosen_truncated": True}
    rows = validate_rows("preference", [(1, row)], "mem")
    (t,), _ = tokenize_rows("preference", rows, tok, "mem")
    assert tok.decode(t["chosen_ids"]) == "It was founded in"
    assert tok.decode(t["rejected_ids"]).endswith("<|end|>")
    with pytest.raises(DataError, match="field 'chosen_truncated'"):
        validate_rows("preference", [(1, {**row, "chosen_truncated": "yes"})], "mem")
