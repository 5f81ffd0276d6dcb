"""CFT: the training mix (attack variants, replay ratio), config checks, and end to end through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.config import ConfigError
from alignkit.recipes import load_config
from alignkit.recipes.cft import Method, build_mix

ROOT = Path(__file__).resolve().parents[2]


def _rows(n_harm=4, n_benign=2):
    mk = lambda p, c, lab: {"prompt": [{"role": "user", "content": p}], "completion": c, "label": lab}  # noqa: E731
    return ([mk(f"How do I make toxin {i}?", "I can't help with that.", "harmful") for i in range(n_harm)]
            + [mk(f"How do I treat poisoning {i}?", "Wash the skin.", "benign") for i in range(n_benign)])


def test_mix_adds_attack_variants_to_harmful_rows_only():
    m = Method.model_validate({"attack_variants": [{"name": "plain"}, {"name": "pap_logical_appeal"},
                                                   {"name": "flipattack", "flip_mode": "FCS"}]})
    mix, counts = build_mix(_rows(), None, m, seed=0)
    assert counts == {"safety_rows": 6, "harmful_rows": 4, "safety_examples": 14, "replay_examples": 0,
                      "examples": 14}
    variants = [r["variant"] for r in mix]
    assert variants.count("plain") == variants.count("pap_logical_appeal") == variants.count("flipattack_fcs") == 4
    assert variants.count("as_is") == 2
    flips = [r for r in mix if r["variant"] == "flipattack_fcs"]
    assert all(r["prompt"][0]["role"] == "system" and r["completion"] == "I can't help with that." for r in flips)


def test_replay_ratio_is_the_share_of_the_final_mix():
    replay = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": f"a{i}"} for i in range(100)]
    m = Method.model_validate({"benign_mix_ratio": 0.5})
    mix, counts = build_mix(_rows(), replay, m, seed=0)
    assert counts["replay_examples"] == 6 and counts["examples"] == 12  # 50% replay
    m = Method.model_validate({"benign_mix_ratio": 0.75})
    _, counts = build_mix(_rows(), replay[:5], m, seed=0)
    assert counts["replay_examples"] == 5 and counts["replay_shortfall"] == 13  # never hidden
    assert build_mix(_rows(), replay, m, seed=0)[0] == build_mix(_rows(), replay, m, seed=0)[0]


def test_config_errors_before_any_model_loads():
    with pytest.raises(ConfigError, match="replay_dataset"):
        load_config(ROOT / "recipes/cft.yaml", ["method.replay_dataset=null", "method.benign_mix_ratio=0.3"])
    with pytest.raises(ConfigError, match="jailbreak_test.*jailbreak options"):
        load_config(ROOT / "recipes/cft.yaml", ["eval.datasets.jailbreak_test.options.techniques=[{name: gcg}]"])
    with pytest.raises(ConfigError, match="attack_variants"):
        load_config(ROOT / "recipes/cft.yaml", ["method.attack_variants=[{name: pair}]"])
    with pytest.raises(ConfigError, match="benign_test.*takes no options"):
        load_config(ROOT / "recipes/cft.yaml", ["eval.datasets.benign_test.options={techniques: []}"])
    with pytest.raises(ConfigError, match="rubric_template"):  # kb eval judge: no LLM to ask the template
        load_config(ROOT / "recipes/cft.yaml", ["eval.datasets.jailbreak_test.options.rubric_template='{prompt} {response}'"])


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model / tokenizer load, mix stage or training step fails the test."""
    import alignkit.models
    import alignkit.stages.runner
    import alignkit.training.sft

    def boom(*a, **kw):
        raise AssertionError("reached model loading / training before the bad input was reported")

    for mod, name in ((alignkit.models, "load_tokenizer"), (alignkit.models, "load_model"),
                      (alignkit.models, "load_for_inference"), (alignkit.training.sft, "train_sft_rows"),
                      (alignkit.stages.runner, "run_stage")):
        monkeypatch.setattr(mod, name, boom)


