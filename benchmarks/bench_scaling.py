"""DPO step time and peak memory against sequence length and batch size: alignkit vs TRL.

The wide model of ``bench_dpo.py`` (6.3M parameters, vocab 4096, hidden 256, 4 layers), fixed-
length pairs (prompt + chosen = prompt + rejected = S tokens, prompt = S/4, EOS included), for
S in 128, 256, 512, 1024 and batch B (pairs) in 2, 8. Arms: alignkit's ``dpo`` recipe at its
defaults and ``trl.DPOTrainer`` at its fastest (precomputed reference, no checkpointing, fp32),
as in ``bench_dpo.py``; each (arm, S, B) is one fresh process running ``--steps`` optimiser
steps on B x steps pairs.

* step time: the median of the optimiser steps after the first (Trainer callback timestamps).
  TRL's reference pass runs in ``DPOTrainer.__init__`` and is not in its steps; a reference
  pass alignkit does inside its steps (a live reference model) is. ``setup`` is everything
  before the loop (tokenisation, model load, TRL's reference pass), reported beside it.
* peak memory: the process's ``VmHWM`` at the end of ``train()``; ``+MiB`` is its growth over
  the process's resident size at start (the imported libraries), i.e. what training added.

Prints a markdown table; raw runs in ``benchmarks/results/scaling.json``.

    python benchmarks/bench_scaling.py [--lengths 128 256 512 1024] [--batches 2 8] [--steps 4]
    python benchmarks/bench_scaling.py --points 1024x8 128x2     # only these (S x B) points
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

ARMS = ["alignkit", "trl_fastest"]
MODEL = "wide"


def step_time(res: dict) -> float:
    steps = res["step_s"][1:] or res["step_s"]  # the first step pays allocator and kernel warm-up
    return statistics.median(steps)


def table(rows: list[dict]) -> str:
    head = ("| S | B | tokens/step | alignkit step s | TRL step s | TRL / alignkit time | alignkit setup s | "
            "TRL setup s | alignkit peak MiB (+train) | TRL peak MiB (+train) | alignkit / TRL peak |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        a, t = r["alignkit"], r["trl_fastest"]
        out.append(f"| {r['seq_len']} | {r['batch']} | {r['tokens_per_step']} | {a['step_s']:.2f} | {t['step_s']:.2f} "
                   f"| {t['step_s'] / a['step_s']:.2f} | {a['setup_s']:.1f} | {t['setup_s']:.1f} "
                   f"| {a['peak_rss_mib']:.0f} (+{a['train_mib']:.0f}) | {t['peak_rss_mib']:.0f} (+{t['train_mib']:.0f}) "
                   f"| {a['peak_rss_mib'] / t['peak_rss_mib']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    p.add_argument("--points", nargs="+", metavar="SxB", default=None,
                   help="only these sequence-length x batch points (e.g. 1024x8 128x2), instead of the grid")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(dc.REPO / "benchmarks" / "results" / "scaling.json"))
    p.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    args = p.parse_args(argv)
    try:
        args.grid = ([tuple(int(x) for x in pt.lower().split("x")) for pt in args.points] if args.points
                     else [(s, b) for s in args.lengths for b in args.batches])
    except ValueError:
        p.error(f"--points takes SxB pairs such as 1024x8, got {args.points}")
    args.lengths = [s for s, _ in args.grid]
    if max(args.lengths) > dc.MODELS[MODEL]["max_position_embeddings"] or max(args.lengths) > 1024:
        p.error("lengths above 1024 would be truncated by both trainers' default max_length (1024)")
    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    try:
        bench(args, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"bench_scaling took {time.perf_counter() - t_start:.0f} s")
    return 0


def bench(args, root: Path) -> None:
    from alignkit.recipes import load_config

    lr = load_config(dc.alignkit_config({"workdir": "<run>", "model_dir": "<model>", "data": "<pairs.jsonl>",
                                         "batch": 2})).train.learning_rate  # alignkit's; TRL gets the same
    vocab = dc.MODELS[MODEL]["vocab_size"]
    gflops = statistics.median(dc.matmul_gflops())
    mdir = dc.build_model(MODEL, root / "model", seed=args.seed)
    warm = dc.write_jsonl(dc.make_rows(dc.fixed_lengths(4, 64), vocab, seed=args.seed), root / "warmup.jsonl")
    zygotes, forked = dc.start_zygotes(root, ARMS, mdir, warm, 2, lr, gflops)
    rows = []
    probes: list[float] = []  # the machine's matmul rate just before each run
    try:
        for seq_len, batch in args.grid:
            lens = dc.fixed_lengths(batch * args.steps, seq_len)
            data = dc.write_jsonl(dc.make_rows(lens, vocab, seed=args.seed), root / f"s{seq_len}_b{batch}.jsonl")
            row = {"seq_len": seq_len, "batch": batch, "tokens_per_step": 2 * batch * seq_len}
            # Alternate which arm goes first from one configuration to the next.
            for arm in ARMS if len(rows) % 2 == 0 else ARMS[::-1]:
                work = root / f"{arm}_s{seq_len}_b{batch}"
                probes.append(statistics.median(dc.matmul_gflops(repeats=3)))
                res = zygotes[dc.ARMS[arm][0]].run(dc.make_job(arm, mdir, data, work, batch, lr,
                                                               max_steps=args.steps))
                res.update(step_s_median=step_time(res), train_mib=res["peak_rss_mib"] - res["rss_start_mib"],
                           machine_gflops_before=probes[-1])
                row[arm] = {"step_s": res["step_s_median"], "setup_s": res["setup_s"],
                            "peak_rss_mib": res["peak_rss_mib"], "train_mib": res["train_mib"], "raw": res}
                print(f"  S={seq_len:5d} B={batch}: {arm:12s} step {res['step_s_median']:6.2f} s, setup "
                      f"{res['setup_s']:5.1f} s, peak {res['peak_rss_mib']:6.0f} MiB", flush=True)
            rows.append(row)
    finally:
        for z in zygotes.values():
            z.close()
    md = table(rows)
    print("\n" + md)

    report = {
        "benchmark": "benchmarks/bench_scaling.py",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**dc.machine_info(), "matmul_fp32_gflops": gflops, "matmul_fp32_gflops_forked_child": forked,
                    "matmul_fp32_gflops_before_each_run": probes},  # a momentary rate (3 matmuls), for context
        "versions": dc.versions(),
        "settings": {"model": MODEL, "architecture": dc.MODELS[MODEL], "steps": args.steps, "learning_rate": lr,
                     "arms": {a: list(dc.ARMS[a]) for a in ARMS}, "trl_variants": dc.TRL_VARIANTS,
                     "step_time": "median of the optimiser steps after the first",
                     "peak": "VmHWM at the end of train(); train_mib = peak - RSS at process start"},
        "table_markdown": md, "rows": rows,
    }
    print(f"results: {dc.write_json(report, Path(args.out))}")


if __name__ == "__main__":
    sys.exit(main())
