"""SE abstention end to end on the tiny world through the CLI (shipped YAML, small overrides),
a baseline variant that reuses the cached sampling stage, and config / data errors that
must fail before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_effect, edited_source

ROOT = Path(__file__).resolve().parents[2]
YAML = str(ROOT / "recipes/se_abstention.yaml")


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "alignkit", *args], cwd=ROOT, capture_output=True, text=True)
    if ok:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


# 160 of the 476 training questions: 3 epochs give the shipped YAML's 30 optimiser steps (1 epoch,
# 10 steps, left the abstention phrase unlearned on qa_test on every seed).
SMALL = ["data.train.limit=160", "train.num_train_epochs=3", "method.num_samples=4", "method.tau_grid=[0.25,0.5,2.0]",
         "method.signal_num_samples=3", "eval.limit=40"]


@pytest.mark.slow
@pytest.mark.learned_effect
@pytest.mark.timeout(240)
def test_se_abstention_end_to_end(tiny_world_dir, tmp_path):
    stages = tmp_path / "stages"  # cold cache: every stage runs
    run = tmp_path / "se"
    cli("train", YAML, f"output_dir={run}", f"method.stage_dir={stages}", *SMALL)
    assert (run / "RUN_COMPLETE").exists()
    rep = json.loads((run / "se_report.json").read_text())
    sw = rep["sweep"]
    pts = sw["points"]
    assert [p["threshold"] for p in pts] == [0.25, 0.5, 2.0]
    # one training per distinct abstain set; tau values with the same set share it
    assert sw["distinct_sets"] == len({p["stage"] for p in pts}) == len(list(stages.glob("se_sweep_point-*.jsonl")))
    n_abs = [p["n_abstain"] for p in pts]
    assert n_abs == sorted(n_abs, reverse=True) and n_abs[-1] == 0 and n_abs[0] > 0
    # selected by the lowest validation AED (first in grid order on ties)
    aeds = [p["qa_val:aed"] for p in pts]
    assert rep["threshold"] == pts[aeds.index(min(aeds))]["threshold"]
    # training targets: the abstention phrase above tau, the model's own standard answer below
    score = _jsonl(rep["stages"]["score"])
    assert len(score) == 160 and all(len(r["samples"]) == 4 and len(r["semantic_ids"]) == 4 for r in score)
    assert all(0 <= r["se_discrete"] <= __import__("math").log(4) + 1e-9 for r in score)
    h = {r["qid"] for r in score if r["se_discrete"] > rep["threshold"]}
    assert rep["buckets"]["abstain"] == len(h)
    # every training question was clustered: the kb oracle's stats count all M answers of each
    assert rep["clustering"]["judge_stats"]["answers"] == 160 * 4
    # evaluation: AED with a CI over prompts and the counts it is made of
    ev = json.loads((run / "metrics.json").read_text())["eval"]
    for name in ("qa_test", "qa_ood", "qa_val"):
        r = ev[name]
        assert r["n_correct"] + r["n_wrong"] + r["n_refusal"] == r["n"] == 40
        lo, hi = r["ci95"]["aed"]
        assert lo <= r["aed"] <= hi
        # abstained = the answer contains the abstention phrase (abstain_match: substring), not the
        # judge's refusal notion; an abstention is never correct
        recs = _jsonl(run / f"eval_{name}.jsonl")
        assert [x["refusal"] for x in recs] == ["i don't know the answer" in x["response"].lower() for x in recs]
        assert sum(x["refusal"] for x in recs) == r["n_refusal"] and not any(x["refusal"] and x["correct"] for x in recs)
    assert rep["buckets"]["abstain"] > 0  # the selected threshold trains abstentions
    assert_effect("SE abstention: abstention rate on held-out qa_test", ev["qa_test"]["n_refusal"] / 40, 0.1)
    tr = json.loads((run / "train_results.json").read_text())
    assert len(tr["demo"]["adaptation"]) == 3
    sq = tr["demo"]["signal_quality"]
    assert [r[0] for r in sq["rows"]] == ["semantic entropy", "likelihood-weighted SE", "lexical (string) entropy",
                                          "Semantic Volume"]
    assert all(0 <= r[1] <= 1 for r in sq["rows"])

    # R-Tuning reuses the sampling + scoring stages (same keys), abstains where the judge says wrong
    stamps = {k: Path(rep["stages"][k]).stat().st_mtime_ns for k in ("sample", "score")}
    cli("train", YAML, f"output_dir={tmp_path / 'rt'}", f"method.stage_dir={stages}", "method.variant=r_tuning",
        "method.signal_eval=null", *SMALL)
    rep2 = json.loads((tmp_path / "rt" / "se_report.json").read_text())
    assert {k: rep2["stages"][k] for k in stamps} == {k: rep["stages"][k] for k in stamps}
    assert {k: Path(rep["stages"][k]).stat().st_mtime_ns for k in stamps} == stamps
    assert rep2["buckets"]["abstain"] == sum(not r["standard_correct"] for r in score)
    assert rep2["sweep"]["distinct_sets"] == 1 and "signal_quality" not in rep2


def test_bad_config_fails_before_model_load(tmp_path):
    base = ["train", YAML, f"output_dir={tmp_path / 'out'}", f"method.stage_dir={tmp_path / 'st'}"]
    for override, expect in (("method.select_eval=qa_nope", "qa_nope"), ("method.variant=se_magic", "variant"),
                             ("method.clustering.backend=nli", "model_path"),
                             ("method.tau_grid=[]", "tau_grid"), ("method.sv_quantiles=[1.5]", "sv_quantiles")):
        r = cli(*base, override, ok=False)
        assert r.returncode != 0 and expect in r.stdout + r.stderr, override
    assert not (tmp_path / "st").exists() and not (tmp_path / "out").exists()


def test_bad_data_row_fails_before_model_load(tiny_world_dir, tmp_path):
    # label-free variants need only questions (§3 gold_answers?); r_tuning needs the golds
    bad = tmp_path / "qa.jsonl"
    bad.write_text(json.dumps({"question": "Where?", "answers": ["X"]}) + "\n" + json.dumps({"question": "Who?"}) + "\n")
    r = cli("train", YAML, f"data.train.path={bad}", f"output_dir={tmp_path / 'out'}",
            f"method.stage_dir={tmp_path / 'st'}", "method.variant=r_tuning", ok=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and str(bad) in out and "answers" in out and "r_tuning" in out and "row 2" in out
    assert not (tmp_path / "st").exists()  # nothing sampled: it failed before any model loaded
    bad.write_text(json.dumps({"question": "Where?"}) + "\n" + json.dumps({"question": ""}) + "\n")
    r = cli("train", YAML, f"data.train.path={bad}", f"output_dir={tmp_path / 'out'}",
            f"method.stage_dir={tmp_path / 'st'}", ok=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and str(bad) in out and "question" in out and "answers" not in out
    assert not (tmp_path / "st").exists()


def test_score_rows_never_asks_the_judge_about_label_free_rows():
    import alignkit.recipes.se_abstention as R
    from alignkit.stages.uncertainty import ExactMatch

    class Judge:
        seen: list = []

        def is_correct(self, reqs):
            assert all(r.golds for r in reqs)
            self.seen += [r.prompt for r in reqs]
            return [True] * len(reqs)

        def is_refusal(self, reqs):
            return [False] * len(reqs)

    rows = [{"qid": i, "question": f"Q{i}?", "answers": a, "standard_response": "Paris.",
             "samples": ["Paris.", "paris", "Rome."], "sample_logps": [-0.1, -0.2, -0.3]}
            for i, a in enumerate([["Paris"], None])]
    j = Judge()
    out = R.score_rows(rows, _method(), ExactMatch(), None, j)
    assert j.seen == ["Q0?"] and [r["standard_correct"] for r in out] == [True, None]
    assert out[1]["semantic_ids"] == [0, 0, 1] and out[1]["semantic_volume"] is None


# ---------------------------------------------------------------- fast unit tests (no model)


class NoGold(dict):
    """A score-table row whose gold verdict must never be read (label-free variants)."""

    def __getitem__(self, k):
        if k == "standard_correct":
            raise AssertionError("variant read the gold verdict")
        return super().__getitem__(k)

    def get(self, k, default=None):
        if k == "standard_correct":
            raise AssertionError("variant read the gold verdict")
        return super().get(k, default)


def _table(gold: bool = True) -> list[dict]:
    # qid, se, lexical entropy, SV, standard answer correct
    vals = [(0, 0.0, 0.0, -26.0, True), (1, 0.5, 0.9, -10.0, False), (2, 1.1, 1.1, -5.0, False),
            (3, 0.0, 0.6, -20.0, False)]
    rows = [{"qid": q, "prompt": f"Q{q}?", "standard_response": f"A{q}.", "se_discrete": se, "se_likelihood": se,
             "lexical_entropy": lex, "semantic_volume": sv, "standard_correct": c} for q, se, lex, sv, c in vals]
    return rows if gold else [NoGold(r) for r in rows]


def _method(**kw):
    from alignkit.recipes.se_abstention import Method

    return Method.model_validate(kw)


def test_thresholds_abstain_sets_and_sft_rows():
    import alignkit.recipes.se_abstention as R

    t = _table(gold=False)
    m = _method(variant="se", tau_grid=[0.25, 1.0, 2.0])
    assert R.thresholds(t, m) == [0.25, 1.0, 2.0]
    assert [sorted(R.abstain_set(t, m, x)) for x in (0.25, 1.0, 2.0)] == [[1, 2], [2], []]
    u = _method(variant="r_tuning_u", tau_grid=[0.5])
    assert sorted(R.abstain_set(t, u, 0.5)) == [1, 2, 3]  # lexical entropy, not SE
    sv = _method(variant="semantic_volume", sv_quantiles=[0.0, 0.5])
    assert R.thresholds(t, sv) == [-26.0, -15.0] and sorted(R.abstain_set(t, sv, -15.0)) == [1, 2]
    rows = R.sft_rows(t, _method(abstain_phrase="No idea."), frozenset({2}))
    assert [(r["completion"], r["bucket"]) for r in rows] == [("A0.", "answer"), ("A1.", "answer"),
                                                             ("No idea.", "abstain"), ("A3.", "answer")]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Q0?"}]
    # R-Tuning: the gold verdict decides, one fixed split; it refuses a table without verdicts
    rt = _method(variant="r_tuning")
    g = _table()
    assert R.thresholds(g, rt) == [0.5] and sorted(R.abstain_set(g, rt, 0.5)) == [1, 2, 3]
    with pytest.raises(ValueError, match="gold"):
        R.abstain_set([{**g[0], "standard_correct": None}], rt, 0.5)


def test_sweep_trains_each_distinct_set_once_and_selects_lowest_val_aed(tmp_path):
    import alignkit.recipes.se_abstention as R

    t = _table(gold=False)  # variant se must never read gold correctness, sweep included
    m = _method(variant="se", tau_grid=[0.25, 0.4, 1.0, 2.0])
    aed = {frozenset({"Q1?", "Q2?"}): 0.5, frozenset({"Q2?"}): 0.3, frozenset(): 0.3}
    calls = []

    def run_point(rows, evals):
        assert evals == ["qa_val", "qa_ood"]
        h = frozenset(r["prompt"][0]["content"] for r in rows if r["bucket"] == "abstain")
        calls.append(h)
        p = tmp_path / f"p{len(calls)}.jsonl"
        p.write_text("\n".join(json.dumps({"eval_set": e, "aed": aed[h], "n_correct": 1, "n_wrong": 2})
                               for e in evals) + "\n")
        return p

    sw = R.sweep(None, m, t, run_point)
    assert len(calls) == len(set(calls)) == sw["distinct_sets"] == 3  # 0.25 and 0.4 share one point
    assert [p["n_abstain"] for p in sw["points"]] == [2, 2, 1, 0]
    assert sw["points"][0]["stage"] == sw["points"][1]["stage"]
    assert sw["selected"] == 1.0 and sw["selected_index"] == 2  # lowest qa_val AED, first on ties
    # a grid whose sets are all identical trains nothing
    one = R.sweep(None, _method(variant="se", tau_grid=[1.5, 2.0]), t, lambda *a: pytest.fail("trained"))
    assert one["distinct_sets"] == 1 and one["selected"] == 1.5


def test_signal_quality_on_a_fake_table():
    import alignkit.recipes.se_abstention as R

    sq = R.signal_quality(_table())
    assert sq["n"] == 4 and sq["n_wrong"] == 3
    s = sq["signals"]
    # lexical entropy 0.0 for the one right answer, higher for all wrong ones: perfect ranking
    assert s["lexical (string) entropy"]["auroc"] == 1.0 and s["lexical (string) entropy"]["prr"] == pytest.approx(1.0)
    assert s["Semantic Volume"]["auroc"] == 1.0
    # SE ties the right answer (0.0) with wrong qid 3 (0.0): AUROC counts the tie as one half
    assert s["semantic entropy"]["auroc"] == pytest.approx((2 + 0.5) / 3)


def test_eval_options_filled_and_mismatch_rejected():
    from alignkit.config.tasks import qa_options
    from alignkit.recipes import load_config
    from alignkit.recipes.se_abstention import Method, eval_options

    cfg = load_config(YAML, ["method.prompt_template=Answer briefly. {question}",
                             "eval.datasets.qa_test.options={}", "eval.datasets.qa_ood.options={}",
                             "eval.datasets.qa_val.options={}"])
    opts, problems = eval_options(cfg, Method.model_validate(cfg.method))
    assert not problems and set(opts) == {"qa_test", "qa_ood", "qa_val"}
    assert opts["qa_val"] == {"question_template": "Answer briefly. {question}",
                              "abstain_phrase": "I don't know the answer.", "abstain_match": "substring"}
    with pytest.raises(Exception, match="question_template.*differs from method.prompt_template"):
        load_config(YAML, ["method.prompt_template=Answer briefly. {question}"])  # the YAML's own options disagree
    for bad, msg in (({"question_template": "no field"}, "question"), ({"abstain_match": "exact"}, "abstain_phrase"),
                     ({"colour": 1}, "unknown"), ({"question_template": "{question} {x}"}, "question")):
        with pytest.raises(ValueError, match=msg):
            qa_options(bad)


def test_label_free_rows_load_and_r_tuning_needs_answers(tmp_path):
    from alignkit.config import DataSource
    from alignkit.recipes.se_abstention import load_questions

    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "Where?", "answers": ["X"]}) + "\n" + json.dumps({"question": "Who?"}) + "\n")
    rows = load_questions(DataSource(path=str(f)), need_answers=False)
    assert [(r["question"], r["answers"]) for r in rows] == [("Where?", ["X"]), ("Who?", None)]
    with pytest.raises(Exception) as e:
        load_questions(DataSource(path=str(f)), need_answers=True)
    assert str(f) in str(e.value) and "answers" in str(e.value) and "r_tuning" in str(e.value)


def test_score_key_fingerprints_local_model_folders_by_content(tmp_path):
    from alignkit.recipes.se_abstention import _spec_key

    d = tmp_path / "nli"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    spec = {"backend": "nli", "model_path": str(d), "judge": {"backend": "hf", "model_or_path": str(d)}}
    k1 = _spec_key(spec)
    (d / "config.json").write_text('{"a": 2}')  # same path, new weights / config
    k2 = _spec_key(spec)
    assert k1 != k2 and k1["judge"]["model_or_path"] != k2["judge"]["model_or_path"]
    assert _spec_key({"backend": "http", "model": "gpt"}) == {"backend": "http", "model": "gpt"}


def test_signal_rows_follow_the_eval_sets_where_and_limit(tiny_world_dir):
    from alignkit.config.paths import expand_config
    from alignkit.recipes import load_config
    from alignkit.recipes.se_abstention import Method, signal_rows

    cfg = load_config(YAML, ["eval.datasets.qa_test.limit=7", "eval.datasets.qa_test.where={knowledge: unknown}"])
    expand_config(cfg)
    rows = signal_rows(cfg, Method.model_validate(cfg.method))
    assert len(rows) == 7 and all(r["knowledge"] == "unknown" for r in rows)
    cfg = load_config(YAML, ["eval.limit=5"])
    expand_config(cfg)
    assert len(signal_rows(cfg, Method.model_validate(cfg.method))) == 5


# ---------------------------------------------------------------- review findings (issue 22)


def test_semantic_volume_thresholds_keep_the_all_identical_floor_out_of_the_abstain_set():
    """Many questions sit on the 'all answers identical' SV floor, equal up to float noise. A
    quantile threshold on that floor must not make them abstain, for any sv_epsilon (rounded to
    6 decimals and compared strictly, it did at 1e-2 and 1e-4: every floor question abstained)."""
    import numpy as np

    import alignkit.recipes.se_abstention as R
    from alignkit.stages.uncertainty import semantic_volume

    rng = np.random.default_rng(0)
    for eps in (1e-2, 1e-3, 1e-4):
        table = [{"qid": i, "semantic_volume": semantic_volume(np.tile(rng.normal(size=(1, 384)), (5, 1)), eps)}
                 for i in range(60)]  # 60 floor questions (identical answers, different embeddings)
        table += [{"qid": 60 + i, "semantic_volume": semantic_volume(rng.normal(size=(5, 384)), eps)}
                  for i in range(20)]  # 20 spread ones, far above the floor
        m = _method(variant="semantic_volume", sv_epsilon=eps, sv_quantiles=[0.3, 0.5, 0.7])
        for t in R.thresholds(table, m):
            assert R.abstain_set(table, m, t) == frozenset(range(60, 80)), (eps, t)


class _Keys:
    """run_stage stand-in: records each stage's key and runs nothing."""

    def __init__(self, tmp_path):
        self.keys, self.tmp = [], tmp_path

    def __call__(self, name, key, fn, stage_dir=None):
        self.keys.append(json.dumps(key, sort_keys=True, default=str))
        p = self.tmp / f"{name}.jsonl"
        p.write_text("{}\n")
        return p


