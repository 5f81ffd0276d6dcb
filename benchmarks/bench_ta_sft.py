"""TA-SFT step time over a plain SFT step on the same batch (issue #8: goal ≤ 1.2).

Both steps run the recipe's own ``TASFTTrainer.compute_loss`` on the same mixed batch
(32 SFT rows + 8 unsafe rows of the tiny world, padded together), then backward and an
AdamW step: plain SFT trains CE on every row (``objective: sft`` with the unsafe rows as
extra SFT rows, so both steps process the same tokens), TA-SFT trains CE on the SFT rows
minus λ·EMD on the unsafe rows. The two alternate (warm-up first) and the ratio of the
medians over repeats is printed as ``ta_sft_overhead=<ratio>``.

    python benchmarks/bench_ta_sft.py [--repeats 30] [--model world:tiny]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--model", default="world:tiny")
    args = ap.parse_args()

    import torch
    from transformers import TrainingArguments

    from alignkit.config import ModelConfig
    from alignkit.data import tokenize_rows, validate_rows
    from alignkit.models import load_model, load_tokenizer
    from alignkit.recipes.ta_sft import Method, MixedCollator, build_trainer_class
    from alignkit.world import ensure_tiny, load_world

    torch.manual_seed(0)
    mcfg = ModelConfig(name_or_path=args.model)
    tok = load_tokenizer(mcfg)
    world = load_world(ensure_tiny(seed=0))
    sft = [{"prompt": r["prompt"], "completion": r["completion"]} for r in world.data["sft_train"][:32]]
    unsafe = [{"prompt": r["prompt"], "completion": r["compliant_response"]}
              for r in world.data["dualuse"] if r["label"] == "illegitimate"][:8]
    rows = validate_rows("sft", list(enumerate(sft + unsafe, 1)), "<bench>", {}, None, 20)
    toks, _ = tokenize_rows("sft", rows, tok, "<bench>", 256, "truncate")
    batch = MixedCollator(tok.pad_token_id)([{**t, "kind": int(i >= 32)} for i, t in enumerate(toks)])

    model = load_model(mcfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cls = build_trainer_class()
    with tempfile.TemporaryDirectory() as d:
        targs = TrainingArguments(output_dir=d, use_cpu=not torch.cuda.is_available(), report_to=[])
        trainers = {name: cls(model=model, args=targs, data_collator=MixedCollator(tok.pad_token_id),
                              method=Method(objective=obj, emd_weight=1.0))
                    for name, obj in (("sft", "refusal_sft"), ("ta_sft", "emd"))}
        # refusal_sft = CE on every row of the batch: plain SFT over the same tokens.
        batch = {k: v.to(trainers["sft"].args.device) for k, v in batch.items()}

        def step(name: str) -> float:
            t0 = time.perf_counter()
            loss = trainers[name].compute_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        for _ in range(3):
            step("sft"), step("ta_sft")
        times: dict[str, list[float]] = {"sft": [], "ta_sft": []}
        for i in range(args.repeats):
            order = ("sft", "ta_sft") if i % 2 == 0 else ("ta_sft", "sft")
            for name in order:
                times[name].append(step(name))
    sft_t, ta_t = statistics.median(times["sft"]), statistics.median(times["ta_sft"])
    n_tokens = int(batch["attention_mask"].sum())
    print(f"batch: 32 SFT + 8 unsafe rows, {n_tokens} tokens, vocab {model.config.vocab_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; median of {args.repeats}: "
          f"plain SFT step {1e3 * sft_t:.1f} ms, TA-SFT step {1e3 * ta_t:.1f} ms")
    print(f"ta_sft_overhead={ta_t / sft_t:.3f}")


if __name__ == "__main__":
    main()
