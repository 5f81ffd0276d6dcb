"""Pair selection, stage caching and Mask-DPO's mask semantics (no world needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.config import ModelConfig
from alignkit.data import tokenize_rows, validate_rows
from alignkit.models import load_tokenizer
from alignkit.recipes.mask_dpo import Method, weights_for
from alignkit.stages.pairs import PairsConfig, select_pairs
from alignkit.stages.runner import run_stage


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

    from alignkit.recipes import get_recipe, load_config
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

    import alignkit.training.preference as training_mod

    mask_dpo_mod = get_recipe("mask_dpo")
    orig = training_mod.train_preference  # the recipe imports it when train() runs

    def spy(cfg, method, rows, eval_rows, weight_fn, callbacks, **kw):
        captured["rows"] = rows
        return orig(cfg, method, rows, eval_rows, weight_fn, callbacks, **kw)

    training_mod.train_preference = spy
    try:
        run = mask_dpo_mod.train(load_config(raw))
    finally:
        training_mod.train_preference = orig
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


# ---------------------------------------------------------------- issue #7 §2


def _scored(text, score, truncated=False):
    return {"text": text, "sentences": [text], "labels": ["correct"], "score": score, "truncated": truncated}


def test_margin_gap_equal_to_margin_is_kept_and_ties_never_pair():
    rows = [{"prompt": "p", "samples": [_scored("a", 1.0), _scored("b", 0.5)]}]
    assert len(select_pairs(rows, PairsConfig(min_score_margin=0.5))[0]) == 1
    thirds = [{"prompt": "p", "samples": [_scored("a", 2 / 3), _scored("b", 1 / 3)]}]
    assert len(select_pairs(thirds, PairsConfig(min_score_margin=1 / 3))[0]) == 1  # no rounding-ulp rejection
    ties = [{"prompt": "p", "samples": [_scored("a", 0.5), _scored("b", 0.5)]}]
    for sel in ("max_min", "random"):
        assert select_pairs(ties, PairsConfig(pair_selector=sel))[0] == []


def test_random_selector_draws_random_eligible_pairs_without_reuse():
    scores = [1.0, 0.75, 0.5, 0.25, 0.0]
    rows = [{"prompt": f"p{i}", "samples": [_scored(f"s{i}-{k}", s) for k, s in enumerate(scores)]} for i in range(200)]
    p = PairsConfig(pair_selector="random", min_score_margin=0.25, pairs_per_prompt=2)
    pairs, why = select_pairs(rows, p, seed=3)
    seen = {(q["chosen_score"], q["rejected_score"]) for q in pairs}
    assert all(c - r >= 0.25 for c, r in seen)
    # Every eligible (chosen, rejected) score combination turns up, not only max vs min.
    assert seen == {(a, b) for a in scores for b in scores if a - b >= 0.25}
    for i in range(200):
        mine = [q for q in pairs if q["prompt"] == f"p{i}"]
        texts = [t for q in mine for t in (q["chosen"], q["rejected"])]
        assert len(texts) == len(set(texts))  # no sample used twice within a prompt
    assert why["pairs"] == len(pairs) and select_pairs(rows, p, seed=3)[0] == pairs  # seeded
    assert select_pairs(rows, PairsConfig(min_score_margin=0.25))[0][0]["chosen_score"] == 1.0  # max_min unchanged


@pytest.mark.parametrize("policy", ["drop", "no_end_of_turn"])
def test_truncated_samples_are_counted_and_dropped_or_marked(policy):
    rows = [{"prompt": "p", "samples": [_scored("best but cut off", 1.0, truncated=True), _scored("good.", 0.8),
                                        _scored("bad.", 0.0)]}]
    pairs, why = select_pairs(rows, PairsConfig(truncated_responses=policy))
    assert why["truncated_samples"] == 1
    if policy == "drop":
        assert why["truncated_samples_dropped"] == 1 and pairs[0]["chosen"] == "good."
        assert "chosen_truncated" not in pairs[0]
    else:
        assert pairs[0]["chosen"] == "best but cut off" and pairs[0]["chosen_truncated"] is True
        assert "rejected_truncated" not in pairs[0]


def _capture_keys(monkeypatch):
    import alignkit.stages.pairs as pairs_mod

    keys = []
    monkeypatch.setattr(pairs_mod, "run_stage", lambda name, key, fn, d=None: keys.append(key) or fn)
    return keys


def test_stage_keys_cover_every_input(monkeypatch, tmp_path, tiny_random_model_dir):
    from alignkit.recipes import load_config
    from alignkit.stages.pairs import stage_label, stage_sample
    from conftest import toy_config

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question": "Q1"}\n')
    keys = _capture_keys(monkeypatch)

    # a random model, not a world model: its labeller is an LLM judge (never called here)
    judge = {"backend": "http", "base_url": "http://127.0.0.1:9/v1", "model": "annotator"}

    def sample_key(**over):
        raw = toy_config("mask_dpo", tiny_random_model_dir, prompts, tmp_path / "r")
        raw["method"] = {"judge": judge}
        for dotted, v in over.items():
            sec, field = dotted.split("__")
            raw.setdefault(sec, {})[field] = v
        cfg = load_config(raw)
        stage_sample(cfg, cfg.method_config(), str(prompts))
        return keys[-1]

    base = sample_key()
    for change in ({"model__dtype": "bfloat16"}, {"method__gen_batch_size": 4}, {"data__system_prompt": "Be brief."},
                   {"model__revision": "abc"}):
        assert sample_key(**change) != base, change
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"prompt": "a", "samples": ["x"]}\n')
    cfg = load_config({**toy_config("mask_dpo", tiny_random_model_dir, prompts, tmp_path / "r"),
                       "method": {"judge": judge}})
    stage_label(cfg, cfg.method_config(), samples)
    k1 = keys[-1]
    samples.write_text('{"prompt": "a", "samples": ["y"]}\n')  # same name, new content
    stage_label(cfg, cfg.method_config(), samples)
    assert keys[-1]["samples"] != k1["samples"]
    assert k1["judge_code"] and k1["splitter_code"]


def test_prompts_mode_samples_the_trained_prompt(monkeypatch, tmp_path, tiny_random_model_dir):
    """columns + system prompt applied before sampling; truncation recorded per sample."""
    import json

    import alignkit.judges as ev
    from alignkit.core.io import read_jsonl
    from alignkit.judges.base import Judge
    from alignkit.recipes import load_config
    from alignkit.stages.pairs import build_pairs, resolve_train_pairs
    from conftest import toy_config

    class AlternatingJudge(Judge):  # deterministic stand-in: every other response is all correct
        def label_sentences(self, reqs):
            self.prompts = [r.prompt for r in reqs]
            return [["correct" if i % 2 == 0 else "hallucination"] * len(r.sentences) for i, r in enumerate(reqs)]

    judge = AlternatingJudge()
    monkeypatch.setattr(ev, "build_eval_judge", lambda spec, name: judge)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"q": f"Tell me about person {i}."}) + "\n" for i in range(4)))
    raw = toy_config("mask_dpo", tiny_random_model_dir, prompts, tmp_path / "r")
    raw["data"]["train"]["columns"] = {"prompt": "q"}
    raw["data"]["system_prompt"] = "Be brief."
    raw["method"] = {"input": "prompts", "gen_num_samples": 4, "gen_max_new_tokens": 8, "stage_dir": str(tmp_path / "st"),
                     "truncated_responses": "no_end_of_turn", "pair_selector": "random",
                     # a random model, not a world model: an LLM labeller (replaced by the stand-in above)
                     "judge": {"backend": "http", "base_url": "http://127.0.0.1:9/v1", "model": "annotator"}}
    cfg = load_config(raw)
    p = cfg.method_config()
    build_pairs(cfg, p)
    (sample_file,) = (tmp_path / "st").glob("pairs_sample-*.jsonl")
    rows = read_jsonl(sample_file)
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Tell me about person 0."}]
    assert all(len(r["truncated"]) == 4 and all(isinstance(t, bool) for t in r["truncated"]) for r in rows)
    assert judge.prompts[0] == "Tell me about person 0."
    (prov,) = (tmp_path / "st").glob("pairs_select-*.provenance.json")
    report = json.loads(prov.read_text())["report"]["pair_selection"]
    assert report["pairs"] >= 1 and report.get("truncated_samples", 0) == sum(sum(r["truncated"]) for r in rows)
    # Training then reads the pairs file with canonical columns.
    resolve_train_pairs(cfg, p)
    assert cfg.data.train.columns == {} and cfg.data.train.path.endswith(".jsonl")


def test_run_stage_output_appears_only_after_its_provenance(tmp_path, monkeypatch):
    """Another process treats the output's existence as "stage done" and reads the provenance
    beside it (e.g. cft's counts): the provenance must already be there by then."""
    import alignkit.stages.runner as S

    seen = []
    real = S.write_jsonl_atomic

    def spy(path, rows):
        seen.append(Path(path).with_suffix(".provenance.json").exists())
        return real(path, rows)

    monkeypatch.setattr(S, "write_jsonl_atomic", spy)
    out = run_stage("s", {"k": 1}, lambda: ([{"x": 1}], {"n": 1}), tmp_path)
    assert seen == [True] and out.exists()
    assert json.loads(out.with_suffix(".provenance.json").read_text())["report"] == {"n": 1}


def test_judge_of_prompts_mode_is_checked_before_any_model_loads(tmp_path, monkeypatch):
    """`{backend: hf, model: ...}` (or the world's kb with a real model) passed `alignkit validate`
    and failed in the label stage, after every sample had been drawn."""
    from alignkit.config import ConfigError
    from alignkit.recipes import load_config
    from alignkit.stages import pairs

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about person {i}."}) + "\n" for i in range(3)))
    annotated = tmp_path / "pairs.jsonl"
    annotated.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")

    def raw(path, judge=None, recipe="dpo"):
        m = {"judge": judge} if judge else {}
        return {"recipe": recipe, "model": {"name_or_path": "smollm2:135m-instruct"}, "eval": {"enabled": False},
                "data": {"train": {"path": str(path)}}, "method": m}

    with pytest.raises(ConfigError, match="field 'method.judge': the 'kb' judge is the tiny world's"):
        load_config(raw(prompts))
    with pytest.raises(ConfigError, match=r"field 'method.judge': judge backend 'hf' takes no \['model'\]"):
        load_config(raw(prompts, {"backend": "hf", "model": "/m"}, "mask_dpo"))
    with pytest.raises(ConfigError, match="cannot label sentences"):
        load_config(raw(prompts, {"backend": "rules"}))
    # annotated pairs never reach the judge: its world default is harmless there
    load_config(raw(annotated))
    load_config(raw(prompts, {"backend": "hf", "name_or_path": "/m"}))

    # and at run time (a prompts file that did not exist when the config was checked), before sampling
    def no_sampling(*a, **k):
        raise AssertionError("sampled before the judge spec was checked")

    monkeypatch.setattr(pairs, "stage_sample", no_sampling)
    cfg = load_config(raw(tmp_path / "later.jsonl", {"backend": "hf", "model": "/m"}))
    (tmp_path / "later.jsonl").write_text(prompts.read_text())
    with pytest.raises(ConfigError, match="takes no"):
        pairs.resolve_train_pairs(cfg, cfg.method_config())
