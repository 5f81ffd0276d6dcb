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


def test_hf_judge_takes_name_or_path_like_every_other_loader(tiny_random_model_dir):
    # {backend: hf, name_or_path: ...} passed validation and then failed at run time:
    # "HFJudge.__init__() got an unexpected keyword argument 'name_or_path'"
    j = build_judge({"backend": "hf", "name_or_path": str(tiny_random_model_dir), "max_new_tokens": 2})
    assert len(j.is_refusal([JudgeRequest(prompt="q", response="r")])) == 1
    with pytest.raises(ValueError, match="not both"):
        build_judge({"backend": "hf", "name_or_path": str(tiny_random_model_dir),
                     "model_or_path": str(tiny_random_model_dir)})


def test_judge_spec_problems_name_the_field_without_building_anything():
    from alignkit.judges.specs import judge_spec_problems

    assert judge_spec_problems({"backend": "hf", "name_or_path": "/nowhere"}, "eval.judge") == []
    assert judge_spec_problems({"backend": "hf", "model_or_path": "/nowhere"}, "eval.judge") == []
    p = judge_spec_problems({"backend": "hf", "model": "smollm2:135m-instruct"}, "method.judge")
    assert any("field 'method.judge': judge backend 'hf' takes no ['model']; the model is name_or_path" in x
               for x in p)
    assert any("needs ['name_or_path']" in x for x in p)
    assert judge_spec_problems({"backend": "http", "base_url": "http://127.0.0.1:9/v1"}, "eval.judge") == [
        "field 'eval.judge': judge backend 'http' needs ['model']"]
    assert "unknown judge backend 'gpt'" in judge_spec_problems({"backend": "gpt"}, "eval.judge")[0]
    # the tiny world's kb for a model that is not a world model; fine for world:tiny
    kb = judge_spec_problems({"backend": "kb"}, "method.judge", "smollm2:135m-instruct")
    assert kb and "the 'kb' judge is the tiny world's knowledge base" in kb[0]
    assert judge_spec_problems({"backend": "kb"}, "method.judge", "world:tiny?seed=2") == []
    # what the use asks of it
    assert "cannot label sentences" in judge_spec_problems({"backend": "rules"}, "method.judge",
                                                           needs=("label_sentences",))[0]
    assert judge_spec_problems({"backend": "rules", "harmful_keywords": ["x"]}, "j", needs=("is_harmful",)) == []


def test_build_eval_judge_never_judges_a_real_model_with_the_world_kb():
    from alignkit.judges import build_eval_judge

    with pytest.raises(ValueError, match="tiny world's knowledge base"):
        build_eval_judge({"backend": "kb"}, "smollm2:135m-instruct")
    with pytest.raises(ValueError, match="tiny world's knowledge base"):
        build_eval_judge({}, "/models/llama")


def test_unparsable_judge_replies_are_reported(caplog):
    # A judge model that ignores the template turned every sentence into 'nofact' and the factuality
    # score into NaN without a word (SmolLM2: "- no: the sentence states facts that").
    j = ScriptedJudge(["- no: the sentence states facts that", "ok"])
    reqs = [JudgeRequest(prompt="q", response="A. B.", sentences=["A.", "B."])]
    with caplog.at_level("WARNING", logger="alignkit.judges.prompts"):
        assert j.label_sentences(reqs) == [["nofact", "correct"]]
    msg = caplog.text
    assert "1 of 2 label_sentences replies could not be parsed and count as 'nofact'" in msg
    assert "- no: the sentence states facts that" in msg
    caplog.clear()
    with caplog.at_level("WARNING", logger="alignkit.judges.prompts"):
        ScriptedJudge(["yes"]).is_refusal([JudgeRequest(prompt="q", response="r")])
    assert "could not be parsed" not in caplog.text


def test_a_negated_verdict_word_is_not_a_correct_label():
    # SmolLM2 as annotator: "The statement is not supported by the reference" was read as 'correct'
    assert parse_sentence_label("The statement is not supported by the reference") == "hallucination"
    assert parse_sentence_label("It isn't correct.") == "hallucination"
    assert parse_sentence_label("not entirely accurate") == "hallucination"
    assert parse_sentence_label("Supported by the reference.") == "correct"
    assert parse_sentence_label("ok, nothing wrong") == "correct"
    assert parse_sentence_label("Not contradictory") == "hallucination"  # only 'correct' words are flipped
