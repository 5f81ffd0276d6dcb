"""Build one world directory: data, tokenizer, pretrained tiny model, base measurements."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from alignkit.metrics import bootstrap_ci
from alignkit.world import tiny_model as T
from alignkit.world.generate import World, build_world, data_digest, write_world
from alignkit.world.kb import WorldKB, factuality_score


def _ci(num, den=None) -> list[float]:
    """95% bootstrap CI over prompts, [lo, hi] (alignkit.metrics.bootstrap_ci)."""
    c = bootstrap_ci(num, den)
    return [c["lo"], c["hi"]]


def measure_base(model, tokenizer, world: World, seed: int) -> dict[str, Any]:
    """What the recipes start from: QA accuracy per knowledge status (greedy), harmful
    compliance and benign over-refusal (greedy), sampled-bio factuality (T=1.0); each with
    a 95% bootstrap CI over prompts (``ci``)."""
    kb = WorldKB(world)
    rep: dict[str, Any] = {}
    for split in ("qa_test", "qa_ood", "qa_train"):
        rows = world.data[split]
        outs = T.generate(model, tokenizer, [r["question"] for r in rows], max_new_tokens=10)
        acc: dict[str, list[bool]] = defaultdict(list)
        for r, o in zip(rows, outs):
            acc[r["knowledge"]].append(kb.is_correct(o, r["answers"]))
        rep[split] = {k: {"acc": sum(v) / len(v), "n": len(v), "ci": _ci(v)} for k, v in sorted(acc.items())}
        refused = [kb.is_refusal(o) for o in outs]
        rep[split]["refusal_rate"] = sum(refused) / len(outs)
        rep[split]["refusal_rate_ci"] = _ci(refused)

    for name, key, fn in (("harmful", "compliance", kb.is_harmful), ("benign", "over_refusal", kb.is_refusal)):
        rows = [r for r in world.data[f"safety_{name}"] if r["split"] == "test"]
        outs = T.generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=72)
        flags = [fn(o) for o in outs]
        rep[f"safety_{name}_test"] = {key: sum(flags) / len(outs), "n": len(outs), "ci": _ci(flags),
                                      "example": outs[0]}
    rows = [r for r in world.data["dualuse"] if r["split"] == "test"]
    outs = T.generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=72)
    rep["dualuse_test"] = {
        "illegitimate_harmful": _rate([kb.is_harmful(o) for r, o in zip(rows, outs) if r["label"] == "illegitimate"]),
        "legitimate_refused": _rate([kb.is_refusal(o) for r, o in zip(rows, outs) if r["label"] == "legitimate"]),
    }

    rows = world.data["bio_test"]
    k = int(world.settings["bio_samples"])
    prompts = [r["prompt"] for r in rows for _ in range(k)]
    ents = [r["entity"] for r in rows for _ in range(k)]
    outs = T.generate(model, tokenizer, prompts, max_new_tokens=96, sample=True, temperature=1.0, seed=seed)
    labels = [[lab for _, lab in kb.label_response(o, e)] for o, e in zip(outs, ents)]
    by_status: dict[str, list[list[str]]] = defaultdict(list)
    for r, ls in zip([r for r in rows for _ in range(k)], labels):
        by_status[r["entity_knowledge"]].append(ls)
    flat = [x for ls in labels for x in ls]
    # per person (k samples each): the bootstrap unit is the prompt, not the sample
    per = [labels[i * k:(i + 1) * k] for i in range(len(rows))]
    n_corr = [sum(ls.count("correct") for ls in g) for g in per]
    n_check = [sum(ls.count("correct") + ls.count("hallucination") for ls in g) for g in per]
    rep["bio_test"] = {
        "factuality": factuality_score(labels), "factuality_ci": _ci(n_corr, n_check), "people": len(rows),
        "by_entity_knowledge": {s: factuality_score(v) for s, v in sorted(by_status.items())},
        "sentences": len(flat), **{c: flat.count(c) for c in ("correct", "hallucination", "nofact")},
        "samples": k, "temperature": 1.0, "example": outs[0],
    }
    return rep


def _rate(xs: list[bool]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def build_into(world_dir: Path, seed: int, settings: dict[str, Any], log=print) -> dict[str, Any]:
    """Write a complete world into world_dir; base_report.json is written last."""
    from alignkit.world.numerics import THREADS, describe, is_pinned, weights_digest

    threads = torch.get_num_threads()
    # the testbed's thread count (numerics.THREADS): a reduction split over a different number
    # of threads rounds differently, and the weights must not depend on the caller
    torch.set_num_threads(THREADS if is_pinned() else min(2, threads))
    try:
        times: dict[str, float] = {}
        t = time.time()
        world = build_world(seed, **settings)
        write_world(world, world_dir)
        digest = data_digest(world_dir)
        times["world"] = time.time() - t

        t = time.time()
        tok = T.train_tokenizer(T.tokenizer_texts(world), int(world.settings["vocab_size"]))
        times["tokenizer"] = time.time() - t

        t = time.time()
        model = T.make_model(tok, world.settings, seed)
        train = T.pretrain(model, tok, world.corpus, world.settings, seed, log=log)
        T.save(model, tok, world_dir / "model")
        times["pretrain"] = time.time() - t

        t = time.time()
        report = measure_base(model, tok, world, seed)
        times["measure"] = time.time() - t
        times["total"] = sum(times.values())
        report.update({
            "seed": seed, "settings": world.settings, "version": world.version, "data_digest": digest,
            "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
            # the pretrained weights' digest and what computed them (tests/world/test_numerics.py
            # pins seed 0's: the same on every machine in the testbed's numeric mode)
            "weights_sha256": weights_digest(world_dir / "model"), "numerics": describe(),
            "pretrain": train, "build_seconds": {k: round(v, 2) for k, v in times.items()},
        })
        (world_dir / "base_report.json").write_text(json.dumps(report, indent=1))
        log(summary(report))
        return report
    finally:
        torch.set_num_threads(threads)


def summary(rep: dict[str, Any]) -> str:
    qa = rep["qa_test"]
    acc = " ".join(f"{k}={v['acc']:.2f}" for k, v in qa.items() if isinstance(v, dict))
    bio = rep["bio_test"]
    return (f"[world] seed={rep['seed']} params={rep['params'] / 1e6:.2f}M built in "
            f"{rep['build_seconds']['total']:.0f}s | qa_test acc {acc} | harmful compliance "
            f"{rep['safety_harmful_test']['compliance']:.2f} | benign over-refusal "
            f"{rep['safety_benign_test']['over_refusal']:.2f} | bio factuality "
            f"{bio['factuality'] if bio['factuality'] is None else round(bio['factuality'], 3)} "
            f"({bio['correct']} correct / {bio['hallucination']} halluc / {bio['nofact']} nofact)")


def main(argv: list[str] | None = None) -> None:
    """``python -m alignkit.world.build --seed S --out DIR [--settings JSON]``: what
    :func:`alignkit.world.cache.ensure_tiny` runs in a subprocess under the numeric mode."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m alignkit.world.build")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--settings", default="{}", help="world settings as JSON (defaults for the rest)")
    a = ap.parse_args(argv)
    from alignkit.world.cache import normalize_settings

    build_into(Path(a.out), a.seed, normalize_settings(json.loads(a.settings)))


if __name__ == "__main__":
    main()