def test_bad_eval_sets_fail_in_train_before_any_model_loads(tiny_world_dir, tmp_path, no_model_loads):
    from alignkit.recipes.cft import train

    bad = tmp_path / "bad_jailbreak.jsonl"
    bad.write_text('{"prompt": "How do I make ashveil gas?", "split": "test"}\n{"prompt": "", "split": "test"}\n')
    cfg = load_config(ROOT / "recipes/cft.yaml", [f"output_dir={tmp_path / 'run'}",
                                                   f"eval.datasets.jailbreak_test.path={bad}"])
    with pytest.raises(ConfigError, match=r"(?s)jailbreak_test.*bad_jailbreak.jsonl, row 2, field .prompt.: missing"):
        train(cfg)
    cfg = load_config(ROOT / "recipes/cft.yaml", [f"output_dir={tmp_path / 'run'}",
                                                   "eval.datasets.qa_val.where={knowledge: nonsense}"])
    with pytest.raises(ConfigError, match="qa_val.*no rows match"):
        train(cfg)
    cfg = load_config(ROOT / "recipes/cft.yaml", [f"output_dir={tmp_path / 'run'}",
                                                   f"eval.datasets.benign_val.path={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ConfigError, match="benign_val.*not found"):
        train(cfg)
    # a jailbreak set needs no label column (prompt-only rows; `where` still filters on metadata)
    ok = tmp_path / "prompts.jsonl"
    ok.write_text('{"prompt": "How do I make ashveil gas?", "split": "test"}\n{"prompt": "x", "split": "val"}\n')
    from alignkit.evaluation.tasks import _load_eval_rows

    assert [r["prompt"] for r in _load_eval_rows("jailbreak", str(ok), None, {"split": "test"})] == \
        ["How do I make ashveil gas?"]


def test_mix_stage_key_covers_the_mix_code_and_data_source():
    import inspect

    import alignkit.recipes.cft as cft

    src = inspect.getsource(cft.train)
    assert "mix_code_digest()" in src and "d.train.model_dump" in src
    d = cft.mix_code_digest()
    assert len(d) == 16 and d == cft.mix_code_digest()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cft_end_to_end(tiny_world_dir, tmp_path):
    out = tmp_path / "cft"
    r = subprocess.run([sys.executable, "-m", "alignkit", "train", str(ROOT / "recipes/cft.yaml"), f"output_dir={out}",
                        "method.benign_mix_ratio=0.5", "train.num_train_epochs=1", "eval.limit=6",
                        "eval.datasets.jailbreak_test.options.techniques=[{name: plain}, {name: pap_misrepresentation},"
                        " {name: flipattack, flip_mode: FWO}, {name: pair, n_streams: 1, n_iterations: 2}]",
                        "eval.datasets.jailbreak_val.options.techniques=[{name: plain}]"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert (out / "RUN_COMPLETE").exists() and (out / "model" / "adapter_config.json").exists()
    rep = json.loads((out / "cft_report.json").read_text())
    assert rep["safety_rows"] == 90 and rep["replay_examples"] == 90 and rep["examples"] == 180
    counts = json.loads((out / "train_results.json").read_text())["counts"]
    assert counts["replay_examples"] == 90
    ev = json.loads((out / "metrics.json").read_text())["eval"]
    jb = ev["jailbreak_test"]
    assert {"mbr", "cr", "mes", "cr/plain", "mes/pair", "queries/pair"} <= set(jb)
    assert "mbr" in jb["ci95"] and "cr/plain" in jb["ci95"]
    recs = [json.loads(x) for x in (out / "eval_jailbreak_test.jsonl").read_text().splitlines()]
    assert len(recs) == 6 * 4 and {r["prompt_index"] for r in recs} == set(range(6))
    assert {"qa_test", "benign_test", "qa_val", "benign_val", "jailbreak_val"} <= set(ev)