@pytest.fixture
def stage_keys(tiny_world_dir, tmp_path, monkeypatch):
    """Each stage's cache key, computed without running it (run_stage records the key)."""
    import alignkit.recipes.se_abstention as R
    import alignkit.stages.runner as runner
    from alignkit.config.paths import expand_config
    from alignkit.recipes import load_config

    keys = _Keys(tmp_path)
    monkeypatch.setattr(runner, "run_stage", keys)
    st = tmp_path / "st"
    st.mkdir()
    (st / "config.json").write_text("{}")
    cfg = load_config(YAML, [f"method.sv_embedder={{backend: sentence_transformers, model_path: {st}}}"])
    expand_config(cfg)
    m = R.Method.model_validate(cfg.method)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("{}\n")
    rows = [{"qid": 0, "prompt": [{"role": "user", "content": "Q?"}], "completion": "A."}]
    calls = {"score": lambda: R.stage_score(cfg, m, samples),
             "sweep": lambda: R.stage_sweep_point(cfg, m, rows, ["qa_val"]),
             "sample": lambda: R.stage_sample(cfg, m, [{"question": "Q?"}], 2)}

    def key_of(stage):
        keys.keys.clear()
        calls[stage]()
        return keys.keys[-1]

    key_of.embedder_dir = st
    return key_of


