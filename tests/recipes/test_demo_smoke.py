"""`make demo`'s code path, end to end, in the suite: `alignkit demo --smoke` runs every section,
every recipe and every row (first-seed-only rows included) in worker processes, as `make demo`
does, on one world seed with small budgets and a cold stage cache. A crash anywhere in the
main job fails here (it would have caught CRaFT's initial-eval read of an eval set that
`eval.run` skipped, and the worker entry point passing `out_dir` twice)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.demo import sections

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_smoke_runs_every_section_and_row(tiny_world_dir, tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "alignkit", "demo", "--smoke", "--jobs", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    res = json.loads((out / "metrics.json").read_text())
    assert res["smoke"] is True and list(res["seeds"]) == ["0"]
    report = (out / "report.md").read_text()
    names = [name for name, _ in sections(None)]
    assert len(names) == 7 and set(res["seeds"]["0"]) == set(names)
    for name, demo in sections(None):
        sec = res["seeds"]["0"][name]
        assert set(sec["rows"]) == {label for label, _ in demo["rows"]}, name  # every row, first-seed-only too
        for kind in ("claims", "checks"):
            got = sec.get(kind, [])
            assert len(got) == len(demo.get(kind, [])), (name, kind)
            assert all(c["verdict"] in ("beyond noise", "within noise", "reversed") for c in got), (name, got)
        assert demo["title"] in report and (out / f"{name}.png").exists()
    # a cold cache: every prepare stage ran here (only the world was reused), and every trained row
    # left a complete run directory
    stages = {p.name.split("-")[0] for p in (out / "cache" / "stages").glob("*.provenance.json")}
    assert {"pairs_sample", "craft_query", "craft_rehearse", "craft_initial_eval", "unsafe_sample", "cft_mix",
            "se_sample", "se_sweep_point", "balanced_dpo_pairs"} <= stages, stages
    runs = [p.parent for p in (out / "seed0").glob("*/RUN_COMPLETE")]
    assert len(runs) == sum(recipe is not None for _, d in sections(None) for _, recipe in d["rows"])
