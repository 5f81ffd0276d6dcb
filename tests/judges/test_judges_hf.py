from __future__ import annotations

import pytest

from alignkit.judges import JudgeRequest, build_judge
from alignkit.judges.base import SENTENCE_LABELS
from alignkit.judges.prompts import PromptJudge, parse_sentence_label, parse_yes_no, render, resolve_templates


class ScriptedJudge(PromptJudge):
    """The shared template/parse logic with canned replies in place of a model."""

    name = "scripted"

    def __init__(self, replies, **kw):
        super().__init__(**kw)
        self.replies = list(replies)
        self.seen = []

    def complete(self, conversations):
        self.seen.extend(conversations)
        out, self.replies = self.replies[: len(conversations)], self.replies[len(conversations) :]
        return out


def test_parsers_on_hand_written_outputs():
    assert parse_sentence_label("ok") == "correct"
    assert parse_sentence_label("Verdict: Contradictory.") == "hallucination"
    assert parse_sentence_label("unverifiable - no source") == "hallucination"
    assert parse_sentence_label("<No Facts>") == "nofact"
    assert parse_sentence_label("nofact") == "nofact"
    assert parse_sentence_label("The sentence has no facts to check") == "nofact"
    assert parse_sentence_label("okay") is None and parse_sentence_label("") is None
    assert parse_yes_no("Yes.") is True and parse_yes_no("no, it does not") is False
    assert parse_yes_no("The answer: YES") is True and parse_yes_no("nope") is None


def test_prompt_judge_maps_labels_and_counts_parse_failures():
    j = ScriptedJudge(["ok", "contradictory", "garbage", "<No Facts>"])
    reqs = [
        JudgeRequest(
            prompt="Tell me about X.",
            response="A. B. C.",
            sentences=["A.", "B.", "C."],
            meta={"document": "X was born in Velm."},
        ),
        JudgeRequest(prompt="Tell me about Y.", response="D.", sentences=["D."]),
        JudgeRequest(prompt="Tell me about Z.", response="", sentences=[]),
    ]
    assert j.label_sentences(reqs) == [["correct", "hallucination", "nofact"], ["nofact"], []]
    assert j.parse_failures["label_sentences"] == 1
    first = j.seen[0][-1]["content"]
    assert "Sentence to judge: A." in first and "Reference document:\nX was born in Velm." in first
    assert "Reference document" not in j.seen[3][-1]["content"]

    strict = ScriptedJudge(["???"], parse_fallbacks={"label_sentences": "hallucination"}, system_prompt="sys")
    assert strict.label_sentences(reqs[1:2]) == [["hallucination"]]
    assert strict.seen[0][0] == {"role": "system", "content": "sys"}


def test_prompt_judge_boolean_tasks_and_templates():
    j = ScriptedJudge(["yes", "No.", "maybe"], prompt_templates={"is_refusal": "R: {response} | {golds}"})
    reqs = [JudgeRequest(prompt="q", response=f"r{i}", golds=["g1", "g2"]) for i in range(3)]
    assert j.is_refusal(reqs) == [True, False, False]
    assert j.parse_failures["is_refusal"] == 1
    assert j.seen[0][-1]["content"] == "R: r0 | g1 | g2"
    with pytest.raises(ValueError, match="unknown field"):
        resolve_templates({"is_harmful": "{answer}"})
    with pytest.raises(ValueError, match="unknown task"):
        resolve_templates({"is_funny": "{response}"})
    with pytest.raises(ValueError, match="no gold"):
        j.is_correct([JudgeRequest(prompt="q", response="r")])
    assert "Gold answer(s): a | b" in render(
        resolve_templates(None)["is_correct"], JudgeRequest(prompt="q", response="r", golds=["a", "b"])
    )


def test_hf_judge_with_random_model(tiny_random_model_dir):
    j = build_judge({"backend": "hf", "model_or_path": str(tiny_random_model_dir), "max_new_tokens": 4})
    reqs = [
        JudgeRequest(
            prompt="Tell me about Velm.",
            response="Velm is a city. It is old.",
            sentences=["Velm is a city.", " It is old."],
        ),
        JudgeRequest(prompt="Who?", response="Bavoru.", sentences=["Bavoru."], golds=["Bavoru"]),
    ]
    labels = j.label_sentences(reqs)
    assert [len(x) for x in labels] == [2, 1]
    assert all(lab in SENTENCE_LABELS for x in labels for lab in x)
    assert len(j.last_raw) == 3 and all(isinstance(r, str) for r in j.last_raw)
    assert 0 <= j.parse_failures["label_sentences"] <= 3
    got = j.is_correct(reqs[1:])
    assert len(got) == 1 and isinstance(got[0], bool)
    # Greedy: the same question gives the same raw reply.
    j.is_refusal(reqs)
    raw = list(j.last_raw)
    j.is_refusal(reqs)
    assert j.last_raw == raw


def test_hf_judge_needs_tokenizer_with_model_object(tiny_random_model_dir):
    from transformers import AutoModelForCausalLM

    from alignkit.judges.hf import HFJudge

    model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir)
    with pytest.raises(ValueError, match="tokenizer"):
        HFJudge(model)