def test_score_key_covers_semantic_entropy_judges_and_embedder_files(stage_keys):
    import alignkit.judges.kb as kb
    import alignkit.metrics as metrics

    base = stage_keys("score")
    for obj in (metrics.semantic_entropy, kb):  # SE itself and the standard answer's judge
        with edited_source(obj):
            assert stage_keys("score") != base, obj
    assert stage_keys("score") == base
    # the Semantic Volume embedder's files: new weights at the same path
    (stage_keys.embedder_dir / "model.safetensors").write_bytes(b"0" * 16)
    assert stage_keys("score") != base


def test_sweep_key_covers_evaluation_and_aed_code(stage_keys):
    import alignkit.evaluation.tasks as ev_tasks
    import alignkit.judges.kb as kb
    import alignkit.metrics as metrics

    base = stage_keys("sweep")
    for obj in (ev_tasks, metrics.accuracy_engagement_distance, kb):  # what turns a model into the AED
        with edited_source(obj):
            assert stage_keys("sweep") != base, obj
    assert stage_keys("sweep") == base


def test_sample_key_covers_the_generation_backends(stage_keys):
    import alignkit.generation.backends as gb

    base = stage_keys("sample")
    with edited_source(gb):
        assert stage_keys("sample") != base
    assert stage_keys("sample") == base


