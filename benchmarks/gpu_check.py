"""The checks that need a CUDA GPU (issue 21, item 5), in one script that runs in under 8 minutes
on one GPU. Nothing is downloaded: every model is built here from a config with random weights.

1. ``kernels``: packed == padded in bf16 under ``sdpa``, ``flex_attention`` and, when the
   ``flash_attn`` package is installed, ``flash_attention_2``: per-sequence log-prob sums of every
   layout the collator chooses, for a Llama and a sliding-window Mistral (window 64, sequences
   up to 200 tokens), against the right-padded path under the same kernel.
2. ``precompute``: ``alignkit train`` (the ``dpo`` recipe, reference log-probs precomputed) launched
   with ``configs/accelerate/zero3.yaml`` and ``configs/accelerate/fsdp.yaml`` (FSDP2), one process:
   the Trainer leaves the model on the CPU until ``train()`` shards it, and the reference pass must
   still run (on the GPU) and the run finish.
3. ``qlora``: the same recipe with a 4-bit nf4 base (bitsandbytes CUDA kernels) and LoRA.
4. ``speed``: alignkit's ``dpo`` recipe against ``trl.DPOTrainer`` (precomputed reference, bf16, no
   checkpointing) on a 1.1B-parameter random Llama (TinyLlama's shape), fixed-length 512-token pairs,
   batch 8: pairs/s over the steps after the first, and peak ``torch.cuda.max_memory_allocated``.
   Each arm is its own process.

    python benchmarks/gpu_check.py [--only kernels precompute qlora speed] [--out benchmarks/results/gpu_check.json]

Exit status 0 when every check that ran passed; the results (and what was skipped, and why) go to
``--out``. ``tests/gpu/test_gpu_check.py`` runs it when CUDA is present; the suite skips it otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dpo_common as dc  # noqa: E402

REPO = dc.REPO
CHECKS = ["kernels", "precompute", "qlora", "speed"]
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048)
SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048)


def build(out: Path, spec: dict, family: str = "llama", seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    tok = dc.build_tokenizer(spec["vocab_size"])
    torch.manual_seed(seed)
    common = dict(**spec, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=64))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- 1. kernels


def _sums(trainer, model, batch):
    """Unweighted per-sequence log-prob sums of a collated batch, through the trainer's forward."""
    import torch

    from alignkit.training.preference import _to_device

    with torch.no_grad():
        return trainer.sequence_logps(model, _to_device(batch, "cuda"))[1].float().cpu()


