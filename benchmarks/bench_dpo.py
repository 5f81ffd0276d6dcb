"""DPO training-step speed and peak memory: alignkit PreferenceTrainer vs trl.DPOTrainer.

Both trainers get the same model weights, the same preference rows and the same batch
size; each timed unit is one full optimiser step (forward policy + reference, backward,
step). Runs alternate (A, B, A, B, ...) in one process so drift hits both equally; the
median of the repeats is reported with the ratio alignkit / TRL (< 1 = alignkit faster).

    python benchmarks/bench_dpo.py [--model DIR] [--repeats 7] [--batch 8] [--length 256]

Without --model it builds a random Llama of about 20M parameters (no download).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build_model(tmp: Path, hidden: int, layers: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from conftest import build_random_tiny_model

    path = build_random_tiny_model(tmp / "tok")
    small = AutoModelForCausalLM.from_pretrained(path)
    cfg = LlamaConfig(**{**small.config.to_dict(), "hidden_size": hidden, "intermediate_size": 4 * hidden,
                         "num_hidden_layers": layers, "num_attention_heads": max(hidden // 64, 2),
                         "num_key_value_heads": max(hidden // 128, 1)})
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path


def rows(n: int, words: int) -> list[dict]:
    import random

    rng = random.Random(0)
    vocab = "the a world person born city year velm tarn glass maker blue red paid for it was in".split()
    text = lambda k: " ".join(rng.choice(vocab) for _ in range(k)) + "."  # noqa: E731
    return [{"prompt": text(words // 4), "chosen": text(words), "rejected": text(words)} for _ in range(n)]


def alignkit_trainer(model, tok, data, args):
    from datasets import Dataset
    from transformers import TrainingArguments

    from alignkit.data import PreferenceCollator, tokenize_rows, validate_rows
    from alignkit.training import PreferenceTrainer

    norm = validate_rows("preference", list(enumerate(data, 1)), "bench")
    toks, _ = tokenize_rows("preference", norm, tok, "bench", args.length)
    ta = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, learning_rate=1e-5,
                           report_to=[], use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
                           bf16=torch.cuda.is_available(), disable_tqdm=True)
    ref = copy.deepcopy(model).eval()
    return PreferenceTrainer(model=model, ref_model=ref, args=ta, data_collator=PreferenceCollator(tok.pad_token_id),
                             train_dataset=Dataset.from_list(toks), processing_class=tok)


def trl_trainer(model, tok, data, args):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, learning_rate=1e-5,
                    report_to=[], use_cpu=not torch.cuda.is_available(), max_length=args.length,
                    bf16=torch.cuda.is_available(), disable_tqdm=True, gradient_checkpointing=False)
    ref = copy.deepcopy(model).eval()
    return DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(data),
                      processing_class=tok)


def step_timer(trainer):
    """A closure running one optimiser step on the next batch."""
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    model = trainer.accelerator.prepare(trainer.model)
    batches = list(trainer.get_train_dataloader())
    state = {"i": 0}

    def step() -> float:
        batch = trainer._prepare_inputs(batches[state["i"] % len(batches)])
        state["i"] += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.train()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model or build_model(Path(tempfile.mkdtemp()), args.hidden, args.layers)
    tok = AutoTokenizer.from_pretrained(path)
    data = rows(args.batch * (args.repeats + args.warmup) * 2, args.length // 3)
    base = AutoModelForCausalLM.from_pretrained(path)
    n_params = sum(x.numel() for x in base.parameters())
    steps = {"alignkit": step_timer(alignkit_trainer(copy.deepcopy(base), tok, data, args)),
             "trl": step_timer(trl_trainer(copy.deepcopy(base), tok, data, args))}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.warmup + args.repeats):
        for name in (("alignkit", "trl") if r % 2 == 0 else ("trl", "alignkit")):  # alternate the order too
            t = steps[name]()
            if r >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    dev = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"DPO optimiser step, {n_params / 1e6:.1f}M params, batch {args.batch} pairs, ~{args.length} tokens, {dev}")
    for k in steps:
        print(f"  {k:9s} median {med[k] * 1000:8.1f} ms  (min {min(times[k]) * 1000:.1f}, max {max(times[k]) * 1000:.1f})")
    print(f"  ratio alignkit/trl = {med['alignkit'] / med['trl']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
