"""DPO training speed and peak memory: alignkit's ``dpo`` recipe at its defaults vs ``trl.DPOTrainer``.

Setup (issue #13, scaled to fit ``make bench`` on a 2-core CPU): random, seeded Llamas built
locally (``dpo_common.MODELS``): ``wide`` = the issue's 6.3M-parameter model (vocab 4096,
hidden 256, 4 layers, untied) — the headline — and ``tiny`` = the tiny-world architecture
(vocab 1500, hidden 128, 4 layers, tied). Data: fixed long-tailed preference pairs
(prompt+chosen tokens p50 47, p90 118, max 262; token-exact words), batch 8, one epoch.

Arms, rotated A/B/C, B/C/A, C/A/B over the repeats; every run is its own process, forked from
a per-framework process that has done nothing but the imports (``dpo_common.Zygote``):
* ``alignkit``: the ``dpo`` recipe through its public path (a recipe YAML, ``load_config`` and
  the recipe's ``train``) with only model, data, output dir, batch size, epochs, logging,
  report_to and eval set — whatever alignkit's defaults are is what is measured. Every run gets
  a fresh ``ALIGNKIT_CACHE`` (cold); one extra run reuses a cache (warm).
* ``trl_fastest``: ``DPOTrainer`` with ``precompute_ref_log_probs=True``, no gradient
  checkpointing, fp32; ``trl_default``: DPOConfig defaults (gradient checkpointing, live
  reference) in fp32 (its bf16 default refuses to start on CPU). Same data, batch, lr, seed.

Timed section, identical for all arms: from just before the data, tokenizer and model are read
(alignkit: its recipe train entry) to the end of ``Trainer.train()``: tokenisation, model load,
reference copy or pass (TRL's runs inside ``DPOTrainer.__init__``) and the loop; not imports,
process start-up, alignkit's final save. Peak RSS = the run process's ``VmHWM`` at that end.

MFU = model FLOPs / timed wall time / the machine's fp32 matmul rate (median of 2048^3 sgemms
at torch's thread count, measured before and after the runs, in this process). Model FLOPs =
6 * N * T: N = non-embedding parameters + the LM head (V*d, counted even when tied), T = real
(non-pad) tokens of prompt+chosen and prompt+rejected. Not counted: the reference forward,
attention products (reported separately in the JSON as ``mfu_with_attention``), padding.

Printed (medians; speed = alignkit pairs/s / TRL pairs/s; memory = alignkit / TRL)::

    dpo_vs_trl_speed=  dpo_vs_trl_default_speed=  dpo_mfu=  dpo_vs_trl_peak_mem=
    dpo_cached_ref_vs_trl_speed=   (one warm-cache alignkit run / TRL fastest)
    dpo_first_losses_max_abs_diff= (first 3 logged losses, alignkit vs TRL fastest, first repeat)
    ... and the same with [tiny] for the tiny-world architecture.

Raw measurements, machine, versions and settings: ``benchmarks/results/dpo.json``.

    python benchmarks/bench_dpo.py [--repeats 3] [--models wide tiny] [--pairs N] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dpo_common as dc  # noqa: E402

ARMS = dc.ARMS
PAIRS = {"wide": 96, "tiny": 128}  # 12 and 16 optimiser steps: what fits `make bench` (< 10 min) here
HEADLINE = "wide"
N_LOSSES = 3


def cache_note(res: dict) -> str:
    """alignkit's own report of its reference log-prob cache (train_results.json timings), if any."""
    t = res.get("timings") or {}
    return f", reference cache: {t['ref_logps_train_cache']}" if "ref_logps_train_cache" in t else ""


