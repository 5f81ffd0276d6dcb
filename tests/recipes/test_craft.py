"""CRaFT end to end on the tiny world through the CLI (shipped YAML), plus a baseline
variant that must reuse the cached knowledge-state query."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_effect

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def cli(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "alignkit", *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.learned_effect
def test_craft_end_to_end(tiny_world_dir, tmp_path):
    stages = tmp_path / "stages"  # a cold stage cache: every stage runs
    cli("train", str(ROOT / "recipes/craft.yaml"), f"output_dir={tmp_path / 'craft'}", f"method.stage_dir={stages}")
    run = tmp_path / "craft"
    assert (run / "RUN_COMPLETE").exists()
    rep = json.loads((run / "craft_report.json").read_text())
    b = rep["buckets"]
    assert b["vanilla"] > 0 and b["idk"] > 0 and sum(b.values()) >= 400
    assert sum(rep["reasons"].values()) == sum(b.values())
    assert rep["by_knowledge"]["known"].get("vanilla", 0) > rep["by_knowledge"]["known"].get("idk", 0)
    assert rep["rehearsal"]["rehearsal_items"] > 0
    table = [json.loads(x) for x in Path(rep["stages"]["select"]).read_text().splitlines()]
    idk = [r for r in table if r["bucket"] == "idk"]
    assert idk and all(r["mu0"] <= 0.49 and r["delta_mu"] <= 0 and r["completion"] == "I don't know." for r in idk)
    assert all(r["mu0"] >= 0.51 for r in table if r["bucket"] == "vanilla")
    query = [json.loads(x) for x in Path(rep["stages"]["query"]).read_text().splitlines()]
    assert all(len(q["samples"]) == 10 and 0 <= q["sigma0"] <= 1 + 1e-6 for q in query)
    ev = json.loads((run / "metrics.json").read_text())["eval"]
    for name in ("qa_test", "qa_ood", "qa_val"):
        r = ev[name]
        assert r["p_correct"] + r["p_wrong"] + r["p_refusal"] == pytest.approx(1.0)
        lo, hi = r["ci95"]["ths"]
        assert lo <= r["ths"] <= hi
        assert_effect(f"RAIT taught 'I don't know': refusal share on {name}", r["p_refusal"], 0.0)
    recs = [json.loads(x) for x in (run / "eval_qa_test.jsonl").read_text().splitlines()]
    assert all(x["ths_k"] == pytest.approx(ev["qa_test"]["p_correct0"] / ev["qa_test"]["p_wrong0"]) for x in recs)
    # THS recounted from the records: the run's verdicts against the initial model's (its stage file)
    ref = [json.loads(x) for x in Path(rep["stages"]["initial_eval"]).read_text().splitlines()]
    ref = [x for x in ref if x["eval_set"] == "qa_test"]

    def rates(rs):
        return (sum(x["correct"] for x in rs) / len(rs),
                sum(not x["correct"] and not x["refusal"] for x in rs) / len(rs))

    (pc, pw), (pc0, pw0) = rates(recs), rates(ref)
    assert len(ref) == len(recs) and ev["qa_test"]["ths"] == pytest.approx(pc - pw * pc0 / pw0)
    # Δμ = μ(rehearsed) − μ(initial), both from the rehearsal stage's own queries
    flow = [json.loads(x) for x in Path(rep["stages"]["rehearse"]).read_text().splitlines()]
    assert flow and all(r["delta_mu"] == pytest.approx(r["mu_reh"] - r["mu0_local"]) for r in flow)
    assert {r["qid"] for r in flow} == {q["qid"] for q in query if q["mu0"] <= 0.49}

    # A baseline variant reuses the query stage (same fingerprint) and has no rehearsal.
    # (Same path = same key; an unchanged mtime = not recomputed.)
    stamps = {k: Path(rep["stages"][k]).stat().st_mtime_ns for k in ("query", "initial_eval")}
    cli("train", str(ROOT / "recipes/craft.yaml"), f"output_dir={tmp_path / 'cor'}", f"method.stage_dir={stages}",
        "method.variant=cor_rait")
    rep2 = json.loads((tmp_path / "cor" / "craft_report.json").read_text())
    assert rep2["stages"]["query"] == rep["stages"]["query"] and rep2["stages"]["rehearse"] is None
    assert rep2["stages"]["initial_eval"] == rep["stages"]["initial_eval"]
    assert {k: Path(rep["stages"][k]).stat().st_mtime_ns for k in stamps} == stamps