def check_kernels(root: Path) -> dict:
    import dataclasses
    import random

    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from alignkit.losses import sequence_sums, target_logps
    from alignkit.training.preference import PreferenceTrainer, preference_collator

    kernels = ["sdpa", "flex_attention"]
    skipped = {}
    try:
        import flash_attn  # noqa: F401

        kernels.append("flash_attention_2")
    except ImportError as e:
        skipped["flash_attention_2"] = f"flash_attn is not installed ({e})"
    rng = random.Random(0)
    ex = []
    for _ in range(8):
        p, c, r = rng.randint(16, 64), rng.randint(40, 136), rng.randint(40, 136)
        ex.append({"prompt_ids": [rng.randrange(3, 4096) for _ in range(p)],
                   "chosen_ids": [rng.randrange(3, 4096) for _ in range(c)],
                   "rejected_ids": [rng.randrange(3, 4096) for _ in range(r)],
                   "chosen_weights": [1.0] * c, "rejected_weights": [1.0] * r})
    out = {"skipped": skipped, "rows": []}
    for family in ("llama", "mistral"):
        mdir = build(root / f"kern_{family}", SMALL, family)
        for kernel in kernels:
            model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.bfloat16, attn_implementation=kernel).cuda()
            model.eval()
            args = TrainingArguments(output_dir=str(root / "kt"), report_to=[], remove_unused_columns=False, bf16=True)
            trainer = PreferenceTrainer(model=model, args=args)

            padded = preference_collator(0, False, model.config)(ex)
            want = _sums(trainer, model, padded)
            default = preference_collator(0, True, model.config)
            layouts = {"default": default}
            if default.__class__.__name__ == "PackedPreferenceCollator" and not default.varlen:
                layouts["shared_prompt"] = dataclasses.replace(default, shared_prompt=True)
                layouts["separate"] = dataclasses.replace(default, shared_prompt=False)
            # The padded path's own logits (no fused head): what every layout must reproduce.
            with torch.no_grad():
                b = {k: v.cuda() for k, v in padded.items() if isinstance(v, torch.Tensor)}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[b["keep"]]
                ref = sequence_sums(target_logps(logits, b["tgt_flat"], b["tgt_ids"]), b["tgt_seq"],
                                    len(ex) * 2).float().cpu()
            for name, coll in layouts.items():
                got = _sums(trainer, model, coll(ex))
                d = (got - ref).abs().max().item()
                rel = d / ref.abs().max().item()
                out["rows"].append({"family": family, "kernel": kernel, "layout": name, "max_abs_diff": d,
                                    "max_rel_diff": rel, "ok": rel < 1e-2})
            out["rows"].append({"family": family, "kernel": kernel, "layout": "padded",
                                "max_abs_diff": (want - ref).abs().max().item(),
                                "max_rel_diff": (want - ref).abs().max().item() / ref.abs().max().item(),
                                "ok": True})
            del model, trainer
            torch.cuda.empty_cache()
    out["ok"] = all(r["ok"] for r in out["rows"])
    return out


# ---------------------------------------------------------------- 2./3. recipe runs under launchers


def _recipe_yaml(root: Path, name: str, model_dir: Path, data: Path, **model_extra) -> Path:
    import yaml

    cfg = {"recipe": "dpo", "seed": 0, "output_dir": str(root / name),
           "model": {"name_or_path": str(model_dir), "dtype": "bfloat16", **model_extra},
           "data": {"train": {"path": str(data)}, "max_length": 512},
           "method": {"precompute_ref_logps": True, "ref_logps_cache": False},
           "train": {"per_device_train_batch_size": 4, "max_steps": 3, "logging_steps": 1, "bf16": True,
                     "report_to": []},
           "eval": {"enabled": False}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(cmd: list[str], timeout: int) -> tuple[bool, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode == 0, f"{time.perf_counter() - t0:.0f}s; " + (r.stdout + r.stderr)[-2500:]


def _run_result(run: Path) -> dict:
    res = json.loads((run / "train_results.json").read_text()) if (run / "train_results.json").exists() else {}
    return {"complete": (run / "RUN_COMPLETE").exists(), "timings": res.get("timings")}


def check_precompute(root: Path, model_dir: Path, data: Path) -> dict:
    out = {}
    for name, conf in (("zero3", "zero3.yaml"), ("fsdp2", "fsdp.yaml")):
        yml = _recipe_yaml(root, name, model_dir, data)
        ok, log = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "configs" / "accelerate" / conf), "--num_processes", "1", "-m", "alignkit",
                           "train", str(yml)], timeout=240)
        res = _run_result(root / name)
        out[name] = {"ok": ok and res["complete"], **res, **({} if ok else {"log": log})}
    out["ok"] = all(v["ok"] for v in out.values())
    return out


def check_qlora(root: Path, model_dir: Path, data: Path) -> dict:
    yml = _recipe_yaml(root, "qlora", model_dir, data,
                       lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
                       quantization={"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"})
    ok, log = _launch([sys.executable, "-m", "alignkit", "train", str(yml)], timeout=200)
    res = _run_result(root / "qlora")
    return {"ok": ok and res["complete"], **res, **({} if ok else {"log": log})}


# ---------------------------------------------------------------- 4. speed and memory


