"""TA-SFT end to end on the tiny world (shipped YAML through the CLI) and its pieces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.config import ConfigError
from alignkit.recipes import load_config
from conftest import assert_effect

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "recipes" / "ta_sft.yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "alignkit", *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


# ----------------------------------------------------------------------------- quick units


def test_lambda_has_no_silent_default_and_options_are_checked():
    with pytest.raises(ConfigError, match="method.emd_weight': required"):
        load_config(YAML, ["method.emd_weight=null"])
    load_config(YAML, ["method.emd_weight=null", "method.objective=sft"])  # plain SFT needs no λ
    with pytest.raises(ConfigError, match="objective"):
        load_config(YAML, ["method.objective=ascent"])
    with pytest.raises(ConfigError, match="method.refusals"):
        load_config(YAML, ["method.objective=refusal_sft", "method.refusals=null"])
    with pytest.raises(ConfigError, match="unsafe_ratio"):
        load_config(YAML, ["method.unsafe_ratio=0"])
    with pytest.raises(ConfigError, match="emd_wieght.*did you mean 'emd_weight'"):
        load_config(YAML, ["method.emd_wieght=1"])


def test_mixed_batches_keep_the_sft_order_and_the_unsafe_share():
    from alignkit.recipes.ta_sft import mixed_blocks

    blocks = mixed_blocks(n_sft=70, n_safety=3, batch=32, ratio=0.2, seed=0)
    assert len(blocks) == 3 and all(len(b) == 40 for b in blocks)
    assert all(sum(kind for kind, _ in b) == 8 and [k for k, _ in b[32:]] == [1] * 8 for b in blocks)
    order = [x for b in blocks for x in b]
    assert {i for kind, i in order if kind == 0} == set(range(70))  # every SFT row, the last block topped up
    # plain SFT (no safety rows) sees exactly the same SFT rows in the same order
    plain = [x for b in mixed_blocks(70, 0, 32, 0.0, seed=0) for x in b]
    assert [i for _, i in plain] == [i for kind, i in order if kind == 0]


def test_unsafe_selection_counts_and_caps():
    from alignkit.stages.unsafe_set import select_unsafe

    rows = [{"prompt": f"p{i}", "samples": ["bad", "bad", "ok"], "topic": "t"} for i in range(5)]
    flags = [[True, True, False]] * 4 + [[False, False, False]]
    kept, why = select_unsafe(rows, flags, size=3, per_prompt=1, seed=0)
    assert len(kept) == 3 and len({r["prompt"] for r in kept}) == 3
    assert all(r["rejected"] == "bad" and r["topic"] == "t" for r in kept)
    assert why["duplicate_text"] == 4 and why["prompts_without_unsafe_sample"] == 1 and why["kept"] == 3


def test_bad_unsafe_rows_name_file_row_field(tmp_path):
    from alignkit.data import DataError
    from alignkit.stages.unsafe_set import read_unsafe_rows

    p = tmp_path / "unsafe.jsonl"
    p.write_text(json.dumps({"prompt": "x", "rejected": "y"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"unsafe.jsonl, row 2, field 'rejected'"):
        read_unsafe_rows(str(p))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.learned_effect
def test_ta_sft_end_to_end_with_watch_and_cached_stage(tiny_world_dir, tmp_path):
    """The shipped YAML, shortened: sampled unsafe set (cached stage + counts), EMD term pushed up,
    the watch logged, evaluation with CIs; a re-run reuses the stage."""
    common = ["train.max_steps=12", "train.logging_steps=4", "method.watch.every=6", "method.watch.limit=4",
              "eval.limit=8", "method.unsafe.size=4"]
    cli("train", str(YAML), f"output_dir={tmp_path / 'emd'}", *common)
    run = tmp_path / "emd"
    assert (run / "RUN_COMPLETE").exists()
    rep = json.loads((run / "unsafe_report.json").read_text())
    sel = rep["unsafe_set"]["selection"]
    assert rep["n_unsafe"] == 4 == sel["kept"] and sel["flagged_unsafe"] >= 4 and sel["samples"] >= sel["prompts"]
    assert rep["safety_rows_per_batch"] == 8 and rep["safety_share"] == pytest.approx(0.2)
    assert Path(rep["unsafe_set"]["source"]).exists()
    assert (run / "cost_embedding.safetensors").exists()  # the frozen base copy, for a resume
    prov = json.loads(Path(rep["unsafe_set"]["source"]).with_suffix(".provenance.json").read_text())
    assert prov["report"]["selection"]["kept"] == 4
    unsafe = [json.loads(x) for x in (run / "unsafe_set.jsonl").read_text().splitlines()]
    assert len(unsafe) == 4 and all("Step 1" in u["completion"] for u in unsafe)  # the model's own procedures
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    emd = [m["loss/unsafe_term"] for m in logs if "loss/unsafe_term" in m]
    assert emd and all(0 <= e <= 2 for e in emd)  # bounded
    assert_effect("EMD to the unsafe responses pushed up (last - first logged)", emd[-1] - emd[0], 0.0)
    watch = [m for m in logs if "watch/benign_refusal_rate" in m]
    assert [m["step"] for m in watch] == [6, 12] and all(0 <= m["watch/benign_refusal_rate"] <= 1 for m in watch)
    assert any((run / "tb").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in (run / "tb").rglob("events.out.tfevents.*"):
        ea = EventAccumulator(str(f))
        ea.Reload()
        tags |= set(ea.Tags()["scalars"])
    assert any("watch/benign_refusal_rate" in t for t in tags), tags
    ev = json.loads((run / "metrics.json").read_text())["eval"]
    for name in ("harmful_test", "benign_test", "qa_test", "harmful_val", "benign_val", "qa_val"):
        assert name in ev and ev[name]["ci95"]
    assert json.loads((run / "train_results.json").read_text())["counts"]["n_unsafe"] == 4

    # Same inputs -> the sampling and selection stages are reused, not recomputed; the
    # gradient-ascent baseline is the same recipe with another objective.
    stamp = Path(rep["unsafe_set"]["source"])
    before = stamp.stat().st_mtime_ns  # a recomputed stage is rewritten (same path: the key is unchanged)
    cli("train", str(YAML), f"output_dir={tmp_path / 'ga'}", "method.objective=gradient_ascent", *common)
    rep2 = json.loads((tmp_path / "ga" / "unsafe_report.json").read_text())
    assert rep2["unsafe_set"]["source"] == rep["unsafe_set"]["source"]
    assert stamp.stat().st_mtime_ns == before
    logs = [json.loads(x) for x in (tmp_path / "ga" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("loss/unsafe_term", 0) < 0 for m in logs)  # log-probs of the unsafe text