def summarise(runs: dict[str, list[dict]], warm: dict | None, n_pairs: int, tokens: int, n_flop: int,
              attn_flops: int, gflops: float) -> tuple[dict, dict]:
    med = {}
    for arm, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        med[arm] = {"wall_s": statistics.median(walls), "pairs_per_s": statistics.median(n_pairs / w for w in walls),
                    "tokens_per_s": statistics.median(tokens / w for w in walls),
                    "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
                    "loop_s": statistics.median(r["loop_s"] for r in rs),
                    "setup_s": statistics.median(r["setup_s"] for r in rs)}
    ak, fast, default = med["alignkit"], med["trl_fastest"], med["trl_default"]
    flops = dc.train_flops(n_flop, tokens)
    ref_losses = runs["trl_fastest"][0]["losses"][:N_LOSSES]
    ak_losses = runs["alignkit"][0]["losses"][:N_LOSSES]
    diff = max((abs(a - b) for a, b in zip(ak_losses, ref_losses)), default=float("nan"))
    if len(ak_losses) < N_LOSSES or len(ref_losses) < N_LOSSES:
        diff = float("nan")  # fewer logged steps than compared: say so rather than compare less
    ratios = {
        "dpo_vs_trl_speed": ak["pairs_per_s"] / fast["pairs_per_s"],
        "dpo_vs_trl_default_speed": ak["pairs_per_s"] / default["pairs_per_s"],
        "dpo_mfu": flops / ak["wall_s"] / (gflops * 1e9),
        "dpo_vs_trl_peak_mem": ak["peak_rss_mib"] / fast["peak_rss_mib"],
        "dpo_cached_ref_vs_trl_speed": (n_pairs / warm["wall_s"]) / fast["pairs_per_s"] if warm else float("nan"),
        "dpo_first_losses_max_abs_diff": diff,
    }
    extra = {"medians": med, "model_flops": flops, "attention_flops": attn_flops,
             "mfu_with_attention": (flops + attn_flops) / ak["wall_s"] / (gflops * 1e9),
             "mfu_loop_only": flops / ak["loop_s"] / (gflops * 1e9),
             "trl_fastest_mfu": flops / fast["wall_s"] / (gflops * 1e9),
             "first_losses": {arm: rs[0]["losses"][:N_LOSSES] for arm, rs in runs.items()}}
    return ratios, extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["wide", "tiny"], choices=sorted(dc.MODELS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pairs", type=int, default=None, help="pairs per model (default: wide 96, tiny 128)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(dc.REPO / "benchmarks" / "results" / "dpo.json"))
    p.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    try:
        bench(args, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"bench_dpo took {time.perf_counter() - t_start:.0f} s")
    return 0


