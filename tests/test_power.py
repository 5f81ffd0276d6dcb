"""benchmarks/power.py: prompts needed for each demo claim, on hand-made metrics.json files (no model,
no training)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import power  # noqa: E402

Z_A, Z_B = 1.959964, 0.841621  # one-sided alpha 0.025, power 0.80


def _claim(a, b, metric, diff, lo, hi, n):
    if diff is None:
        return {"a": a, "b": b, "metric": metric, "diff": None, "lo": None, "hi": None, "verdict": "not measured"}
    verdict = "beyond noise" if lo > 0 else ("reversed" if hi < 0 else "within noise")
    return {"a": a, "b": b, "metric": metric, "diff": diff, "lo": lo, "hi": hi, "n": n, "verdict": verdict}


def _write(tmp_path: Path, seeds: dict) -> Path:
    # as demo.write_report writes it: json turns the int seed keys into strings
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"seeds": seeds, "world": {}, "smoke": False}))
    return path


def _row(rows, section, a, b, metric):
    (row,) = [r for r in rows if (r["section"], r["a"], r["b"], r["metric"]) == (section, a, b, metric)]
    return row


def test_formula_against_a_hand_computation(tmp_path):
    assert power.z_sum() == pytest.approx(Z_A + Z_B, abs=1e-5)
    # one seed: SE from the CI half-width, n_needed = n * ((z_a + z_b) * SE / delta)^2
    se = (0.11 - (-0.01)) / (2 * Z_A)
    assert power.se_from_ci(-0.01, 0.11) == pytest.approx(se, rel=1e-6)
    got = power.prompts_needed(40, se, 0.05)
    assert got["status"] == "ok"
    assert got["value"] == pytest.approx(40 * ((Z_A + Z_B) * se / 0.05) ** 2, rel=1e-5)
    assert got["value"] == pytest.approx(117.7, abs=0.1)  # 40 * (2.8016 * 0.030613 / 0.05)^2

    # two seeds, same n: the SE is pooled in square, the effect is the mean difference
    m = "bio_test:score"
    seeds = {"0": {"mask_dpo": {"claims": [_claim("Mask-DPO", "DPO", m, 0.05, -0.01, 0.11, 40),
                                           _claim("DPO", "base", m, 0.20, 0.12, 0.28, 40)]}},
             "1": {"mask_dpo": {"claims": [_claim("Mask-DPO", "DPO", m, 0.03, 0.00, 0.06, 40),
                                           _claim("DPO", "base", m, 0.10, 0.04, 0.16, 40)]}}}
    rows = power.analyse(json.loads(_write(tmp_path, seeds).read_text()))
    r = _row(rows, "mask_dpo", "Mask-DPO", "DPO", m)
    se0, se1 = 0.12 / (2 * Z_A), 0.06 / (2 * Z_A)
    se_pooled = math.sqrt((se0 ** 2 + se1 ** 2) / 2)
    assert r["n"] == 40 and r["effect"] == pytest.approx(0.04)
    assert r["se"] == pytest.approx(se_pooled, rel=1e-6)
    assert r["seed_sd"] == pytest.approx(math.sqrt(2 * 0.01 ** 2), rel=1e-6)  # sd of 0.05, 0.03
    assert r["needed_observed"]["value"] == pytest.approx(40 * ((Z_A + Z_B) * se_pooled / 0.04) ** 2, rel=1e-5)
    # the paper's effect: Mask-DPO 77.53 vs DPO 68.44 (ANAH-v2 score, Table 2) = +0.0909
    assert r["paper"]["delta"] == pytest.approx(0.0909)
    assert r["needed_paper"]["value"] == pytest.approx(40 * ((Z_A + Z_B) * se_pooled / 0.0909) ** 2, rel=1e-5)


def test_zero_width_zero_effect_and_unmeasured_claims_are_stated_not_crashes(tmp_path):
    assert power.prompts_needed(40, 0.0, 0.1)["status"] == "undefined"
    assert power.prompts_needed(40, 0.03, 0.0) == {"value": math.inf, "status": "infinite",
                                                   "note": "effect ≤ 0: no number of prompts shows A > B"}
    assert power.prompts_needed(40, 0.03, -0.02)["status"] == "infinite"
    assert power.prompts_needed(None, None, 0.1)["status"] == "undefined"

    seeds = {"0": {"balanced_dpo": {"claims": [
        _claim("Balanced DPO", "base", "dualuse_test:safety", 1.0, 1.0, 1.0, 11),       # width 0, effect > 0
        _claim("Balanced DPO", "DPO unbalanced", "dualuse_test:utility", 0.0, 0.0, 0.0, 10),  # width 0, effect 0
        _claim("base", "DPO unbalanced", "dualuse_test:utility", None, None, None, None)]}}}  # not measured
    out = tmp_path / "power"
    assert power.main([str(_write(tmp_path, seeds)), "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    safety = _row(rows, "balanced_dpo", "Balanced DPO", "base", "dualuse_test:safety")
    assert safety["needed_observed"]["status"] == "undefined" and "width 0" in safety["needed_observed"]["note"]
    zero = _row(rows, "balanced_dpo", "Balanced DPO", "DPO unbalanced", "dualuse_test:utility")
    assert zero["needed_observed"] == {"value": "inf", "status": "infinite",
                                       "note": "effect ≤ 0: no number of prompts shows A > B"}
    unmeasured = _row(rows, "balanced_dpo", "base", "DPO unbalanced", "dualuse_test:utility")
    assert unmeasured["needed_observed"]["status"] == "undefined" and unmeasured["n"] is None
    text = out.with_suffix(".json").read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON
    md = out.with_suffix(".md").read_text()
    assert "undefined (CI width 0)" in md and "∞ (effect ≤ 0)" in md


def test_markdown_lists_every_claim_of_every_section(tmp_path):
    from alignkit.demo import sections

    demos = dict(sections(None))
    seeds = {str(s): {name: {"claims": [_claim(a, b, m, 0.1 * (i + 1), 0.01, 0.2 * (i + 1), 30 + s)
                                         for i, (a, b, m) in enumerate(demo.get("claims", []))]}
                      for name, demo in demos.items()} for s in range(3)}
    seeds["0"]["custom"] = {"claims": [_claim("X", "Y", "set:metric", 0.02, -0.01, 0.05, 50)]}  # no DEMO dict
    out = tmp_path / "p"
    assert power.main([str(_write(tmp_path, seeds)), "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    expected = [f"| {name} | {a} > {b} ({demo['metrics'].get(m, m)}) |"
                for name, demo in demos.items() for a, b, m in demo.get("claims", [])]
    assert len(expected) >= 20
    for line in expected:
        assert line in md, line
    assert "| custom | X > Y (set:metric) | 50 |" in md
    assert "| 30–32 |" in md  # n differs across seeds: shown as a range
    assert "multiply by 1.49" in md  # 80% on all 3 seeds
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == len(expected) + 1


def test_every_demo_claim_has_a_paper_entry_and_no_stale_ones():
    """A renamed claim must not silently lose its paper effect (or its reason for having none)."""
    from alignkit.demo import sections

    claims = {(name, *c) for name, demo in sections(None) for c in demo.get("claims", [])}
    assert set(power.PAPER_EFFECTS) == claims
    for key, eff in power.PAPER_EFFECTS.items():
        assert eff.source and eff.basis, key
        if eff.delta is not None:
            assert 0 < eff.delta < 1, key  # on the tiny world's scale (fractions / AED)


def test_no_torch_import(tmp_path):
    path = _write(tmp_path, {"0": {"sft": {"claims": [_claim("SFT", "base", "qa_finetune:accuracy",
                                                             0.8, 0.7, 0.9, 83)]}}})
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import power; "
            f"power.main([{str(path)!r}]); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "SFT > base" in proc.stdout