def arm_main(arm: str, model_dir: str, data: str, work: str, batch: int, steps: int) -> dict:
    """One arm in this (fresh) process: pairs/s over the steps after the first, peak CUDA memory."""
    import torch

    clock = dc._clock()
    torch.cuda.reset_peak_memory_stats()
    if arm == "alignkit":
        import yaml

        from alignkit.recipes import get_recipe, load_config

        job = {"workdir": work, "model_dir": model_dir, "data": data, "batch": batch, "max_steps": steps}
        cfg = dc.alignkit_config(job)
        cfg["model"]["dtype"] = "bfloat16"
        cfg["train"]["bf16"] = True
        cfg["method"] = {"ref_logps_cache": False}
        path = Path(work) / "dpo.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        get_recipe("dpo").train(load_config(str(path)), callbacks=[clock])
    else:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        rows = [json.loads(x) for x in Path(data).read_text().splitlines() if x]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        args = DPOConfig(output_dir=str(Path(work) / "trl"), per_device_train_batch_size=batch, max_steps=steps,
                         logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, bf16=True,
                         precompute_ref_log_probs=True, gradient_checkpointing=False, max_length=1024)
        DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                   processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[clock]).train()
    step_s = [b - a for a, b in zip(clock.steps, clock.steps[1:])]
    return {"pairs_per_s": batch * len(step_s) / sum(step_s), "step_s": step_s,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2 ** 20}


def check_speed(root: Path) -> dict:
    mdir = build(root / "one_b", ONE_B)
    lens = dc.fixed_lengths(8 * 6, 512)
    data = dc.write_jsonl(dc.make_rows(lens, ONE_B["vocab_size"]), root / "speed.jsonl")
    out = {}
    for arm in ("alignkit", "trl"):
        res_file = root / f"speed_{arm}.json"
        ok, log = _launch([sys.executable, __file__, "--arm", arm, "--model", str(mdir), "--data", str(data),
                           "--work", str(root / f"speed_{arm}"), "--result", str(res_file)], timeout=300)
        out[arm] = json.loads(res_file.read_text()) if ok and res_file.exists() else {"error": log}
    if all("pairs_per_s" in out[a] for a in ("alignkit", "trl")):
        out["alignkit_vs_trl_speed"] = out["alignkit"]["pairs_per_s"] / out["trl"]["pairs_per_s"]
        out["alignkit_vs_trl_peak_mem"] = out["alignkit"]["peak_cuda_mib"] / out["trl"]["peak_cuda_mib"]
    out["ok"] = "alignkit_vs_trl_speed" in out
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=CHECKS, default=CHECKS)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--arm", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.arm:  # a speed arm, in its own process
        res = arm_main(args.arm, args.model, args.data, args.work, batch=8, steps=6)
        Path(args.result).write_text(json.dumps(res))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check")
        return 0
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    report = {"benchmark": "benchmarks/gpu_check.py", "device": torch.cuda.get_device_name(0),
              "versions": dc.versions(), "checks": {}}
    small = build(root / "small", SMALL)
    data = dc.write_jsonl(dc.make_rows(dc.pair_lengths(24, seed=0), SMALL["vocab_size"]), root / "pairs.jsonl")
    for name in args.only:
        t = time.perf_counter()
        try:
            if name == "kernels":
                res = check_kernels(root)
            elif name == "precompute":
                res = check_precompute(root, small, data)
            elif name == "qlora":
                res = check_qlora(root, small, data)
            else:
                res = check_speed(root)
        except Exception as e:  # noqa: BLE001 - one failed check must not hide the others' results
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.perf_counter() - t, 1)
        report["checks"][name] = res
        print(f"{name}: {'ok' if res['ok'] else 'FAILED'} ({res['seconds']} s)", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(dc.write_json(report, Path(args.out)))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("log", "rows")}
                      for k, v in report["checks"].items()}, indent=1, default=str)[:6000])
    return 0 if all(v["ok"] for v in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
