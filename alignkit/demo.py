"""``alignkit demo``: every registered recipe and its paper baselines on the tiny world.

Each recipe module may declare ``DEMO`` — a section of the table::

    DEMO = {"title": ..., "evals": ["bio_test"],            # eval sets from the recipe's YAML
            "metrics": {"bio_test:score": "factuality"},    # "<eval>:<result key>" -> column label
            "rows": [("base", None), ("DPO", "dpo"), ("Mask-DPO", "mask_dpo")]}

"base" rows evaluate the untrained world model; other rows train the named recipe with
its shipped YAML (``recipes/<name>.yaml``) on the same world and evaluate the result
on the same held-out set. Several world seeds give the robustness table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from alignkit.report import bar_plot, fmt, markdown_table

log = logging.getLogger(__name__)
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def _recipe_config(name: str, seed: int, out: Path, extra: list[str] | None = None):
    from alignkit.config import load_config

    overrides = [f"model.name_or_path=world:tiny?seed={seed}", f"output_dir={out}", "overwrite_output_dir=true",
                 f"seed={seed}", *(extra or [])]
    return load_config(RECIPES_DIR / f"{name}.yaml", overrides)


def _base_eval(seed: int, recipe: str, evals: list[str], out: Path) -> dict:
    """Evaluate the untrained world model on eval sets of ``recipe``'s YAML."""
    from alignkit.evaluation import build_eval_judge, evaluate_model
    from alignkit.models import load_for_inference
    from alignkit.paths import expand_config

    cfg = _recipe_config(recipe, seed, out)
    expand_config(cfg)
    model, tok = load_for_inference(cfg.model.name_or_path, cfg.model.dtype)
    judge = build_eval_judge(cfg.eval.judge, cfg.model.name_or_path)
    out.mkdir(parents=True, exist_ok=True)
    res = evaluate_model(model, tok, cfg.eval, judge, out, seed=seed,
                         datasets={e: cfg.eval.datasets[e] for e in evals})
    return res["eval"]


def _dig(d: dict, keys: tuple):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _flatten(evals: dict) -> dict:
    return {f"{e}:{k}": v for e, res in evals.items() for k, v in res.items()}


def sections(selected: list[str] | None) -> list[tuple[str, dict]]:
    from alignkit.recipes import RECIPES, get_recipe

    out = []
    for name in RECIPES:
        demo = getattr(get_recipe(name), "DEMO", None)
        if demo and (selected is None or name in selected):
            out.append((name, demo))
    return out


def run_demo(seed: int = 0, recipes: list[str] | None = None, out: str = "runs/demo",
             seeds: list[int] | None = None) -> dict:
    from alignkit.world import ensure_tiny, load_world  # noqa: F401

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_seeds = [seed, *[s for s in (seeds or []) if s != seed]]
    timings: list[tuple[str, float]] = []
    results: dict = {"seeds": {}, "world": {}}
    t_start = time.time()
    for s in all_seeds:
        t0 = time.time()
        wdir = ensure_tiny(seed=s)
        timings.append((f"seed {s}: tiny world (build or cache)", time.time() - t0))
        base_report = json.loads((Path(wdir) / "base_report.json").read_text())
        results["world"][s] = base_report
        seed_res: dict = {}
        base_cache: dict = {}
        for name, demo in sections(recipes):
            rows = {}
            for label, recipe in demo["rows"]:
                t0 = time.time()
                if recipe is None:
                    key = (name, tuple(demo["evals"]))
                    if key not in base_cache:
                        base_cache[key] = _base_eval(s, name, demo["evals"], out_dir / f"seed{s}" / f"base_{name}")
                    rows[label] = _flatten(base_cache[key])
                else:
                    from alignkit.recipes import get_recipe

                    cfg = _recipe_config(recipe, s, out_dir / f"seed{s}" / recipe, demo.get("overrides", {}).get(recipe))
                    run = get_recipe(recipe).train(cfg)
                    rows[label] = _flatten(json.loads((Path(run) / "metrics.json").read_text())["eval"])
                timings.append((f"seed {s}: {name} / {label}", time.time() - t0))
                log.info("demo seed %d %s %s: %s", s, name, label, {k: rows[label].get(k) for k in demo["metrics"]})
            seed_res[name] = rows
        results["seeds"][s] = seed_res
    results["timings"] = timings
    results["total_seconds"] = time.time() - t_start
    write_report(results, out_dir, recipes)
    return results


