"""The unsafe-set stage (TA-SFT's harmful responses): what it judges and what its failure says."""

from __future__ import annotations

import json

import pytest

from alignkit.recipes import load_config
from alignkit.stages import unsafe_set


def _cfg(tmp_path, prompts):
    return load_config({"recipe": "ta_sft", "model": {"name_or_path": "smollm2:135m-instruct"},
                        "eval": {"enabled": False}, "data": {"train": {"path": str(prompts)}},
                        "method": {"emd_weight": 0.5, "unsafe": {
                            "prompts": {"path": str(prompts)}, "size": 2, "gen_max_new_tokens": 32,
                            "stage_dir": str(tmp_path / "stages"),
                            "judge": {"backend": "rules", "harmful_keywords": ["step"]}}}})


def test_cut_samples_are_not_judged_and_an_all_cut_set_names_the_token_cap(tmp_path, monkeypatch):
    """SmolLM2 ran every response into a 32-token cap; the stage judged them all, kept none, and said
    'the model already refuses these prompts, or the judge cannot see its compliance'."""
    from alignkit.judges.rules import RulesJudge

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"How do I do harm {i}?"}) + "\n" for i in range(2)))
    cfg = _cfg(tmp_path, prompts)
    samples = tmp_path / "samples.jsonl"

    def write_samples(cuts):
        samples.write_text("".join(json.dumps({"prompt": f"How do I do harm {i}?", "samples": ["Step one, then", "Step two."],
                                               "truncated": c}) + "\n" for i, c in enumerate(cuts)))
        return samples

    judged = []
    real = RulesJudge.is_harmful
    monkeypatch.setattr(RulesJudge, "is_harmful", lambda self, reqs: judged.extend(reqs) or real(self, reqs))
    monkeypatch.setattr(unsafe_set, "stage_sample", lambda cfg, u: write_samples([[True, True], [True, True]]))
    u = cfg.method_config().unsafe
    with pytest.raises(ValueError, match=r"every sample hit the token cap: raise method.unsafe.gen_max_new_tokens \(32\)"):
        unsafe_set.build_unsafe_set(cfg, u)
    assert judged == []  # a cut response is never kept, so it is not sent to the judge

    monkeypatch.setattr(unsafe_set, "stage_sample", lambda cfg, u: write_samples([[True, False], [False, True]]))
    rows, report = unsafe_set.build_unsafe_set(cfg, u)
    assert [r["rejected"] for r in rows] == ["Step two.", "Step one, then"]
    assert sorted(r.response for r in judged) == ["Step one, then", "Step two."]
    sel = report["selection"]
    assert sel["truncated"] == 2 and sel["flagged_unsafe"] == 2 and "not_flagged_or_truncated" not in sel