def bench(args, root: Path) -> None:
    from transformers import AutoModelForCausalLM

    from alignkit.recipes import load_config

    # The learning rate alignkit's recipe resolves to (its default); TRL gets the same.
    recipe = dc.alignkit_config({"workdir": "<run>", "model_dir": "<model>", "data": "<pairs.jsonl>",
                                 "batch": args.batch})
    lr = load_config(recipe).train.learning_rate
    gflops = dc.matmul_gflops()
    setups = {}
    for name in args.models:
        n = args.pairs or PAIRS[name]
        lens = dc.pair_lengths(n, seed=args.seed)
        mdir = dc.build_model(name, root / name / "model", seed=args.seed)
        rows = dc.make_rows(lens, dc.MODELS[name]["vocab_size"], seed=args.seed)
        model = AutoModelForCausalLM.from_pretrained(mdir)
        seqs = [a + b for a, b, _ in lens] + [a + c for a, _, c in lens]
        setups[name] = {"model_dir": mdir, "data": dc.write_jsonl(rows, root / name / "pairs.jsonl"),
                        "warmup_data": dc.write_jsonl(rows[: 2 * args.batch], root / name / "warmup.jsonl"),
                        "pairs": n, "lengths": lens, "real_tokens": dc.real_tokens(lens),
                        "params": sum(x.numel() for x in model.parameters()), "flop_params": dc.flop_params(model),
                        "attention_flops": dc.attention_flops(model.config, seqs)}
        pc = dc.percentiles([a + b for a, b, _ in lens])
        pr = dc.percentiles([a + c for a, _, c in lens])
        print(f"[{name}] {setups[name]['params'] / 1e6:.2f}M params, {n} pairs, {setups[name]['real_tokens']} real "
              f"tokens; prompt+chosen p50/p90/max {pc['p50']:.0f}/{pc['p90']:.0f}/{pc['p100']:.0f}, "
              f"prompt+rejected {pr['p50']:.0f}/{pr['p90']:.0f}/{pr['p100']:.0f} (tokens, EOS included)", flush=True)

    small = setups[min(setups, key=lambda k: dc.MODELS[k]["hidden_size"])]
    zygotes, forked = dc.start_zygotes(root, list(ARMS), small["model_dir"], small["warmup_data"], args.batch, lr,
                                       statistics.median(gflops))
    results: dict[str, dict] = {}
    probes: list[float] = []  # the machine's matmul rate just before each measured run
    try:
        for name in args.models:
            s = setups[name]
            runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
            order = list(ARMS)
            for r in range(args.repeats):
                for arm in order[r % 3:] + order[: r % 3]:
                    work = root / name / f"{arm}_{r}"
                    probe = statistics.median(dc.matmul_gflops(repeats=3))
                    res = zygotes[ARMS[arm][0]].run(dc.make_job(arm, s["model_dir"], s["data"], work, args.batch, lr))
                    res["machine_gflops_before"] = probe
                    probes.append(probe)
                    runs[arm].append(res)
                    print(f"  [{name}] {arm:12s} run {r}: {res['wall_s']:6.1f} s (loop {res['loop_s']:.1f} s), "
                          f"peak {res['peak_rss_mib']:.0f} MiB, {res['cpu_cores_used']:.2f} cores busy, machine "
                          f"{probe:.0f} GFLOP/s{cache_note(res)}", flush=True)
            # Warm cache: the last cold alignkit run's ALIGNKIT_CACHE, reused by a new run.
            last = root / name / f"alignkit_{args.repeats - 1}" / "alignkit_cache"
            warm = zygotes["alignkit"].run(dc.make_job("alignkit", s["model_dir"], s["data"],
                                                       root / name / "alignkit_warm", args.batch, lr, cache=last))
            print(f"  [{name}] alignkit warm-cache run: {warm['wall_s']:6.1f} s{cache_note(warm)}", flush=True)
            results[name] = {"runs": runs, "warm": warm}
    finally:
        fork_threads = {fw: z.fork_threads for fw, z in zygotes.items()}
        for z in zygotes.values():
            z.close()
    gflops += dc.matmul_gflops()
    rate = statistics.median(gflops)
    noise = dc.noise_warning({f"{name}/{arm}": [r["wall_s"] for r in rs]
                              for name in args.models for arm, rs in results[name]["runs"].items()})

    lines: dict[str, float] = {}
    out_models = {}
    for name in args.models:
        s, r = setups[name], results[name]
        ratios, extra = summarise(r["runs"], r["warm"], s["pairs"], s["real_tokens"], s["flop_params"],
                                  s["attention_flops"], rate)
        suffix = "" if name == HEADLINE else f"[{name}]"
        lines.update({k + suffix: v for k, v in ratios.items()})
        print(f"\n{name}: {s['params'] / 1e6:.2f}M params, {s['pairs']} pairs x 1 epoch, batch {args.batch}, "
              f"{s['real_tokens']} real tokens, fp32 matmul {rate:.0f} GFLOP/s")
        print(f"  {'arm':12s} {'wall s':>7s} {'pairs/s':>8s} {'tokens/s':>9s} {'peak MiB':>9s} {'setup s':>8s} "
              f"{'loop s':>7s}  first losses")
        for arm, m in extra["medians"].items():
            print(f"  {arm:12s} {m['wall_s']:7.2f} {m['pairs_per_s']:8.2f} {m['tokens_per_s']:9.0f} "
                  f"{m['peak_rss_mib']:9.0f} {m['setup_s']:8.2f} {m['loop_s']:7.2f}  "
                  f"{', '.join(f'{x:.6f}' for x in extra['first_losses'][arm])}")
        out_models[name] = {
            "architecture": dc.MODELS[name], "params": s["params"], "flop_params": s["flop_params"],
            "pairs": s["pairs"], "real_tokens": s["real_tokens"],
            "lengths": {"prompt_chosen": dc.percentiles([a + b for a, b, _ in s["lengths"]]),
                        "prompt_rejected": dc.percentiles([a + c for a, _, c in s["lengths"]])},
            "ratios": ratios, **extra, "runs": r["runs"], "warm_cache_run": r["warm"]}

    print()
    if noise:
        print(noise)
    for k, v in lines.items():
        print(f"{k}={v:.3g}" if "diff" in k else f"{k}={v:.3f}")
    report = {
        "benchmark": "benchmarks/bench_dpo.py", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**dc.machine_info(), "matmul_fp32_gflops": rate, "matmul_fp32_gflops_samples": gflops,
                    "matmul_fp32_gflops_forked_child": forked,
                    # 3 matmuls just before each run (in run order): a momentary rate, noisier than the runs
                    "matmul_fp32_gflops_before_each_run": probes, "noise_warning": noise},
        "versions": dc.versions(),
        "settings": {"repeats": args.repeats, "batch": args.batch, "epochs": 1, "learning_rate": lr,
                     "seed": args.seed, "headline_model": HEADLINE, "arms": {a: list(v) for a, v in ARMS.items()},
                     "trl_variants": dc.TRL_VARIANTS, "alignkit_recipe": recipe,
                     "timed_section": "data/tokenizer/model read -> end of Trainer.train()",
                     "zygote_threads_at_fork": fork_threads,
                     "flops": "6 * (non-embedding params + LM head) * real tokens; no reference forward, "
                              "no attention products (see mfu_with_attention)"},
        "lines": lines, "models": out_models,
    }
    print(f"results: {dc.write_json(report, Path(args.out))}")


if __name__ == "__main__":
    sys.exit(main())
