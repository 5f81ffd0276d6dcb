"""``alignkit demo``: every registered recipe and its paper baselines on the tiny world.

Each recipe module may declare ``DEMO`` — a section of the table::

    DEMO = {"title": ..., "evals": ["bio_test"],            # eval sets from the recipe's YAML
            "metrics": {"bio_test:score": "factuality"},    # "<eval>:<result key>" -> column label
            "columns": {"bio_test:score": "what it measures"},   # one line per column
            "rows": [("base", None), ("DPO", "dpo"), ("Mask-DPO", "mask_dpo")],
            "claims": [("Mask-DPO", "DPO", "bio_test:score")],  # "A > B" on a metric
            "expect_text": "Mask-DPO > DPO > base",
            # optional: line plots of metrics against a swept setting, one point per row
            "sweeps": [{"title": ..., "xlabel": "λ", "points": [(0.5, "row label"), ...], "metrics": [...]}],
            # optional: rows run on the first world seed only (their claims read "not measured" elsewhere)
            "first_seed_only": ["row label", ...],
            # overrides of ``alignkit demo --smoke``: small budgets that still run every stage
            "smoke": ["train.max_steps=2", "eval.limit=6", ...]}

"base" rows evaluate the untrained world model; other rows train the named recipe with
its shipped YAML (``recipes/<name>.yaml``) on the same world and evaluate the result
on the same eval sets. Every number gets a 95% bootstrap CI over prompts; every claim
"A > B" a paired bootstrap CI of the difference on the same prompts and a verdict
(beyond noise / within noise / reversed). Several world seeds give the robustness table.

``alignkit demo --smoke`` runs every section, every recipe and every row through the same
code (worker processes included) on one world seed, with each recipe's ``DEMO["smoke"]``
budgets and a cold cache for stages and reference log-probs (only the world is reused):
what ``make test`` runs so that the main job cannot break unseen.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from alignkit.evaluation.report import bar_plot, fmt, markdown_table

log = logging.getLogger(__name__)
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def _recipe_config(name: str, seed: int, out: Path, extra: list[str] | None = None):
    from alignkit.recipes import load_config

    overrides = [f"model.name_or_path=world:tiny?seed={seed}", f"output_dir={out}", "overwrite_output_dir=true",
                 f"seed={seed}", *(extra or [])]
    return load_config(RECIPES_DIR / f"{name}.yaml", overrides)


def _base_eval(seed: int, recipe: str, evals: list[str], out: Path, extra: list[str] | None = None) -> dict:
    """Evaluate the untrained world model on eval sets of ``recipe``'s YAML."""
    from alignkit.config.paths import expand_config
    from alignkit.evaluation.run import evaluate_model
    from alignkit.judges import build_eval_judge
    from alignkit.models import load_for_inference

    cfg = _recipe_config(recipe, seed, out, extra)
    expand_config(cfg)
    model, tok = load_for_inference(cfg.model.name_or_path, cfg.model.dtype)
    judge = build_eval_judge(cfg.eval.judge, cfg.model.name_or_path)
    out.mkdir(parents=True, exist_ok=True)
    res = evaluate_model(model, tok, cfg.eval, judge, out, seed=seed,
                         datasets={e: cfg.eval.datasets[e] for e in evals})
    return res["eval"]


def _eval_tasks(recipe: str, seed: int, out: Path, extra: list[str] | None = None) -> dict[str, str]:
    cfg = _recipe_config(recipe, seed, out, extra)
    return {name: es.task for name, es in cfg.eval.datasets.items()}


def _dig(d: dict, keys: tuple):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _flatten(evals: dict) -> dict:
    return {f"{e}:{k}": v for e, res in evals.items() for k, v in res.items() if k != "ci95"}


