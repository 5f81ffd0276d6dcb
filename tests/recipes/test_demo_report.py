"""The demo's statistics and report from per-prompt eval records (no model, no training)."""

from __future__ import annotations

import json

import pytest

from alignkit.demo import claim_line, section_stats, write_report
from alignkit.metrics.records import metric_ci, paired_difference, per_prompt
from alignkit.recipes import get_recipe


def _bio_records(per_prompt_labels, n_prompts=30, k=4):
    return [{"prompt_index": i, "sample": j, "prompt": f"Tell me about P{i}.", "response": "...",
             "sentences": ["s"] * len(per_prompt_labels(i, j)), "labels": per_prompt_labels(i, j)}
            for i in range(n_prompts) for j in range(k)]


def _write(d, name, records):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"eval_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_per_prompt_sums_samples_and_pairs_by_prompt():
    recs = _bio_records(lambda i, j: ["correct", "hallucination", "nofact"] if j else ["correct"], n_prompts=3)
    pp = per_prompt("factuality", recs, "score")
    assert pp == {0: (4.0, 7.0), 1: (4.0, 7.0), 2: (4.0, 7.0)}  # 4 samples of a prompt summed
    assert per_prompt("factuality", recs, "correct_per_response")[0] == (4.0, 4.0)
    assert per_prompt("factuality", recs, "n_correct") is None  # a count, not a per-prompt ratio
    assert metric_ci("factuality", recs, "score")["value"] == pytest.approx(4 / 7)
    qa = [{"prompt_index": i, "prompt": f"q{i}", "knowledge": "known" if i % 2 else "unknown",
           "correct": i % 2 == 1, "refusal": False} for i in range(10)]
    assert metric_ci("qa", qa, "accuracy/known")["value"] == 1.0
    assert metric_ci("qa", qa, "accuracy")["value"] == 0.5
    other = [dict(r, prompt="different") for r in qa]
    with pytest.raises(ValueError, match="different prompts"):
        paired_difference("qa", qa, other, "accuracy")


def test_section_stats_and_report(tmp_path):
    demo = get_recipe("mask_dpo").DEMO
    base = _bio_records(lambda i, j: ["correct", "hallucination", "hallucination", "nofact"])
    better = _bio_records(lambda i, j: ["correct", "correct", "hallucination"] if (i + j) % 3 else ["correct"])
    dirs = {"base": tmp_path / "b", "DPO": tmp_path / "d", "Mask-DPO": tmp_path / "m"}
    for label, recs in (("base", base), ("DPO", better), ("Mask-DPO", better)):
        for ev in ("bio_test", "bio_val"):
            _write(dirs[label], ev, recs)
    stats = section_stats(demo, {"bio_test": "factuality", "bio_val": "factuality"}, dirs)
    lo, hi = stats["ci"]["base"]["bio_test:score"]
    assert lo <= 1 / 3 <= hi
    by = {(c["a"], c["b"]): c for c in stats["claims"]}
    assert by["Mask-DPO", "DPO"]["verdict"] == "within noise"  # identical models: CI [0, 0]
    assert (by["Mask-DPO", "DPO"]["lo"], by["Mask-DPO", "DPO"]["hi"]) == (0.0, 0.0)
    assert by["DPO", "base"]["verdict"] == "beyond noise" and by["DPO", "base"]["lo"] > 0
    line = claim_line(by["DPO", "base"], demo["metrics"])
    assert line.startswith("DPO > base (factuality): +") and "beyond noise" in line

    rows = {lab: {"bio_test:score": metric_ci("factuality", r, "score")["value"],
                  "bio_test:correct_per_response": metric_ci("factuality", r, "correct_per_response")["value"]}
            for lab, r in (("base", base), ("DPO", better), ("Mask-DPO", better))}
    results = {"seeds": {0: {"mask_dpo": {"rows": rows, **stats}}},
               "world": {0: {"params": 1e6, "qa_test": {"known": {"acc": 0.95, "ci": [0.9, 0.99]}},
                             "data_digest": "ab" * 32}},
               "timings": [("x", 1.0)], "total_seconds": 60.0}
    report = write_report(results, tmp_path / "out", ["mask_dpo"]).read_text()
    assert "95.0 [90.0, 99.0]" in report  # base-model cells carry their CI
    assert "33.3 [" in report and "What each column measures" in report
    assert "- seed 0: Mask-DPO > DPO (factuality): +0.0 [+0.0, +0.0] **within noise**" in report
    assert "- Mask-DPO > DPO (factuality): within noise on 1/1 (seed 0)" in report
    assert "- DPO > base (factuality): beyond noise on 1/1 (seed 0)" in report
    assert "#correct/response" in report and (tmp_path / "out" / "mask_dpo.png").exists()
    # the report opens with the scoreboard: every claim, its verdict and difference per seed, a
    # link to its section; the timings come last
    board = report.index("## Scoreboard"), report.index("## " + demo["title"]), report.index("## What was run")
    assert board[0] < board[1] < board[2] and report.index("## The base model") > board[0]
    anchor = "mask-dpo-factuality-of-biographies-of-held-out-people-bio_test-bio_val"  # GitHub's slug of it
    assert demo["title"] == "Mask-DPO: factuality of biographies of held-out people (bio_test, bio_val)"
    d = by["DPO", "base"]
    assert (f"| [{demo['title']}](#{anchor}) | DPO > base (factuality) | beyond +{100 * d['diff']:.1f} "
            f"[+{100 * d['lo']:.1f}, +{100 * d['hi']:.1f}] | 1/1 |") in report
    assert "| Mask-DPO > DPO (factuality) | within +0.0 [+0.0, +0.0] | 0/1 |" in report
    # the header says which numeric mode the run was in (and so whether its digits travel)
    assert "native kernels" in report and "reproducible numeric mode" not in report
    results["numerics"] = "testbed"
    report = write_report(results, tmp_path / "out2", ["mask_dpo"]).read_text()
    assert "reproducible numeric mode" in report and "native kernels" not in report


