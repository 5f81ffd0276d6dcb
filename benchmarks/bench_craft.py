"""CRaFT knowledge-state query throughput: batched sampling vs a naive loop, one process.

The query draws N samples at T=1 for every training question. ``batched`` is what the
recipe runs (:func:`alignkit.stages.knowledge.oe_knowledge_state` -> :func:`alignkit.generation.sampling.generate`,
``batch_size`` questions x ``num_return_sequences=N`` per ``model.generate`` call);
``loop`` is the naive one-sample-per-call version (one ``generate`` per question per
sample). Both score the samples the same way (alias-substring μ). Runs alternate
(batched, loop, batched, ...) so drift hits both; medians of samples/s are reported and

    sampling_batched_vs_loop=<median batched samples/s / median loop samples/s>

    python benchmarks/bench_craft.py [--questions 24] [--n 10] [--repeats 3] [--world-seed 0]

Uses the tiny world's pretrained model and qa_train questions (built on first use, cached).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--questions", type=int, default=24)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--world-seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from alignkit.generation.sampling import generate
    from alignkit.models import load_for_inference
    from alignkit.stages.knowledge import oe_knowledge_state, score_samples
    from alignkit.world import ensure_tiny

    wdir = ensure_tiny(seed=args.world_seed)
    rows = [json.loads(x) for x in (Path(wdir) / "data" / "qa_train.jsonl").read_text().splitlines()][: args.questions]
    for r in rows:
        r["prompt"] = r["question"]
    model, tok = load_for_inference(str(Path(wdir) / "model"))
    total = len(rows) * args.n

    def batched(seed: int) -> float:
        t0 = time.perf_counter()
        oe_knowledge_state(model, tok, rows, n=args.n, max_new_tokens=args.max_new_tokens, batch_size=args.batch,
                           seed=seed)
        return total / (time.perf_counter() - t0)

    def loop(seed: int) -> float:
        t0 = time.perf_counter()
        samples = []
        for i, r in enumerate(rows):
            samples.append([generate(model, tok, [r["prompt"]], n=1, max_new_tokens=args.max_new_tokens,
                                     batch_size=1, seed=seed * 100003 + i * args.n + j, progress=False)[0][0]
                            for j in range(args.n)])
        score_samples(rows, samples)
        return total / (time.perf_counter() - t0)

    batched(0)  # warm-up (kernels, allocator) outside the timed runs
    rates: dict[str, list[float]] = {"batched": [], "loop": []}
    for k in range(args.repeats):
        rates["batched"].append(batched(k + 1))
        rates["loop"].append(loop(k + 1))
    med = {k: statistics.median(v) for k, v in rates.items()}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"CRaFT knowledge-state query, {len(rows)} questions x N={args.n} samples at T=1, "
          f"max_new_tokens={args.max_new_tokens}, {dev}, torch threads {torch.get_num_threads()}")
    for k, v in rates.items():
        print(f"  {k:8s} median {med[k]:8.1f} samples/s  (runs: {', '.join(f'{x:.1f}' for x in v)})")
    print(f"sampling_batched_vs_loop={med['batched'] / med['loop']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
