"""Each recipe end to end through the CLI on the tiny world (shipped YAMLs, as users run them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.metrics.records import paired_difference, read_records
from alignkit.world import load_world
from conftest import assert_effect

ROOT = Path(__file__).resolve().parents[2]
# The run seed of the learned-effect tests is the world's, as in `alignkit demo`: under `make margins`
# (ALIGNKIT_WORLD_SEED=1, 2) each world seed is trained as the demo trains it; seed 0 otherwise.
SEED = f"seed={os.environ.get('ALIGNKIT_WORLD_SEED', '0')}"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "alignkit", *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _eval(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["eval"]


@pytest.mark.learned_effect
def test_sft_teaches_finetune_only_facts(tiny_world_dir, tmp_path):
    base = tmp_path / "base"
    cli("eval", str(ROOT / "recipes/sft.yaml"), f"output_dir={base}", SEED)
    cli("train", str(ROOT / "recipes/sft.yaml"), f"output_dir={tmp_path / 'sft'}", SEED)
    b, s = _eval(base / "base_eval"), _eval(tmp_path / "sft")
    assert b["qa_finetune"]["accuracy"] < 0.25  # never in pretraining
    assert_effect("SFT - base accuracy on qa_finetune", s["qa_finetune"]["accuracy"] - b["qa_finetune"]["accuracy"],
                  0.15)
    # paired over the same (training) questions: the gain is beyond bootstrap noise
    d = paired_difference("qa", read_records(tmp_path / "sft" / "eval_qa_finetune.jsonl"),
                          read_records(base / "base_eval" / "eval_qa_finetune.jsonl"), "accuracy")
    assert_effect("SFT - base on qa_finetune: paired 95% CI lower bound", d["lo"], 0.0)
    assert d["verdict"] == "beyond noise", d
    # SFT on facts the model never saw costs known facts (the demo's check base > SFT, beyond noise on
    # seeds 0-2); the guard is that it does not wipe them out. World v5 measured 0.82 / 0.90 / 0.63 on
    # seeds 0-2 (base 0.95-0.99), so the v4 bound 0.7 became 0.5.
    assert_effect("SFT accuracy on known qa_test facts (kept)", s["qa_test"]["accuracy/known"], 0.5)
    lo, hi = s["qa_test"]["ci95"]["accuracy/known"]
    assert lo <= s["qa_test"]["accuracy/known"] <= hi
    assert (tmp_path / "sft" / "RUN_COMPLETE").exists()


@pytest.mark.learned_effect
def test_mask_dpo_and_dpo_improve_factuality_on_same_pairs(tiny_world_dir, tmp_path):
    base = tmp_path / "base"
    cli("eval", str(ROOT / "recipes/mask_dpo.yaml"), f"output_dir={base}", SEED)
    cli("train", str(ROOT / "recipes/mask_dpo.yaml"), f"output_dir={tmp_path / 'mask'}", SEED)
    cli("train", str(ROOT / "recipes/dpo.yaml"), f"output_dir={tmp_path / 'dpo'}", SEED)
    runs = {"Mask-DPO": tmp_path / "mask", "DPO": tmp_path / "dpo", "base": base / "base_eval"}
    res = {k: _eval(v) for k, v in runs.items()}
    m = res["Mask-DPO"]["bio_test"]["score"]
    n_test, n_val = (len(load_world(tiny_world_dir).data[s]) for s in ("bio_test", "bio_val"))  # one row a person
    for r in res.values():
        for ev in ("bio_test", "bio_val"):  # the validation split is evaluated beside the test split
            lo, hi = r[ev]["ci95"]["score"]
            assert lo <= r[ev]["score"] <= hi
            assert r[ev]["correct_per_response"] == pytest.approx(r[ev]["n_correct"] / r[ev]["n_responses"])
        assert r["bio_test"]["n_prompts"] == n_test and r["bio_val"]["n_prompts"] == n_val
    # Both recipes beat the base model beyond the noise of the held-out people (55 on world v5) (paired bootstrap
    # over the same people); Mask-DPO vs DPO is not asserted: at this scale it is within noise.
    recs = {k: read_records(v / "eval_bio_test.jsonl") for k, v in runs.items()}
    for a in ("Mask-DPO", "DPO"):
        d = paired_difference("factuality", recs[a], recs["base"], "score")
        assert_effect(f"{a} - base factuality on bio_test: paired 95% CI lower bound", d["lo"], 0.0)
        assert d["verdict"] == "beyond noise", (a, d, {k: r["bio_test"]["score"] for k, r in res.items()})
    # Both recipes trained on the very same self-sampled pairs (stage cache shared).
    pm = json.loads((tmp_path / "mask" / "mask_report.json").read_text())["pairs_file"]
    cfg = (tmp_path / "dpo" / "config.yaml").read_text()
    assert Path(pm).name in cfg or "bio_train" in cfg
    steps = [json.loads(x) for x in (tmp_path / "mask" / "metrics.jsonl").read_text().splitlines()]
    masked = [s["mask/chosen_masked_frac"] for s in steps if "mask/chosen_masked_frac" in s]
    assert masked and all(0 < x < 1 for x in masked)
    samples = [json.loads(x) for x in (tmp_path / "mask" / "eval_bio_test.jsonl").read_text().splitlines()]
    assert samples and all(len(s["sentences"]) == len(s["labels"]) for s in samples)
    assert [s["prompt_index"] for s in samples] == [i // 4 for i in range(4 * n_test)]  # 4 samples a person
    # `alignkit eval RUN_DIR` re-evaluates the saved model and reproduces the number.
    again = json.loads(cli("eval", str(tmp_path / "mask")).stdout)["eval"]["bio_test"]["score"]
    assert again == pytest.approx(m, abs=1e-9)


def test_preview_and_world_build(tiny_world_dir, tmp_path):
    out = cli("preview", str(ROOT / "recipes/mask_dpo.yaml"), "--rows", "1", "--no-color").stdout
    assert "--- chosen" in out and "[[" in out
    world_out = tmp_path / "w"
    cli("world", "build", "--seed", "0", "--out", str(world_out))
    for f in ("qa_train", "qa_test", "bio_train", "bio_test", "safety_harmful", "dualuse"):
        assert (world_out / "data" / f"{f}.jsonl").exists()
    assert (world_out / "model" / "model.safetensors").exists()