def test_sweep_point_trains_as_the_final_run_loads_and_batches(tiny_world_dir, tmp_path, monkeypatch):
    """The τ sweep's fine-tunes must use the final run's memory profile: the model from the
    training loader (gradient checkpointing, QLoRA, attention kernel) and forward passes of
    per_device_train_batch_size rows with accumulation — the 8B example ran 48 rows in one
    pass without checkpointing and ran out of memory."""
    import alignkit.recipes.se_abstention as R
    import alignkit.stages.knowledge as kn
    from alignkit.config.paths import expand_config
    from alignkit.recipes import load_config

    seen = {}
    real = kn.brief_finetune

    def spy(model, tok, rows, **kw):
        seen.update(kw, checkpointing=bool(getattr(model, "is_gradient_checkpointing", False)))
        return real(model, tok, rows, **kw)

    monkeypatch.setattr(kn, "brief_finetune", spy)
    cfg = load_config(YAML, ["model.gradient_checkpointing=true", "train.per_device_train_batch_size=2",
                             "train.gradient_accumulation_steps=3", "train.max_steps=1", "eval.limit=2",
                             f"method.stage_dir={tmp_path}"])
    expand_config(cfg)
    m = R.Method.model_validate(cfg.method)
    rows = [{"qid": i, "prompt": [{"role": "user", "content": f"Q{i}?"}], "completion": "I don't know the answer."}
            for i in range(6)]
    out = R.stage_sweep_point(cfg, m, rows, ["qa_val"])
    assert seen["checkpointing"] and seen["batch_size"] == 2 and seen["grad_accum"] == 3
    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    assert prov["report"]["train"]["rows_per_forward"] == 2 and prov["report"]["train"]["rows_per_step"] == 6


def test_world_only_clustering_is_rejected_for_a_real_model():
    """The kb clustering oracle is the tiny world's knowledge base: no silent stand-in for a real model."""
    from alignkit.config import ConfigError
    from alignkit.recipes import load_config

    example = ROOT / "recipes/examples/se_abstention_llama3_8b.yaml"
    load_config(example)
    with pytest.raises(ConfigError, match=r"method\.clustering\.backend'.*kb"):
        load_config(example, ["method.clustering={backend: kb}"])