def section_stats(demo: dict, tasks: dict[str, str], record_dirs: dict[str, Path]) -> dict:
    """CIs of every (row, metric) cell and paired verdicts of the section's claims, from
    the per-prompt eval records in ``record_dirs[row label]/eval_<set>.jsonl``."""
    from alignkit.metrics.records import metric_ci, paired_difference, read_records

    cache: dict = {}

    def records(label: str, ev: str) -> list[dict]:
        if (label, ev) not in cache:
            cache[label, ev] = read_records(Path(record_dirs[label]) / f"eval_{ev}.jsonl")
        return cache[label, ev]

    ci: dict = {}
    values: dict = {}
    for label in record_dirs:
        for metric in demo["metrics"]:
            ev, key = metric.split(":", 1)
            if ev not in tasks:  # not an eval set (e.g. train:n_unsafe, a count): no CI
                continue
            c = metric_ci(tasks[ev], records(label, ev), key)
            if c is not None:
                ci.setdefault(label, {})[metric] = [c["lo"], c["hi"]]
                values.setdefault(label, {})[metric] = c["value"]
    out: dict = {"ci": ci, "values": values}
    for kind in ("claims", "checks"):
        out[kind] = []
        for a, b, metric in demo.get(kind, []):
            ev, key = metric.split(":", 1)
            # a row run on the first seed only (DEMO["first_seed_only"]) has no records on the others
            d = paired_difference(tasks[ev], records(a, ev), records(b, ev), key) \
                if a in record_dirs and b in record_dirs else None
            out[kind].append({"a": a, "b": b, "metric": metric, **(d or {"diff": None, "lo": None, "hi": None,
                                                                         "verdict": "not measured"})})
    return out


def sections(selected: list[str] | None) -> list[tuple[str, dict]]:
    from alignkit.recipes import RECIPES, get_recipe

    out = []
    for name in RECIPES:
        demo = getattr(get_recipe(name), "DEMO", None)
        if demo and (selected is None or name in selected):
            out.append((name, demo))
    return out


def _run_section(s: int, name: str, out_dir: Path, first: bool = True,
                 smoke: bool = False) -> tuple[dict, list[tuple[str, float]]]:
    """Every row of one recipe's DEMO section on world seed ``s`` (rows in
    ``DEMO["first_seed_only"]`` only when ``first``); returns (section results, [(part, seconds)]).
    Trained rows evaluate only the eval sets the section reports (``eval.run``): validation
    sets a recipe defines for choosing hyperparameters are not re-measured by the demo.
    ``smoke``: every row with the recipes' ``DEMO["smoke"]`` budgets."""
    from alignkit.recipes import get_recipe
    from alignkit.world import ensure_tiny

    demo = get_recipe(name).DEMO
    budget = list(demo.get("smoke", [])) if smoke else []
    ensure_tiny(seed=s)  # another worker may be building it: wait on its lock
    timings: list[tuple[str, float]] = []
    rows, dirs, extras = {}, {}, {}
    base: dict | None = None
    reported = sorted({m.split(":", 1)[0] for m in [*demo["metrics"], *[c[2] for k in ("claims", "checks")
                                                                         for c in demo.get(k, [])]]}
                      - {"train"} | set(demo["evals"]))
    for label, recipe in demo["rows"]:
        if not first and label in demo.get("first_seed_only", ()):
            continue
        t0 = time.time()
        if recipe is None:
            base_dir = out_dir / f"seed{s}" / f"base_{name}"
            if base is None:
                base = _base_eval(s, name, demo["evals"], base_dir, budget)
            rows[label], dirs[label] = _flatten(base), base_dir
        else:
            # A row may run its recipe with its own overrides (e.g. a baseline variant of
            # one recipe, DEMO["row_overrides"][label]); it then gets its own run dir.
            row_extra = demo.get("row_overrides", {}).get(label)
            run_name = recipe if row_extra is None else f"{recipe}-{_slug(label)}"
            # the row's recipe's budgets (a recipe without a section of its own, e.g. dpo: this one's)
            row_budget = list((getattr(get_recipe(recipe), "DEMO", None) or demo).get("smoke", [])) if smoke else []
            cfg = _recipe_config(recipe, s, out_dir / f"seed{s}" / run_name,
                                 [*(demo.get("overrides", {}).get(recipe) or []), *(row_extra or []),
                                  *row_budget, f"eval.run=[{','.join(reported)}]"])
            run = get_recipe(recipe).train(cfg)
            rows[label] = _flatten(json.loads((Path(run) / "metrics.json").read_text())["eval"])
            train_results = json.loads((Path(run) / "train_results.json").read_text())
            # counts a recipe reports about its training data (train_results.json "counts")
            rows[label].update({f"train:{k}": v for k, v in (train_results.get("counts") or {}).items()})
            # tables / xy points a recipe emits for the report (train_results.json "demo")
            extras.setdefault(label, train_results.get("demo") or {})
            dirs[label] = Path(run)
        timings.append((f"seed {s}: {name} / {label}", time.time() - t0))
        log.info("demo seed %d %s %s: %s", s, name, label, {k: rows[label].get(k) for k in demo["metrics"]})
    stats = section_stats(demo, _eval_tasks(name, s, out_dir / f"seed{s}" / name, budget), dirs)
    for label, vals in stats.pop("values", {}).items():  # e.g. THS of the base row (its own reference)
        for metric, v in vals.items():
            rows[label].setdefault(metric, v)
    return {"rows": rows, "extras": extras, **stats}, timings


