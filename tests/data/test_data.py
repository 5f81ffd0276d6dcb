"""Loading, validation (bad data fails loudly: file, row, field, reason — all at once) and sentence splitting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.config import DataSource
from alignkit.data import DataError, load_rows, read_rows, split_sentences, split_spans, validate_rows

GOOD = {"prompt": "What is the capital of Tarnia?", "chosen": "It is Velm.", "rejected": "It is Bavoru."}


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def load_error(path: Path, kind: str = "preference", **kw) -> DataError:
    with pytest.raises(DataError) as ei:
        load_rows(str(path), kind, **kw)
    return ei.value


def assert_issue(err: DataError, file: Path, row: int | None, field: str | None, *reason_parts: str):
    """One issue of ``err`` has exactly this file/row/field, its reason contains every part,
    and the rendered message names all of them."""
    msg = str(err)
    for issue in err.issues:
        if issue.row == row and issue.field == field:
            assert issue.file == str(file)
            for part in reason_parts:
                assert part.lower() in issue.reason.lower(), (part, issue.reason)
            line = str(issue)
            assert line in msg
            assert str(file) in line
            if row is not None:
                assert f"row {row}" in line
            if field is not None:
                assert f"'{field}'" in line
            return issue
    raise AssertionError(f"no issue for row={row} field={field} in:\n{msg}")


# ----------------------------------------------------------------------------- bad input, one per test


def test_missing_field(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "q", "chosen": "a"}])
    err = load_error(p)
    assert len(err.issues) == 1
    assert_issue(err, p, 2, "rejected", "missing field")


def test_missing_mapped_field_names_the_file_column(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "good": "a"}])
    src = DataSource(path=str(p), columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    with pytest.raises(DataError) as ei:
        load_rows(src, "preference")
    assert_issue(ei.value, p, 1, "bad", "missing field", "mapped from 'rejected'")


@pytest.mark.parametrize(
    "row,field,reason",
    [
        ({**GOOD, "chosen": 5}, "chosen", "got int"),
        ({**GOOD, "prompt": 3.5}, "prompt", "got float"),
        ({**GOOD, "rejected": {"text": "x"}}, "rejected", "got dict"),
        ({**GOOD, "prompt": [{"role": "user", "content": 7}]}, "prompt[0].content", "expected a string"),
        ({**GOOD, "prompt": ["hello"]}, "prompt[0]", "expected a message"),
    ],
)
def test_wrong_type(tmp_path, row, field, reason):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, row])
    assert_issue(load_error(p), p, 3, field, reason)


@pytest.mark.parametrize("empty", ["", "   ", "\n\t"])
def test_empty_completion(tmp_path, empty):
    p = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "chosen": empty}])
    assert_issue(load_error(p), p, 1, "chosen", "empty completion")


def test_empty_sft_completion(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "ok"}, {"prompt": "q", "completion": " "}])
    assert_issue(load_error(p, "sft"), p, 2, "completion", "empty completion")


def test_chosen_identical_to_rejected(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "rejected": GOOD["chosen"]}])
    assert_issue(load_error(p), p, 2, "rejected", "identical")


def test_malformed_json_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, '{"prompt": "q", "chosen": "a",', GOOD])
    err = load_error(p)
    assert len(err.issues) == 1
    assert_issue(err, p, 2, None, "malformed JSON")


def test_jsonl_non_object_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, "[1, 2]"])
    assert_issue(load_error(p), p, 2, None, "expected a JSON object", "list")


def test_invalid_utf8_bytes(tmp_path):
    p = tmp_path / "d.jsonl"
    good = json.dumps(GOOD).encode()
    p.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n' + good + b"\n")
    err = load_error(p)
    assert len(err.issues) == 1
    assert_issue(err, p, 2, None, "invalid UTF-8")


def test_invalid_utf8_in_json_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_bytes(b'[{"prompt": "caf\xe9"}]')
    assert_issue(load_error(p), p, None, None, "invalid UTF-8")


def test_malformed_json_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"prompt": "q"},', encoding="utf-8")
    assert_issue(load_error(p), p, None, None, "malformed JSON")


def test_file_not_found(tmp_path):
    p = tmp_path / "nope.jsonl"
    assert_issue(load_error(p), p, None, None, "not found")


def test_empty_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n\n", encoding="utf-8")
    assert_issue(load_error(p), p, None, None, "no rows")


@pytest.mark.parametrize(
    "spans,field",
    [
        ([[0, 5], [5, 99]], "chosen_spans[1]"),  # past the end
        ([[-1, 3], [3, 11]], "chosen_spans[0]"),  # negative start
        ([[4, 4], [4, 11]], "chosen_spans[0]"),  # empty span
    ],
)
def test_sentence_spans_outside_text(tmp_path, spans, field):
    row = {**GOOD, "chosen_spans": spans, "chosen_labels": ["correct", "hallucination"]}
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    issue = assert_issue(load_error(p), p, 2, field)
    assert "outside" in issue.reason and "length 11" in issue.reason


def test_sentence_spans_overlapping(tmp_path):
    row = {**GOOD, "chosen_spans": [[0, 6], [3, 11]], "chosen_labels": ["correct", "correct"]}
    p = write_jsonl(tmp_path / "d.jsonl", [row])
    assert_issue(load_error(p), p, 1, "chosen_spans[1]", "overlap")


def test_sentences_not_found_in_response(tmp_path):
    row = {**GOOD, "chosen": "It is Velm. It is big.", "chosen_sentences": ["It is Velm.", "It is tiny."],
           "chosen_labels": ["correct", "hallucination"]}
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, GOOD, row])
    issue = assert_issue(load_error(p), p, 4, "chosen_sentences[1]", "not found")
    assert "It is tiny." in issue.reason


def test_sentences_out_of_order_are_not_found(tmp_path):
    row = {**GOOD, "rejected": "One. Two.", "rejected_sentences": ["Two.", "One."],
           "rejected_labels": ["correct", "correct"]}
    p = write_jsonl(tmp_path / "d.jsonl", [row])
    assert_issue(load_error(p), p, 1, "rejected_sentences[0]", "not found")


def test_sentences_and_labels_length_mismatch(tmp_path):
    row = {**GOOD, "chosen_sentences": ["It is Velm."], "chosen_labels": ["correct", "correct"]}
    p = write_jsonl(tmp_path / "d.jsonl", [row])
    assert_issue(load_error(p), p, 1, "chosen_sentences", "one label each")


@pytest.mark.parametrize("kind,field,row", [
    ("sft", "messages[1].role", {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}),
    ("preference", "prompt[0].role", {**GOOD, "prompt": [{"role": "human", "content": "q"}]}),
    ("preference", "chosen[0].role", {"prompt": [{"role": "user", "content": "q"}],
                                      "chosen": [{"role": "robot", "content": "a"}], "rejected": "b"}),
])
def test_bad_role_in_messages(tmp_path, kind, field, row):
    p = write_jsonl(tmp_path / "d.jsonl", [row])
    assert_issue(load_error(p, kind), p, 1, field, "unknown role")


def test_sft_messages_must_end_with_assistant(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "assistant", "content": "a"},
                                                         {"role": "user", "content": "q"}]}])
    assert_issue(load_error(p, "sft"), p, 1, "messages", "last message")


def test_all_errors_of_a_file_reported_together(tmp_path):
    rows = [
        GOOD,
        {"prompt": "q", "chosen": "a"},  # row 2: missing field
        GOOD,
        {**GOOD, "chosen": 12},  # row 4: wrong type
        {**GOOD, "rejected": GOOD["chosen"]},  # row 5: identical
        GOOD,
    ]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    err = load_error(p)
    assert len(err.issues) == 3
    assert str(err).startswith("3 data error(s)")
    assert_issue(err, p, 2, "rejected", "missing field")
    assert_issue(err, p, 4, "chosen", "got int")
    assert_issue(err, p, 5, "rejected", "identical")


def test_read_errors_all_reported_together(tmp_path):
    p = tmp_path / "d.jsonl"
    good = json.dumps(GOOD).encode()
    p.write_bytes(b"\n".join([good, b"{bad json", good, b"\xff\xfe", b"42", good]) + b"\n")
    err = load_error(p)
    assert [(i.row, i.field) for i in err.issues] == [(2, None), (4, None), (5, None)]
    assert_issue(err, p, 2, None, "malformed JSON")
    assert_issue(err, p, 4, None, "invalid UTF-8")
    assert_issue(err, p, 5, None, "expected a JSON object")


def test_read_and_schema_errors_of_one_file_reported_together(tmp_path):
    """A malformed line must not hide the schema errors of the other rows of the same file."""
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, "{not json", {"prompt": "q", "chosen": "a"}])
    err = load_error(p)
    assert_issue(err, p, 2, None, "malformed JSON")
    assert_issue(err, p, 3, "rejected", "missing field")


def test_max_errors_caps_the_list_and_counts_the_rest(tmp_path):
    rows = [GOOD] + [{"prompt": "q", "chosen": f"a{i}"} for i in range(7)]  # rows 2..8 bad
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    err = load_error(p, max_errors=3)
    assert len(err.issues) == 3
    assert [i.row for i in err.issues] == [2, 3, 4]
    msg = str(err)
    assert msg.startswith("7 data error(s)")
    assert "... and 4 more" in msg
    assert "row 5" not in msg
    # through a read error cap as well
    q = write_jsonl(tmp_path / "e.jsonl", ["{x"] * 5)
    err = load_error(q, max_errors=2)
    assert len(err.issues) == 2 and "... and 3 more" in str(err)


def test_row_numbers_are_line_numbers_with_blank_lines(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", "  ", {**GOOD, "chosen": ""}])
    assert_issue(load_error(p), p, 4, "chosen", "empty")


def test_json_list_row_numbers(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"data": [GOOD, GOOD, {**GOOD, "chosen": None}]}), encoding="utf-8")
    assert_issue(load_error(p), p, 3, "chosen", "got NoneType")


# ----------------------------------------------------------------------------- formats


ROWS = [
    {"prompt": "What is the capital of Tarnia?", "chosen": "Velm.", "rejected": "Bavoru.", "id": "a"},
    {"prompt": "Who is Bavoru Telkin?", "chosen": "A poet, born in 1921.", "rejected": "A city.", "id": "b"},
    {"prompt": "Say hi", "chosen": "Hi! \"Quoted\", comma", "rejected": "No, café", "id": "c"},
]


def _write_all_formats(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    import datasets

    paths = {}
    paths["jsonl"] = write_jsonl(tmp_path / "d.jsonl", rows)
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(rows), encoding="utf-8")
    paths["json_data"] = tmp_path / "wrapped.json"
    paths["json_data"].write_text(json.dumps({"data": rows, "version": 1}), encoding="utf-8")
    ds = datasets.Dataset.from_list(rows)
    paths["parquet"] = tmp_path / "d.parquet"
    ds.to_parquet(str(paths["parquet"]))
    paths["disk"] = tmp_path / "saved"
    ds.save_to_disk(str(paths["disk"]))
    paths["disk_dict"] = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(paths["disk_dict"]))
    return paths


def test_all_formats_load_the_same_rows(tmp_path):
    paths = _write_all_formats(tmp_path, ROWS)
    import csv

    paths["csv"] = tmp_path / "d.csv"
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    expected = [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["chosen"], "rejected": r["rejected"],
         "chosen_spans": None, "rejected_spans": None, "id": r["id"], "_row": i}
        for i, r in enumerate(ROWS, start=1)
    ]
    for fmt, p in paths.items():
        got = load_rows(str(p), "preference")
        assert got == expected, fmt
    # a DatasetDict folder: the split is chosen
    test_rows = load_rows(DataSource(path=str(paths["disk_dict"]), split="test"), "preference")
    assert test_rows == expected[:1]


def test_conversational_rows_survive_parquet_and_disk(tmp_path):
    rows = [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}],
         "chosen": [{"role": "assistant", "content": "Velm."}],
         "rejected": [{"role": "assistant", "content": "Bavoru."}]},
        {"prompt": [{"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
    ]
    paths = _write_all_formats(tmp_path, rows)
    ref = load_rows(str(paths["jsonl"]), "preference")
    assert ref[0]["prompt"] == rows[0]["prompt"] and ref[0]["chosen"] == "Velm."
    for fmt, p in paths.items():
        assert load_rows(str(p), "preference") == ref, fmt


def test_explicit_format_and_limit(tmp_path):
    p = tmp_path / "data.txt"
    write_jsonl(p, ROWS)
    with pytest.raises(ValueError, match="format"):
        load_rows(str(p), "preference")
    got = load_rows(DataSource(path=str(p), format="jsonl", limit=2), "preference")
    assert [r["id"] for r in got] == ["a", "b"]


def test_read_rows_returns_one_based_row_numbers(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert [i for i, _ in read_rows(str(p))] == [1, 2, 3]


# ----------------------------------------------------------------------------- schemas


def _v(kind, rows, **kw):
    return validate_rows(kind, list(enumerate(rows, start=1)), "mem.jsonl", **kw)


def test_sft_standard_prompt_completion():
    (r,) = _v("sft", [{"prompt": "2+2?", "completion": "4"}])
    assert r["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert r["completion"] == "4" and r["_row"] == 1


def test_sft_conversational_prompt_completion():
    (r,) = _v("sft", [{"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                       "completion": [{"role": "assistant", "content": "A"}]}])
    assert r["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert r["completion"] == "A"


def test_sft_conversational_completion_must_be_one_assistant_message():
    with pytest.raises(DataError, match="exactly one assistant message"):
        _v("sft", [{"prompt": "Q", "completion": [{"role": "user", "content": "A"}]}])


def test_sft_messages():
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    (r,) = _v("sft", [{"messages": msgs}])
    assert r["prompt"] == msgs[:-1]
    assert r["completion"] == "A2"
    assert "messages" not in r or r["messages"] == msgs  # metadata may be kept, but not as a training field


def test_sft_common_aliases():
    (r,) = _v("sft", [{"instruction": "Do X", "output": "Done."}])
    assert r["prompt"] == [{"role": "user", "content": "Do X"}] and r["completion"] == "Done."


def test_preference_explicit_prompt_conversational():
    (r,) = _v("preference", [{"prompt": [{"role": "user", "content": "Q"}],
                              "chosen": [{"role": "assistant", "content": "good"}],
                              "rejected": [{"role": "assistant", "content": "bad"}]}])
    assert r["prompt"] == [{"role": "user", "content": "Q"}]
    assert (r["chosen"], r["rejected"]) == ("good", "bad")


def test_preference_implicit_prompt():
    sys_ = {"role": "system", "content": "S"}
    u = {"role": "user", "content": "Q"}
    row = {"chosen": [sys_, u, {"role": "assistant", "content": "good"}],
           "rejected": [sys_, u, {"role": "assistant", "content": "bad"}]}
    (r,) = _v("preference", [row])
    assert r["prompt"] == [sys_, u]
    assert (r["chosen"], r["rejected"]) == ("good", "bad")


def test_preference_implicit_prompt_needs_conversations():
    with pytest.raises(DataError) as ei:
        _v("preference", [{"chosen": "a", "rejected": "b"}])
    assert ei.value.issues[0].field == "prompt"


def test_column_mapping():
    rows = [{"q": "Question?", "good": "Yes.", "bad": "No.", "extra": 1}]
    (r,) = _v("preference", rows, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert r["prompt"] == [{"role": "user", "content": "Question?"}]
    assert (r["chosen"], r["rejected"]) == ("Yes.", "No.")
    assert r["extra"] == 1
    assert not {"q", "good", "bad"} & set(r)


def test_column_mapping_through_load_rows(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q", "resp": "A"}])
    (r,) = load_rows(DataSource(path=str(p), columns={"prompt": "instruction", "completion": "resp"}), "sft")
    assert r["prompt"] == [{"role": "user", "content": "Q"}] and r["completion"] == "A"


def test_system_prompt_prepended():
    rows = [GOOD, {**GOOD, "prompt": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Q"}]}]
    r1, r2 = _v("preference", rows, system_prompt="You are careful.")
    assert r1["prompt"] == [{"role": "system", "content": "You are careful."},
                            {"role": "user", "content": GOOD["prompt"]}]
    assert r2["prompt"][0] == {"role": "system", "content": "Own."} and len(r2["prompt"]) == 2
    (s,) = _v("sft", [{"prompt": "Q", "completion": "A"}], system_prompt="Sys")
    assert s["prompt"][0] == {"role": "system", "content": "Sys"}


def test_system_prompt_via_load_rows(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    (r,) = load_rows(str(p), "preference", system_prompt="Be factual.")
    assert r["prompt"][0] == {"role": "system", "content": "Be factual."}


def test_sentence_annotations_become_exact_char_spans():
    chosen = "Velm is the capital. It has 3.5 million people.  It is old."
    row = {**GOOD, "chosen": chosen,
           "chosen_sentences": ["Velm is the capital.", "It has 3.5 million people.", "It is old."],
           "chosen_labels": ["no_hallucination", "hallucination", "unverifiable"],
           "rejected_spans": [[0, 3], [3, 13]], "rejected_labels": ["correct", 0]}
    (r,) = _v("preference", [row])
    spans = r["chosen_spans"]
    assert [chosen[s:e] for s, e, _ in spans] == row["chosen_sentences"]
    assert [lab for *_, lab in spans] == ["correct", "hallucination", "hallucination"]
    assert r["rejected_spans"] == [(0, 3, "correct"), (3, 13, "hallucination")]
    assert not any(k.startswith("chosen_s") for k in r if k != "chosen_spans")


def test_anah_item_form():
    row = {**GOOD, "chosen": "A. B.", "chosen_item": {"sents": ["A.", "B."], "type": ["hallucination", "nofact"]}}
    (r,) = _v("preference", [row])
    assert r["chosen_spans"] == [(0, 2, "hallucination"), (3, 5, "nofact")]


def test_span_errors_kept_when_asked():
    row = {**GOOD, "chosen_sentences": ["Not there."], "chosen_labels": ["correct"]}
    (r,) = _v("preference", [row], on_span_error="keep")
    assert r["chosen_spans"] is None and "chosen_sentences[0]" in r["_span_error"]
    with pytest.raises(DataError):
        _v("preference", [row])


# ----------------------------------------------------------------------------- sentence splitting


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Dr. Smith went home. He slept.", ["Dr. Smith went home. ", "He slept."]),
        ("J. R. R. Tolkien wrote it. It is long.", ["J. R. R. Tolkien wrote it. ", "It is long."]),
        ("It costs 3.5 dollars. Cheap!", ["It costs 3.5 dollars. ", "Cheap!"]),
        ("Pi is 3.14159 roughly. Yes.", ["Pi is 3.14159 roughly. ", "Yes."]),
        ('"Really?" she asked. Yes.', ['"Really?" she asked. ', "Yes."]),
        ('He said "Stop." Then he left.', ['He said "Stop." ', "Then he left."]),
        ("It works (mostly.) Then it broke.", ["It works (mostly.) ", "Then it broke."]),
        ("Line one\nLine two.", ["Line one\n", "Line two."]),
        ("First.\n\nSecond.", ["First.\n\n", "Second."]),
        ("Wait... what happened? Nothing.", ["Wait... what happened? ", "Nothing."]),
        ("No final punctuation", ["No final punctuation"]),
        ("One. Two", ["One. ", "Two"]),
        ("Really?! Yes.", ["Really?! ", "Yes."]),
        ("The U.S. is big. Mr. and Mrs. Velm agree, e.g. here.", ["The U.S. is big. ",
                                                                 "Mr. and Mrs. Velm agree, e.g. here."]),
        ("Trailing space. ", ["Trailing space. "]),
        ("Velm是首都。它很大。", ["Velm是首都。", "它很大。"]),
    ],
)
def test_split_sentences(text, expected):
    got = split_sentences(text)
    assert "".join(got) == text
    assert got == expected


@pytest.mark.parametrize("text", [
    "", " ", "\n", "...", "A.B.C. d. E", "x\n\n\ny", "Hello.  \n\nWorld.  ", "  leading. Space",
    "Bavoru Telkin was born in 1921. He wrote 3 books... \"Why?\" 'Because.'\nEnd",
])
def test_split_spans_tile_text(text):
    spans = split_spans(text)
    if text:
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (_, b), (c, _) in zip(spans, spans[1:]):
        assert b == c
    assert all(s < e for s, e in spans)
    assert "".join(split_sentences(text)) == text


def test_where_selects_rows_before_limit_and_errors_name_the_files_row(tmp_path):
    """DataSource.where keeps the rows whose columns equal its values, before `limit`; an error in a
    kept row still names that row's number in the file; no matching row is an error naming the file."""
    p = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "knowledge": "known" if i % 2 else "unknown"} for i in range(6)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_rows(DataSource(path=str(p), where={"knowledge": "known"}, limit=2), "sft")
    assert [r["prompt"][0]["content"] for r in got] == ["q1", "q3"]
    rows[5]["completion"] = ""
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"row 6\b.*completion|completion.*row 6\b"):
        load_rows(DataSource(path=str(p), where={"knowledge": "known"}), "sft")
    with pytest.raises(ValueError, match=r"sft.jsonl: no row has \{'knowledge': 'partial'\}"):
        load_rows(DataSource(path=str(p), where={"knowledge": "partial"}), "sft")
