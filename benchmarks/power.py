"""Power calculation for the demo's paper claims: how many eval prompts each claim "A > B" needs.

    python benchmarks/power.py runs/demo/metrics.json [--out runs/demo/power] [--checks]

Reads the ``metrics.json`` that ``alignkit demo`` writes (``results["seeds"][seed][section]["claims"]``:
``a``, ``b``, ``metric``, ``diff``, ``lo``, ``hi``, ``n``, ``verdict``; alignkit/demo.py ``section_stats``)
and, for every claim of every section (with ``--checks`` the other paired comparisons too), prints
a Markdown table (and writes ``<out>.md`` / ``<out>.json`` with ``--out``):

- ``n``: the paired prompts of the claim's eval set (people for bio_test, requests for jailbreak_test);
- the paired difference A − B on each world seed, with its standard error read off the 95% CI,
  ``SE = (hi − lo) / (2 · 1.96)`` (the demo's CI is a percentile bootstrap; the half-width is
  an approximation of 1.96 SE);
- the pooled SE at the current n: per-prompt sd ``sd_i = SE_i · sqrt(n_i)`` averaged in
  square over the seeds, ``SE = sd / sqrt(n)``; and the sd of the per-seed differences
  (seed-to-seed variation that more prompts do not remove);
- the prompts needed for 80% power under the demo's verdict rule (beyond noise = the CI's
  lower bound above 0, a one-sided test at alpha 0.025) to detect (a) the effect observed,
  the mean of the per-seed differences, and (b) the paper's reported effect where
  :data:`PAPER_EFFECTS` gives one on the tiny world's scale::

      n_needed = n · ((z_0.975 + z_0.80) · SE / delta)²  =  ((1.960 + 0.842) · sd / delta)²

  (the SE of a mean over prompts scales as 1/sqrt(n)). An effect ≤ 0 needs infinitely many
  prompts (more prompts make "A > B" less likely); a CI of width 0 (every resample gives the
  same difference) leaves the noise unmeasured and the number undefined. Below ~10 prompts
  the normal approximation behind the formula does not hold: read it as "the current n is
  not the limit".

80% is the power on *one* seed; for the claim to hold on all k seeds with 80% probability,
each seed needs power 0.8^(1/k) (the report prints the factor: ×1.49 for 3 seeds).

Pure Python (no torch): only the recipe modules' ``DEMO`` dicts are imported, to label rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALPHA = 0.025  # one-sided: the verdict "beyond noise" is the 95% CI's lower bound above 0
POWER = 0.80
Z_CI = NormalDist().inv_cdf(0.975)  # the demo's 95% CI: half-width ≈ 1.96 SE


def z_sum(alpha: float = ALPHA, power: float = POWER) -> float:
    """z_(1−alpha) + z_power: 1.960 + 0.842 = 2.802 at the defaults."""
    return NormalDist().inv_cdf(1 - alpha) + NormalDist().inv_cdf(power)


@dataclass(frozen=True)
class PaperEffect:
    """A paper's effect for one claim. ``delta`` is A − B on the tiny world's metric scale
    (fractions for rates and THS, as metrics.json stores them; AED as is), or None when the
    paper gives no number that can be put on that scale (``basis`` says why)."""

    delta: float | None
    source: str  # the method note (/work/shared/methods/<file>.md) and the paper's table / number
    basis: str   # how the paper's numbers were translated, or why they are not comparable


_NO_TABLES_TA = ("methods/ta_sft_emd.md §2, §8 (arXiv 2412.06843)",
                 "not comparable: the paper's result tables are not established (only '0.5% of the "
                 "safety data' is known), and alignkit's loss is a reconstruction")
_NO_TABLES_BAL = ("methods/balanced_dpo.md §7 (arXiv 2501.13952, abstract)",
                  "not comparable: the paper gives only overall-score margins over other models "
                  "(Claude-3 / GPT-4o / LLaMA-3: 13.44 / 7.16 / 7.10%); per-model safety and utility "
                  "and the balanced-seed ablation are not established")

# (section, A, B, metric) -> the paper's effect. Sources are the project's method notes in
# /work/shared/methods/*.md (cited as methods/<file>.md), each quoting the paper's tables.
PAPER_EFFECTS: dict[tuple[str, str, str, str], PaperEffect] = {
    ("sft", "SFT", "base", "qa_finetune:accuracy"): PaperEffect(
        None, "—", "no paper number: SFT is the baseline recipe, and no paper reports accuracy on "
                   "the trained questions themselves"),
    # methods/mask_dpo.md §7, Table 2 (masking ablation, ANAH-v2 %Score on the ANAH test set):
    # vanilla DPO 68.44 -> Mask-DPO 77.53 (+9.09 points); Table 1: Llama3.1-8B-Instruct 49.19.
    ("mask_dpo", "Mask-DPO", "DPO", "bio_test:score"): PaperEffect(
        0.7753 - 0.6844, "methods/mask_dpo.md §7, Table 2 (arXiv 2503.02846): DPO 68.44 → Mask-DPO 77.53",
        "same statistic as bio_test:score (correct / (correct + incorrect) sentences, micro-averaged "
        "over all responses); other domain (ANAH topics vs held-out people) and base (49.19 vs 29–42%)"),
    ("mask_dpo", "DPO", "base", "bio_test:score"): PaperEffect(
        0.6844 - 0.4919, "methods/mask_dpo.md §7, Tables 1–2: Llama3.1-8B-Instruct 49.19 → DPO 68.44",
        "same statistic as bio_test:score; other domain and base, as above"),
    # methods/craft.md §7, Table 2 (arXiv 2410.06913), OEQA rows of LLaMA3-8B-Instruct (the setup
    # of recipes/examples/craft_llama3_8b.yaml). TriviaQA (ID): CRaFT 21.5 vs Cor-RAIT 18.8
    # (the note's claim line: +2.72; LLaMA2-7B-Chat +3.56). NQ (OOD): 0.4 vs -0.1 (LLaMA2: 6.5 vs 4.7).
    ("craft", "CRaFT", "Cor-RAIT", "qa_test:ths"): PaperEffect(
        0.0272, "methods/craft.md §7, Table 2: TriviaQA (ID), LLaMA3-8B, CRaFT − Cor-RAIT = +2.72 THS",
        "same THS (P_c − P_w·P_c0/P_w0, relative to the initial model) on open-ended QA; its scale "
        "depends on the initial model (TriviaQA P_c0/P_w0 66.8/33.2, tiny world ≈ 47/53): taken as is"),
    ("craft", "CRaFT", "Cor-RAIT", "qa_ood:ths"): PaperEffect(
        0.005, "methods/craft.md §7, Table 2: NQ (OOD), LLaMA3-8B, CRaFT 0.4 vs Cor-RAIT −0.1 THS",
        "same THS; the paper's OOD is another dataset (NQ), the tiny world's other people and "
        "wordings (LLaMA2-7B's +1.8 would need 13× fewer prompts)"),
    ("ta_sft", "SFT", "TA-SFT", "harmful_test:harmful_compliance_rate"): PaperEffect(None, *_NO_TABLES_TA),
    ("ta_sft", "TA-SFT", "GA", "qa_test:accuracy"): PaperEffect(None, *_NO_TABLES_TA),
    ("ta_sft", "TA-SFT λ=32", "TA-SFT λ=4", "benign_test:benign_unanswered_rate"): PaperEffect(
        None, _NO_TABLES_TA[0], "not comparable: the paper states over-alignment grows during training "
                                "(qualitative), with no number"),
    ("ta_sft", "TA-SFT N=24", "TA-SFT N=2", "benign_test:benign_unanswered_rate"): PaperEffect(
        None, _NO_TABLES_TA[0], "not comparable: no number in what is known of the paper"),
    # methods/safety_cft_jailbreak.md §6 (arXiv 2501.18632; its tables are marked provisional):
    # Llama3.1-8B vs Llama3.1-8B-CFT over plain, PAIR, PAP ×3, FlipAttack.
    # Table 2 (CR): 0.72 0.98 0.89 0.94 0.98 0.70 (mean 0.868) -> 0.01 0.08 0.02 0.04 0.05 0.01 (0.035).
    ("cft", "base", "CFT", "jailbreak_test:cr"): PaperEffect(
        (0.72 + 0.98 + 0.89 + 0.94 + 0.98 + 0.70) / 6 - (0.01 + 0.08 + 0.02 + 0.04 + 0.05 + 0.01) / 6,
        "methods/safety_cft_jailbreak.md §6, Table 2 (provisional): mean CR 0.868 → 0.035",
        "CR (all) is the same mean over (request, technique) with the same six techniques; the table "
        "is provisional and its judge is GPT-4o, the tiny world's the exact kb judge"),
    # Table 1 (MES): 0.57 0.83 0.64 0.63 0.63 0.57 (mean 0.645) -> 0.01 0.05 0.01 0.02 0.02 0.01 (0.020).
    ("cft", "base", "CFT", "jailbreak_test:mes"): PaperEffect(
        (0.57 + 0.83 + 0.64 + 0.63 + 0.63 + 0.57) / 6 - (0.01 + 0.05 + 0.01 + 0.02 + 0.02 + 0.01) / 6,
        "methods/safety_cft_jailbreak.md §6, Table 1 (provisional): mean MES 0.645 → 0.020",
        "same StrongREJECT scale [0, 1]; the table is provisional and disagrees with the text's "
        "'62.7% average reduction' (the note, §6)"),
    # Table 3 (MBR): Llama3.1-8B 0.66 -> 0.02 after CFT.
    ("cft", "base", "CFT", "jailbreak_test:mbr"): PaperEffect(
        None, "methods/safety_cft_jailbreak.md §6, Table 3 (provisional): MBR 0.66 → 0.02",
        "not comparable: Table 3's MBR (0.66) is below Table 2's PAIR CR alone (0.98), so its success "
        "is not compliance; the demo counts compliance (mbr_success: compliance)"),
    ("cft", "CFT+replay", "CFT", "qa_test:accuracy"): PaperEffect(
        None, "docs/recipes/cft.md", "no paper number: replay (benign_mix_ratio) is alignkit's extension"),
    # methods/se_abstention.md §6, Table 1 (arXiv 2410.17234): mean AED over the Short-QA datasets
    # (the tiny world's answers are short), SE with the Llama judge; lower is better, so the claim
    # "baseline AED > SE AED" is baseline − SE. ID: R-Tuning 0.469, R-Tuning-U 0.438, SE 0.428;
    # OOD: 0.508, 0.485, 0.473.
    ("se_abstention", "R-Tuning", "SE abstention", "qa_test:aed"): PaperEffect(
        0.469 - 0.428, "methods/se_abstention.md §6, Table 1: Short-QA ID, R-Tuning 0.469 vs SE 0.428",
        "same AED formula and direction; the paper's is a mean over datasets and 3 training seeds"),
    ("se_abstention", "R-Tuning-U", "SE abstention", "qa_test:aed"): PaperEffect(
        0.438 - 0.428, "methods/se_abstention.md §6, Table 1: Short-QA ID, R-Tuning-U 0.438 vs SE 0.428",
        "same AED; as above"),
    ("se_abstention", "R-Tuning", "SE abstention", "qa_ood:aed"): PaperEffect(
        0.508 - 0.473, "methods/se_abstention.md §6, Table 1: Short-QA OOD, R-Tuning 0.508 vs SE 0.473",
        "same AED; as above"),
    ("se_abstention", "R-Tuning-U", "SE abstention", "qa_ood:aed"): PaperEffect(
        0.485 - 0.473, "methods/se_abstention.md §6, Table 1: Short-QA OOD, R-Tuning-U 0.485 vs SE 0.473",
        "same AED; as above"),
    ("balanced_dpo", "Balanced DPO", "base", "dualuse_test:safety"): PaperEffect(None, *_NO_TABLES_BAL),
    ("balanced_dpo", "Balanced DPO", "DPO unbalanced", "dualuse_test:utility"): PaperEffect(None, *_NO_TABLES_BAL),
    ("balanced_dpo", "base", "DPO unbalanced", "dualuse_test:utility"): PaperEffect(None, *_NO_TABLES_BAL),
}


def se_from_ci(lo: float | None, hi: float | None, z: float = Z_CI) -> float | None:
    """Standard error from a 95% CI: its half-width over 1.96. None without a CI."""
    if lo is None or hi is None:
        return None
    return (hi - lo) / (2 * z)


def prompts_needed(n: float | None, se: float | None, delta: float | None,
                   alpha: float = ALPHA, power: float = POWER) -> dict:
    """Prompts for ``power`` to see "A > B" beyond noise when the true A − B is ``delta`` and the
    SE at ``n`` prompts is ``se``: ``n · ((z_(1−alpha) + z_power) · se / delta)²``.

    Returns ``{"value", "status", "note"}``; status ``ok`` (value a float), ``infinite`` (delta
    ≤ 0: no number of prompts shows A > B; value ``inf``) or ``undefined`` (no effect, no CI, or a
    CI of width 0: the noise is unmeasured; value None)."""
    if delta is None:
        return {"value": None, "status": "undefined", "note": "no effect given"}
    if delta <= 0:
        return {"value": math.inf, "status": "infinite",
                "note": "effect ≤ 0: no number of prompts shows A > B"}
    if n is None or se is None:
        return {"value": None, "status": "undefined", "note": "no CI measured"}
    if se <= 0:
        return {"value": None, "status": "undefined",
                "note": "CI width 0: every resample gave the same difference, the noise is unmeasured"}
    return {"value": n * (z_sum(alpha, power) * se / delta) ** 2, "status": "ok", "note": ""}


def pooled(per_seed: list[dict]) -> dict:
    """Pool the seeds that measured the claim: per-prompt sd ``SE·sqrt(n)`` averaged in square,
    the mean difference, the sd of the differences across seeds and the smallest n."""
    got = [s for s in per_seed if s["diff"] is not None]
    with_ci = [s for s in got if s["se"] is not None and s["n"]]
    out: dict = {"seeds_measured": len(got), "effect": None, "seed_sd": None, "n": None, "sd": None, "se": None}
    if got:
        diffs = [s["diff"] for s in got]
        out["effect"] = sum(diffs) / len(diffs)
        if len(diffs) > 1:
            m = out["effect"]
            out["seed_sd"] = math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1))
    if with_ci:
        out["n"] = min(int(s["n"]) for s in with_ci)
        out["sd"] = math.sqrt(sum(s["se"] ** 2 * s["n"] for s in with_ci) / len(with_ci))
        out["se"] = out["sd"] / math.sqrt(out["n"])
    return out


def _demo_sections() -> dict[str, dict]:
    from alignkit.demo import sections

    return dict(sections(None))


def _pct(metric: str) -> bool:
    from alignkit.demo import _pct as pct

    return pct(metric)


def analyse(results: dict, kinds: tuple[str, ...] = ("claims",), alpha: float = ALPHA,
            power: float = POWER) -> list[dict]:
    """One row per claim of every section present in ``results`` (a demo metrics.json)."""
    seeds = list(results["seeds"])
    demos = _demo_sections()
    present = [name for name in demos if any(name in results["seeds"][s] for s in seeds)]
    present += sorted({name for s in seeds for name in results["seeds"][s]} - set(present))
    rows = []
    for name in present:
        demo = demos.get(name, {})
        for kind in kinds:
            # the DEMO dict's claims first (its labels), then any the metrics.json has beyond them
            tuples = [tuple(c) for c in demo.get(kind, [])]
            for s in seeds:
                for c in results["seeds"][s].get(name, {}).get(kind) or []:
                    if (c["a"], c["b"], c["metric"]) not in tuples:
                        tuples.append((c["a"], c["b"], c["metric"]))
            for a, b, metric in tuples:
                per_seed = []
                for s in seeds:
                    got = [c for c in results["seeds"][s].get(name, {}).get(kind) or []
                           if (c["a"], c["b"], c["metric"]) == (a, b, metric)]
                    c = got[0] if got else {"diff": None, "verdict": "not measured"}
                    per_seed.append({"seed": s, "n": c.get("n"), "diff": c.get("diff"), "lo": c.get("lo"),
                                     "hi": c.get("hi"), "se": se_from_ci(c.get("lo"), c.get("hi")),
                                     "verdict": c.get("verdict")})
                p = pooled(per_seed)
                paper = PAPER_EFFECTS.get((name, a, b, metric))
                rows.append({
                    "section": name, "title": demo.get("title", name), "kind": kind, "a": a, "b": b,
                    "metric": metric, "metric_label": demo.get("metrics", {}).get(metric, metric),
                    "pct": _pct(metric), "per_seed": per_seed, **p,
                    "needed_observed": prompts_needed(p["n"], p["se"], p["effect"], alpha, power)
                    if p["seeds_measured"] else {"value": None, "status": "undefined", "note": "not measured"},
                    "paper": None if paper is None else {"delta": paper.delta, "source": paper.source,
                                                         "basis": paper.basis},
                    "needed_paper": prompts_needed(p["n"], p["se"], paper.delta, alpha, power)
                    if paper is not None and paper.delta is not None
                    else {"value": None, "status": "undefined",
                          "note": "no paper effect" if paper is None else paper.basis},
                })
    return rows


def _v(x: float | None, pct: bool, signed: bool = False) -> str:
    if x is None:
        return "—"
    if pct:
        return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _needed(d: dict, n: int | None) -> str:
    if d["status"] == "infinite":
        return "∞ (effect ≤ 0)"
    if d["status"] != "ok":
        return "undefined (CI width 0)" if "width 0" in d["note"] else "—"
    k = math.ceil(d["value"])
    if n is None:
        return str(k)
    return f"{k} (n enough)" if k <= n else f"{k} ({k / n:.1f}× n)"


def markdown(rows: list[dict], results: dict, alpha: float = ALPHA, power: float = POWER) -> str:
    from alignkit.evaluation.report import markdown_table

    seeds = list(results["seeds"])
    k = len(seeds)
    per_seed_power = power ** (1 / k) if k else power
    factor = (z_sum(alpha, per_seed_power) / z_sum(alpha, power)) ** 2
    lines = ["# Prompts needed for the papers' claims", "",
             f"World seeds {', '.join(map(str, seeds))}. Each claim \"A > B\" is judged beyond noise when the "
             "95% paired-bootstrap CI of A − B has its lower bound above 0 (a one-sided test at "
             f"alpha {alpha}). SE = CI half-width / 1.96 on each seed, pooled over the seeds as a "
             "per-prompt sd (SE·√n, averaged in square). Prompts needed for "
             f"{power:.0%} power on one seed: n · ((z_{1 - alpha:g} + z_{power:g}) · SE / effect)² "
             f"= n · ({z_sum(alpha, power):.3f} · SE / effect)². Differences and SEs in points for rates "
             "(and THS, MES), as is for AED. *seed sd*: the spread of the per-seed differences, which "
             "more prompts do not remove.", ""]
    if k > 1:
        lines += [f"For the claim to hold on all {k} seeds with {power:.0%} probability, multiply by "
                  f"{factor:.2f} (power {per_seed_power:.3f} per seed).", ""]
    if results.get("smoke"):
        lines += ["**A smoke run** (`alignkit demo --smoke`): `eval.limit` caps n; these numbers say "
                  "nothing about the real eval sets.", ""]
    table = []
    for r in rows:
        pct = r["pct"]
        cells = []
        for s in r["per_seed"]:
            if s["diff"] is None:
                cells.append(f"s{s['seed']} —")
            else:
                se = "" if s["se"] is None else f" ±{_v(s['se'], pct)}"
                cells.append(f"s{s['seed']} {_v(s['diff'], pct, True)}{se}")
        ns = sorted({int(s["n"]) for s in r["per_seed"] if s["n"]})
        n_txt = "—" if not ns else (str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}")
        paper = r["paper"]
        if paper is None:
            paper_txt = "—"
        elif paper["delta"] is None:
            paper_txt = "not comparable" if paper["basis"].startswith("not comparable") else "no paper number"
        else:
            paper_txt = _v(paper["delta"], pct, True)
        table.append([r["section"] + ("" if r["kind"] == "claims" else " (check)"),
                      f"{r['a']} > {r['b']} ({r['metric_label']})", n_txt, "; ".join(cells),
                      _v(r["se"], pct), _v(r["seed_sd"], pct), _v(r["effect"], pct, True),
                      _needed(r["needed_observed"], r["n"]), paper_txt, _needed(r["needed_paper"], r["n"])])
    lines += [markdown_table(["section", "claim", "n", "A − B ±SE per seed", "SE", "seed sd", "observed",
                              "n needed (observed)", "paper", "n needed (paper)"], table), ""]
    lines += ["Paper effects (A − B on the tiny world's scale) and their sources:", ""]
    for r in rows:
        if r["paper"] is not None:
            p = r["paper"]
            lines.append(f"- {r['section']}, {r['a']} > {r['b']} ({r['metric_label']}): {p['source']}; {p['basis']}.")
    undefined = [r for r in rows if "width 0" in r["needed_observed"]["note"]]
    if undefined:
        lines += ["", "Undefined (CI of width 0 on every seed that measured it: each resample gave the "
                      "same difference, so the noise at this n is unmeasured): "
                  + "; ".join(f"{r['section']} {r['a']} > {r['b']} ({r['metric_label']})" for r in undefined)
                  + "."]
    return "\n".join(lines) + "\n"


def _jsonable(rows: list[dict]) -> list[dict]:
    def fix(x):
        if isinstance(x, float) and math.isinf(x):
            return "inf"
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x

    return [fix(r) for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", help="metrics.json written by `alignkit demo`")
    p.add_argument("--out", help="write <out>.md and <out>.json")
    p.add_argument("--checks", action="store_true", help="also the sections' other paired comparisons")
    p.add_argument("--alpha", type=float, default=ALPHA, help="one-sided alpha of the verdict (0.025)")
    p.add_argument("--power", type=float, default=POWER)
    args = p.parse_args(argv)
    results = json.loads(Path(args.metrics).read_text())
    kinds = ("claims", "checks") if args.checks else ("claims",)
    rows = analyse(results, kinds, args.alpha, args.power)
    md = markdown(rows, results, args.alpha, args.power)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md)
        doc = {"source": str(args.metrics), "alpha": args.alpha, "power": args.power,
               "z_sum": z_sum(args.alpha, args.power), "rows": _jsonable(rows)}
        out.with_suffix(".json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