def _run_world(s: int) -> tuple[dict, list[tuple[str, float]]]:
    from alignkit.world import ensure_tiny

    t0 = time.time()
    wdir = ensure_tiny(seed=s)
    report = json.loads((Path(wdir) / "base_report.json").read_text())
    return report, [(f"seed {s}: tiny world (build or cache)", time.time() - t0)]


def _run_item(item: tuple, out_dir: Path, smoke: bool = False) -> tuple[tuple, dict, list[tuple[str, float]]]:
    if item[0] == "world":
        res, timings = _run_world(item[1])
    else:
        _, s, name, first = item
        res, timings = _run_section(s, name, out_dir, first, smoke)
    return item, res, timings


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _cold_cache(out_dir: Path, seeds: list[int]) -> None:
    """Point ``$ALIGNKIT_CACHE`` at an empty cache under ``out_dir`` whose ``world/`` is the
    current cache's (built first): every stage and reference pass then runs, and no world
    is pretrained again. Worker processes inherit the variable."""
    import os

    from alignkit.world import ensure_tiny
    from alignkit.world.cache import cache_root

    for s in seeds:
        ensure_tiny(seed=s)
    worlds = cache_root() / "world"
    cold = (out_dir / "cache").resolve()
    if cold.exists():
        import shutil

        shutil.rmtree(cold)
    cold.mkdir(parents=True)
    (cold / "world").symlink_to(worlds.resolve(), target_is_directory=True)
    os.environ["ALIGNKIT_CACHE"] = str(cold)


def run_demo(seed: int = 0, recipes: list[str] | None = None, out: str = "runs/demo",
             seeds: list[int] | None = None, jobs: int = 1, smoke: bool = False) -> dict:
    """Every section on every world seed. ``jobs > 1`` runs the parts (world builds, recipe
    sections) in that many worker processes with ``cpu_count // jobs`` torch threads each:
    the tiny model's sampling and training are dominated by per-step overhead that extra
    threads do not speed up, so two single-threaded workers on 2 cores do nearly twice the
    work of one two-threaded process (README, "The demo"). Results do not depend on the
    scheduling: every part has its own world seed, run directory and cached stages."""
    import os

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_seeds = [seed, *[s for s in (seeds or []) if s != seed]]
    if smoke:  # one seed, every row, cold stage cache (see the module docstring)
        all_seeds = [seed]
        _cold_cache(out_dir, all_seeds)
    names = [name for name, _ in sections(recipes)]
    t_start = time.time()
    # The worlds first, one at a time from this process, never in the workers: each builds in its
    # own subprocess at the numeric mode's fixed thread count (alignkit.world.cache), so two built
    # side by side would put 4 threads on 2 cores (a fresh-clone demo spent 4 min on a third of
    # two builds that take 105 s each alone); and no worker then waits on a world being built.
    done = [_run_item(("world", s), out_dir, smoke) for s in all_seeds]
    items = [("section", s, n, s == all_seeds[0]) for s in all_seeds for n in names]
    if jobs <= 1:
        done += [_run_item(it, out_dir, smoke) for it in items]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from alignkit.world.numerics import THREADS, is_pinned

        # in the testbed's numeric mode a constant (never the machine's core count), so every
        # machine splits each reduction the same way
        threads = max(1, (THREADS if is_pinned() else (os.cpu_count() or 1)) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads,)) as pool:
            done += list(pool.map(_run_item, items, [out_dir] * len(items), [smoke] * len(items)))
    from alignkit.world.numerics import is_pinned

    results: dict = {"seeds": {s: {} for s in all_seeds}, "world": {}, "jobs": max(1, jobs), "smoke": smoke,
                     "numerics": "testbed" if is_pinned() else "native"}
    timings: list[tuple[str, float]] = []
    for item, res, t in done:
        timings += t
        if item[0] == "world":
            results["world"][item[1]] = res
        else:
            results["seeds"][item[1]][item[2]] = res
    results["timings"] = timings
    results["total_seconds"] = time.time() - t_start
    write_report(results, out_dir, recipes)
    return results