def _cell(v, key: str) -> str:
    key = key.split(":")[-1]
    if key.startswith("n_"):
        return str(v)
    if key.endswith("per_response"):
        return fmt(v, pct=False)
    return fmt(v)


def write_report(results: dict, out_dir: Path, recipes: list[str] | None) -> Path:
    from alignkit.training import atomic_write_text

    seeds = list(results["seeds"])
    lines = ["# alignkit demo on the tiny world", ""]
    lines += [f"World seeds: {', '.join(map(str, seeds))}. Total time: {results['total_seconds'] / 60:.1f} min "
              "on this machine. Every number is measured on held-out data (entities/questions never trained on).", ""]
    lines += ["## What was run", "", markdown_table(["part", "seconds"], [[n, f"{t:.0f}"] for n, t in results["timings"]]),
              ""]
    lines += ["## The base model (what the tiny model knows before any recipe)", ""]
    wrows = []
    for s, rep in results["world"].items():
        g = lambda *keys, rep=rep: _dig(rep, keys)  # noqa: E731
        wrows.append([s, f"{rep.get('params', 0) / 1e6:.2f}M", fmt(g("qa_test", "known", "acc")),
                      fmt(g("qa_test", "partial", "acc")), fmt(g("qa_test", "unknown", "acc")),
                      fmt(g("safety_harmful_test", "compliance")), fmt(g("safety_benign_test", "over_refusal")),
                      fmt(g("bio_test", "factuality")), f"{g('build_seconds', 'total') or 0:.0f}"])
    lines += [markdown_table(["seed", "params", "QA known %", "QA partial %", "QA unknown %",
                              "harmful compliance %", "benign over-refusal %", "sampled-bio factuality %",
                              "build s"], wrows), ""]
    table_print = []
    for name, demo in sections(recipes):
        lines += [f"## {demo['title']}", ""]
        if demo.get("note"):
            lines += [demo["note"], ""]
        header = ["seed", "model", *demo["metrics"].values()]
        rows = []
        for s in seeds:
            for label, _ in demo["rows"]:
                r = results["seeds"][s][name][label]
                rows.append([s, label, *[_cell(r.get(k), k) for k in demo["metrics"]]])
        lines += [markdown_table(header, rows), ""]
        main_metric = next(iter(demo["metrics"]))
        labels = [lab for lab, _ in demo["rows"]]
        series = {f"seed {s}": [results["seeds"][s][name][lab].get(main_metric) for lab in labels] for s in seeds}
        png = bar_plot(out_dir / f"{name}.png", demo["title"], labels, series, demo["metrics"][main_metric] + " (%)")
        lines += [f"![{name}]({png.name})", ""]
        verdict = demo.get("expect")
        if verdict:
            ok = [verdict(results["seeds"][s][name]) for s in seeds]
            lines += [f"Expected ordering ({demo['expect_text']}): holds on {sum(ok)}/{len(ok)} seeds "
                      f"({', '.join(str(s) for s, o in zip(seeds, ok) if not o) or 'all hold'}"
                      f"{' fail' if not all(ok) else ''}).", ""]
        table_print.append((demo["title"], header, rows))
    report = "\n".join(lines)
    atomic_write_text(out_dir / "report.md", report)
    atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=2, default=str))
    for title, header, rows in table_print:
        print(f"\n{title}\n" + markdown_table(header, rows))
    print(f"\nreport: {out_dir / 'report.md'}")
    return out_dir / "report.md"