def test_demo_worker_pool_runs_parts_in_spawned_processes(tiny_world_dir, tmp_path):
    """`alignkit demo --jobs 2`: parts run in spawned workers (their own torch threads) and
    come back in submission order into one report; no recipe sections here, only the cached
    world, so it costs a worker start-up and no training."""
    from alignkit.demo import run_demo

    res = run_demo(seed=0, recipes=["no-such-recipe"], out=str(tmp_path / "demo"), jobs=2)
    assert res["jobs"] == 2 and list(res["seeds"]) == [0] and res["seeds"][0] == {}
    assert res["world"][0]["seed"] == 0
    assert [t for t, _ in res["timings"]] == ["seed 0: tiny world (build or cache)"]
    text = (tmp_path / "demo" / "report.md").read_text()
    assert "2 worker processes" in text and "| seed 0: tiny world (build or cache) |" in text


def test_run_item_passes_a_section_its_seed_name_dir_and_first_flag(monkeypatch, tmp_path):
    """The worker entry point unpacks ("section", seed, name, first) items: a positional slip
    here broke every section of `make demo --jobs 2` once (out_dir given twice)."""
    import alignkit.demo as demo

    calls = []
    monkeypatch.setattr(demo, "_run_section", lambda s, name, out_dir, first=True, smoke=False: calls.append(
        (s, name, out_dir, first, smoke)) or ({}, []))
    item = ("section", 2, "mask_dpo", False)
    assert demo._run_item(item, tmp_path)[0] == item
    assert demo._run_item(item, tmp_path, True)[0] == item  # `alignkit demo --smoke` reaches the section
    assert calls == [(2, "mask_dpo", tmp_path, False, False), (2, "mask_dpo", tmp_path, False, True)]


def test_rows_run_on_the_first_seed_only_are_skipped_elsewhere(tmp_path):
    """DEMO["first_seed_only"]: on another seed the row has no records; a claim that needs
    it reads "not measured", the table and plots leave the row out."""
    demo = get_recipe("mask_dpo").DEMO
    base = _bio_records(lambda i, j: ["correct", "hallucination"])
    dirs = {"base": tmp_path / "b", "DPO": tmp_path / "d"}  # Mask-DPO not run on this seed
    for label in dirs:
        for ev in ("bio_test", "bio_val"):
            _write(dirs[label], ev, base)
    stats = section_stats(demo, {"bio_test": "factuality", "bio_val": "factuality"}, dirs)
    by = {(c["a"], c["b"]): c for c in stats["claims"]}
    assert by["Mask-DPO", "DPO"]["verdict"] == "not measured" and by["Mask-DPO", "DPO"]["diff"] is None
    assert by["DPO", "base"]["verdict"] == "within noise"
    rows = {lab: {"bio_test:score": 0.5} for lab in dirs}
    results = {"seeds": {1: {"mask_dpo": {"rows": rows, **stats}}}, "world": {1: {"params": 1e6}},
               "timings": [("x", 1.0)], "total_seconds": 60.0}
    report = write_report(results, tmp_path / "out", ["mask_dpo"]).read_text()
    assert "| 1 | DPO |" in report and "| 1 | Mask-DPO |" not in report
    assert "- Mask-DPO > DPO (factuality): not measured on 1/1 (seed 1)" in report
    assert "| Mask-DPO > DPO (factuality) | — | 0/0 |" in report  # the scoreboard says so too


def test_eval_run_selects_the_sets_evaluated_after_training():
    from alignkit.config import EvalConfig

    sets = {"a": {"task": "qa", "path": "a.jsonl"}, "b": {"task": "qa", "path": "b.jsonl"}}
    assert EvalConfig.model_validate({"datasets": sets, "run": ["b"]}).run == ["b"]
    with pytest.raises(ValueError, match=r"run: \['c'\] not in eval.datasets"):
        EvalConfig.model_validate({"datasets": sets, "run": ["c"]})