def _slug(label: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


# Metrics in [0, 1] that are not rates (shown as plain numbers, not percent).
_PLAIN = {"aed"}


def _pct(key: str) -> bool:
    key = key.split(":")[-1]
    return not (key.endswith("per_response") or key.startswith("n_") or key == "n" or key in _PLAIN)


def _cell(v, key: str, ci: list | None = None) -> str:
    """``value [lo, hi]``: percent for rates, plain for per-response means and counts."""
    if key.split(":")[-1].startswith("n_") or key.split(":")[-1] == "n":
        return "—" if v is None else str(v)
    pct = _pct(key)
    out = fmt(v, pct=pct) if pct else _num(v)
    if ci:
        out += f" [{fmt(ci[0], pct=pct) if pct else _num(ci[0])}, {fmt(ci[1], pct=pct) if pct else _num(ci[1])}]"
    return out


def _num(x) -> str:
    return fmt(x, pct=False) if x is None or x != x else f"{x:.2f}"


def _signed(x: float, pct: bool) -> str:
    v = 100 * x if pct else x
    return f"{v:+.1f}" if pct else f"{v:+.2f}"


def claim_line(c: dict, labels: dict[str, str]) -> str:
    """ "Mask-DPO > DPO (factuality): +4.1 [-1.2, +9.0] within noise" """
    head = f"{c['a']} > {c['b']} ({labels.get(c['metric'], c['metric'])})"
    if c.get("diff") is None:
        return f"{head}: {c['verdict']}"
    pct = _pct(c["metric"])
    return (f"{head}: {_signed(c['diff'], pct)} [{_signed(c['lo'], pct)}, {_signed(c['hi'], pct)}] "
            f"**{c['verdict']}**")


def _base_ci(rep: dict, *keys) -> str:
    """A base_report.json value with its CI (the CI sits beside it as ``ci`` / ``<key>_ci``)."""
    parent = _dig(rep, keys[:-1])
    if not isinstance(parent, dict):
        return "—"
    v = parent.get(keys[-1])
    ci = parent.get("ci") if keys[-1] in ("acc", "compliance", "over_refusal") else parent.get(f"{keys[-1]}_ci")
    return _cell(v, keys[-1], ci)


def _claims_block(head: str, kind: str, demo: dict, name: str, results: dict, seeds: list) -> list[str]:
    """Per-seed paired differences with verdicts, then how many seeds hold each claim."""
    lines = [f"{head}, per seed — paired difference [95% CI]:", ""]
    for s in seeds:
        for c in results["seeds"][s][name][kind]:
            lines.append(f"- seed {s}: {claim_line(c, demo['metrics'])}")
    lines += ["", "Across seeds:", ""]
    for i, (a, b, metric) in enumerate(demo[kind]):
        vs = {s: results["seeds"][s][name][kind][i]["verdict"] for s in seeds}
        parts = [f"{v} on {sum(x == v for x in vs.values())}/{len(seeds)} (seed "
                 f"{', '.join(str(s) for s, x in vs.items() if x == v)})"
                 for v in ("beyond noise", "within noise", "reversed", "not measured")
                 if any(x == v for x in vs.values())]
        lines.append(f"- {a} > {b} ({demo['metrics'].get(metric, metric)}): {'; '.join(parts)}")
    return [*lines, ""]


def _anchor(title: str) -> str:
    """The anchor a Markdown renderer gives ``## title`` (GitHub's rule: lower case, drop what is
    not a letter, digit, space, hyphen or underscore, spaces to hyphens)."""
    import re

    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


_SHORT = {"beyond noise": "beyond", "within noise": "within", "reversed": "reversed", "not measured": "—"}


def scoreboard(results: dict, recipes: list[str] | None) -> list[str]:
    """The report's first table: every paper claim of every section, its verdict on each seed
    with the paired difference, and how many seeds hold it beyond noise."""
    seeds = list(results["seeds"])
    rows = []
    for name, demo in sections(recipes):
        for i, (a, b, metric) in enumerate(demo.get("claims", [])):
            cells, beyond, measured = [], 0, 0
            for s in seeds:
                got = results["seeds"][s].get(name, {}).get("claims") or []
                c = got[i] if i < len(got) else {"diff": None, "verdict": "not measured"}
                if c.get("diff") is None:
                    cells.append("—")
                    continue
                measured += 1
                beyond += c["verdict"] == "beyond noise"
                pct = _pct(metric)
                cells.append(f"{_SHORT.get(c['verdict'], c['verdict'])} {_signed(c['diff'], pct)} "
                             f"[{_signed(c['lo'], pct)}, {_signed(c['hi'], pct)}]")
            rows.append([f"[{demo['title']}](#{_anchor(demo['title'])})",
                         f"{a} > {b} ({demo['metrics'].get(metric, metric)})", *cells, f"{beyond}/{measured}"])
    if not rows:
        return []
    return ["## Scoreboard: the papers' claims", "",
            "Each claim \"A > B\" on each world seed: its verdict and the paired difference A − B "
            "[95% CI] (points for rates); the last column counts the seeds on which it holds beyond noise, "
            "of those that measured it. Each section below has the tables behind it.", "",
            markdown_table(["section", "claim", *[f"seed {s}" for s in seeds], "beyond noise"], rows), ""]


def _sweep_plot(path: Path, sw: dict, demo: dict, name: str, results: dict, seeds: list) -> Path:
    """One panel per metric: value (and 95% CI) against the swept setting, one line per seed."""
    from alignkit.evaluation.report import line_plot

    xs = [x for x, _ in sw["points"]]
    panels = {demo["metrics"].get(m, m): {
        f"seed {s}": ([results["seeds"][s][name]["rows"].get(lab, {}).get(m) for _, lab in sw["points"]],
                      [results["seeds"][s][name]["ci"].get(lab, {}).get(m) for _, lab in sw["points"]])
        for s in seeds} for m in sw["metrics"]}
    return line_plot(path, sw["title"], xs, panels, sw.get("xlabel", ""))


def _run_extras(demo: dict, name: str, results: dict, seeds: list, out_dir: Path) -> list[str]:
    """What a row's run put under train_results.json "demo": ``run_tables`` (``{header, rows,
    note}`` per seed) and ``sweep_plots`` (``[[x, y, point label], ...]`` per seed -> one PNG)."""
    from alignkit.evaluation.report import xy_plot

    lines: list[str] = []
    for t in demo.get("run_tables", []):
        got = [(s, results["seeds"][s][name].get("extras", {}).get(t["row"], {}).get(t["key"])) for s in seeds]
        got = [(s, tab) for s, tab in got if tab]
        if not got:
            continue
        lines += [f"{t['title']} ({t['row']} run):", ""]
        lines += [markdown_table(["seed", *got[0][1]["header"]], [[s, *r] for s, tab in got for r in tab["rows"]]), ""]
        lines += [f"- seed {s}: {tab['note']}" for s, tab in got if tab.get("note")] + [""]
    for i, p in enumerate(demo.get("sweep_plots", [])):
        series = {f"seed {s}": results["seeds"][s][name].get("extras", {}).get(p["row"], {}).get(p["key"])
                  for s in seeds}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        png = xy_plot(out_dir / f"{name}_xy{i}.png", p["title"], series, p.get("xlabel", ""), p.get("ylabel", ""))
        lines += [f"{p['title']}: one point per threshold, one line per seed.", "", f"![{name} xy {i}]({png.name})", ""]
    return lines


def _numerics_sentence(mode: str | None) -> str:
    if mode == "testbed":
        return ("This run was in the testbed's reproducible numeric mode (AVX2 kernels, 2 threads; "
                "docs/testbed.md): the same library versions give these digits on every x86-64 machine.")
    return ("This run used PyTorch's native kernels (ALIGNKIT_NUMERICS=native): the trained tiny models differ "
            "in floating point between CPUs, so compare ranges over seeds, not one run's digits.")


def write_report(results: dict, out_dir: Path, recipes: list[str] | None) -> Path:
    from alignkit.core.io import atomic_write_text

    seeds = list(results["seeds"])
    lines = ["# alignkit demo on the tiny world", ""]
    jobs = results.get("jobs", 1)
    ran = (f" ({jobs} worker processes, so the seconds of each part below were measured while {jobs} parts "
           "ran at once)") if jobs > 1 else ""
    lines += [f"World seeds: {', '.join(map(str, seeds))}. Total time: {results['total_seconds'] / 60:.1f} min "
              f"on this machine{ran}.", "",
              "Every number is `value [lo, hi]`: the value on all prompts and its 95% percentile-bootstrap "
              "interval over prompts (2000 resamples; samples of one prompt stay together). Each claim "
              "\"A > B\" is judged by a paired bootstrap of the difference on the same prompts: *beyond noise* "
              "when the interval's lower bound is above 0, *reversed* when its upper bound is below 0, "
              "*within noise* otherwise. Each section says what each column measures — held-out people or "
              "questions, or training questions. The world's data is identical on every machine "
              "(digest below). " + _numerics_sentence(results.get("numerics")), ""]
    lines += scoreboard(results, recipes)
    lines += ["## The base model (what the tiny model knows before any recipe)", "",
              "Greedy answers to held-out qa_test questions by the fact's pretraining status, harmful-request "
              "compliance and benign look-alike over-refusal on the safety test prompts, and factuality of "
              "sampled biographies (T=1.0) of the held-out bio_test people.", ""]
    wrows = []
    for s, rep in results["world"].items():
        wrows.append([s, f"{rep.get('params', 0) / 1e6:.2f}M", _base_ci(rep, "qa_test", "known", "acc"),
                      _base_ci(rep, "qa_test", "partial", "acc"), _base_ci(rep, "qa_test", "unknown", "acc"),
                      _base_ci(rep, "safety_harmful_test", "compliance"),
                      _base_ci(rep, "safety_benign_test", "over_refusal"),
                      _base_ci(rep, "bio_test", "factuality"), f"{_dig(rep, ('build_seconds', 'total')) or 0:.0f}",
                      f"`{str(rep.get('data_digest', '—'))[:12]}`"])
    lines += [markdown_table(["seed", "params", "QA known %", "QA partial %", "QA unknown %",
                              "harmful compliance %", "benign over-refusal %", "sampled-bio factuality %",
                              "build s", "data sha256"], wrows), ""]
    table_print = []
    for name, demo in sections(recipes):
        lines += [f"## {demo['title']}", ""]
        if demo.get("note"):
            lines += [demo["note"], ""]
        if demo.get("columns"):
            lines += ["What each column measures:", ""]
            lines += [f"- **{demo['metrics'][k]}**: {v}" for k, v in demo["columns"].items()] + [""]
        header = ["seed", "model", *demo["metrics"].values()]
        rows = []
        for s in seeds:
            sec = results["seeds"][s][name]
            for label, _ in demo["rows"]:
                if label not in sec["rows"]:  # DEMO["first_seed_only"] on another seed
                    continue
                r, ci = sec["rows"][label], sec["ci"].get(label, {})
                rows.append([s, label, *[_cell(r.get(k), k, ci.get(k)) for k in demo["metrics"]]])
        lines += [markdown_table(header, rows), ""]
        main_metric = next(iter(demo["metrics"]))
        labels = [lab for lab, _ in demo["rows"]]
        series = {f"seed {s}": [results["seeds"][s][name]["rows"].get(lab, {}).get(main_metric) for lab in labels]
                  for s in seeds}
        errs = {f"seed {s}": [results["seeds"][s][name]["ci"].get(lab, {}).get(main_metric) for lab in labels]
                for s in seeds}
        png = bar_plot(out_dir / f"{name}.png", demo["title"], labels, series,
                       demo["metrics"][main_metric] + " (%, 95% CI)", errors=errs)
        lines += [f"![{name}]({png.name})", ""]
        for i, sw in enumerate(demo.get("sweeps", [])):
            png = _sweep_plot(out_dir / f"{name}_sweep{i}.png", sw, demo, name, results, seeds)
            lines += [f"{sw['title']}: each seed's value and 95% CI (numbers in the table above).", "",
                      f"![{name} sweep {i}]({png.name})", ""]
        lines += _run_extras(demo, name, results, seeds, out_dir)
        for kind, head in (("claims", f"Expected ordering ({demo.get('expect_text', '')})"),
                           ("checks", "Other paired comparisons (no expectation; reported either way)")):
            if demo.get(kind):
                lines += _claims_block(head, kind, demo, name, results, seeds)
        table_print.append((demo["title"], header, rows))
    # the timings last: what a reader wants first is the verdicts
    lines += ["## What was run", "", markdown_table(["part", "seconds"], [[n, f"{t:.0f}"] for n, t in results["timings"]]),
              ""]
    report = "\n".join(lines)
    atomic_write_text(out_dir / "report.md", report)
    atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=2, default=str))
    for title, header, rows in table_print:
        print(f"\n{title}\n" + markdown_table(header, rows))
    print(f"\nreport: {out_dir / 'report.md'}")
    return out_dir / "report.md"
