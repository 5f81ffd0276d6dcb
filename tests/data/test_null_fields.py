"""A null in a field a data kind reads is a row error (file, row, field) when other rows of the
same file give that field; TRL's implicit formats are files *without* the column."""

from __future__ import annotations

import pytest
from test_data import assert_issue, load_error, write_jsonl

from alignkit.data import load_rows

# kind -> (a good row, the field set to null in row 3)
CASES = {
    "sft": ({"prompt": "What is the capital of Norland?", "completion": "It is Vel."}, "prompt"),
    "sft-messages": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
                     "messages"),
    "sft-text": ({"text": "The capital of Norland is Vel."}, "text"),
    "preference": ({"prompt": "Where is Vel?", "chosen": "The capital of Norland is Vel 3.",
                    "rejected": "The capital of Norland is Tam 3."}, "prompt"),
    "preference-chosen": ({"prompt": "Where is Vel?", "chosen": "In Norland.", "rejected": "In Tamia."}, "chosen"),
    "prompt": ({"prompt": "Tell me about Vel."}, "prompt"),
    "qa": ({"question": "Where is Vel?", "answers": ["Norland"]}, "answers"),
    "qa-question": ({"question": "Where is Vel?", "answer": "Norland"}, "question"),
    "safety": ({"prompt": "How do I bake bread?", "label": "benign"}, "label"),
    "safety-response": ({"prompt": "How do I bake bread?", "label": "benign", "response": "Knead it."}, "response"),
    "dualuse": ({"prompt": "How is Vexol made?", "label": "legitimate"}, "label"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_null_field_is_a_row_error(tmp_path, case):
    kind = case.split("-")[0]
    good, field = CASES[case]
    rows = [dict(good), dict(good), {**good, field: None}, dict(good)]
    p = write_jsonl(tmp_path / f"{case}.jsonl", rows)
    err = load_error(p, kind)
    assert len(err.issues) == 1, str(err)
    assert_issue(err, p, 3, field, "null", "other rows")


def test_issue_example_null_prompt_is_not_an_implicit_prompt(tmp_path):
    """The issue's file: TRL's implicit-prompt rule would take "The capital of Norland is " from the
    shared prefix of row 3; with a prompt column in the file, the null is the user's error."""
    good = CASES["preference"][0]
    rows = [good, good, {"prompt": None, "chosen": "The capital of Norland is Vel 3.",
                         "rejected": "The capital of Norland is Tam 3."}]
    p = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert_issue(load_error(p), p, 3, "prompt", "null")
    # the same row in a file with no prompt column is TRL's implicit format, and loads
    q = write_jsonl(tmp_path / "implicit.jsonl", [{k: v for k, v in rows[2].items() if k != "prompt"}])
    (row,) = load_rows(str(q), "preference")
    assert row["prompt"] == "The capital of Norland is" and row["chosen"] == " Vel 3."


def test_null_in_a_column_no_row_gives_is_absent(tmp_path):
    """A column that is null in every row is an absent column (parquet writes one for every
    field), not an error."""
    good = {"question": "Where is Vel?", "answers": ["Norland"], "answer": None}
    p = write_jsonl(tmp_path / "qa.jsonl", [good, good])
    assert len(load_rows(str(p), "qa")) == 2


def test_null_annotation_among_annotated_rows(tmp_path):
    """Preference annotations: a span error (raised, or kept for Mask-DPO's on_mask_mismatch to
    count), and never read where the recipe ignores annotations (plain DPO)."""
    ann = {"prompt": "Tell me about Vel.", "chosen": "Vel is in Norland. It is old.", "rejected": "Vel is in Tamia.",
           "chosen_sentences": ["Vel is in Norland.", "It is old."], "chosen_labels": ["correct", "correct"]}
    rows = [ann, {**ann, "chosen_sentences": None}]
    p = write_jsonl(tmp_path / "ann.jsonl", rows)
    assert_issue(load_error(p), p, 2, "chosen_sentences", "null", "annotated")
    kept = load_rows(str(p), "preference", on_span_error="keep")
    assert "_span_error" not in kept[0] and "chosen_sentences" in kept[1]["_span_error"]
    assert len(load_rows(str(p), "preference", on_span_error="ignore")) == 2
