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


def _mu(model, tokenizer, kb: WorldKB, rows: list[dict], k: int, seed: int) -> tuple[list[float], list[list[str]]]:
    """Certainty μ of each question (share of k answers sampled at T=1 that are correct) and the samples."""
    outs = T.generate(model, tokenizer, [r["question"] for r in rows for _ in range(k)], max_new_tokens=16,
                      sample=True, temperature=1.0, seed=seed)
    per = [outs[i * k:(i + 1) * k] for i in range(len(rows))]
    return [sum(kb.is_correct(o, r["answers"]) for o in g) / k for r, g in zip(rows, per)], per


def _rehearse(model, tokenizer, rows: list[dict], seed: int, epochs: int = 2, lr: float = 5e-4):
    """A copy of the model fine-tuned on ``rows`` (question -> canonical short answer, loss on the
    answer only): the rehearsal of CRaFT stage 2 (craft.md §3), as a plain torch loop."""
    import copy
    import random

    from alignkit.world.generate import answer_text, chat

    torch.manual_seed(seed)
    m = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    pairs = []
    for r in rows:
        prompt = chat(r["question"], "").split("<|assistant|>\n", 1)[0] + "<|assistant|>\n"
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer_text(r["attribute"], r["answers"][0]) + "<|end|>", add_special_tokens=False)["input_ids"]
        pairs.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    rng = random.Random(seed)
    for _ in range(epochs):
        rng.shuffle(pairs)
        for i in range(0, len(pairs), 16):
            batch = pairs[i:i + 16]
            w = max(len(x) for x, _ in batch)
            ids = torch.tensor([x + [tokenizer.pad_token_id] * (w - len(x)) for x, _ in batch])
            lab = torch.tensor([y + [-100] * (w - len(y)) for _, y in batch])
            mask = (torch.arange(w)[None, :] < torch.tensor([len(x) for x, _ in batch])[:, None]).long()
            m(input_ids=ids, attention_mask=mask, labels=lab).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return m.eval()


def measure_mechanisms(model, tokenizer, world: World, seed: int, k: int = 6) -> dict[str, Any]:
    """The properties each paper's mechanism needs, measured on the base model before any recipe
    runs (docs/testbed.md, "World v5"), each with a 95% bootstrap CI over questions:

    - ``certainty``: μ (k answers at T=1) of the qa_val + qa_test questions: its spread per
      knowledge status and exposure count (CRaFT's certainty filter needs μ between 0 and 1);
    - ``entropy_gap``: exact-string entropy − semantic entropy (kb clusters) of those samples
      (what SE gains over R-Tuning-U's string entropy: 0 when answers are templated);
    - ``rehearsal``: μ after a short rehearsal on the known/partial qa_train facts, on the
      in-corpus val/test facts that started below 0.5 (CRaFT's knowledge flow; the paper: 69% rise).
    """
    from alignkit.metrics import semantic_entropy

    kb = WorldKB(world)
    rows = world.data["qa_val"] + world.data["qa_test"]
    mu, samples = _mu(model, tokenizer, kb, rows, k, seed)

    def bucket(x: float) -> str:
        return "0" if x == 0 else "1" if x == 1 else "(0,0.5)" if x < 0.5 else "[0.5,1)"

    groups: dict[str, list[float]] = defaultdict(list)
    for r, m in zip(rows, mu):
        groups[f"{r['knowledge']}/{r.get('exposures', '?')}"].append(m)
    strict = [0 < m < 1 for m in mu]
    certainty = {"samples": k, "questions": len(rows), "intermediate": sum(strict) / len(rows), "intermediate_ci": _ci(strict),
                 "by_knowledge_exposures": {g: {"n": len(v), "mean_mu": sum(v) / len(v),
                                                "hist": {b: sum(bucket(x) == b for x in v) for b in
                                                         ("0", "(0,0.5)", "[0.5,1)", "1")}}
                                            for g, v in sorted(groups.items())}}
    h_str = [semantic_entropy([o.strip() for o in g]) for g in samples]
    h_sem = [semantic_entropy([kb.answer_class(o) for o in g]) for g in samples]
    gap = [a - b for a, b in zip(h_str, h_sem)]
    entropy = {"string": sum(h_str) / len(h_str), "semantic": sum(h_sem) / len(h_sem),
               "gap": sum(gap) / len(gap), "gap_ci": _ci(gap),
               "questions_with_gap": sum(g > 1e-9 for g in gap) / len(gap)}

    train = [r for r in world.data["qa_train"] if r["knowledge"] in ("known", "partial")]
    low = [i for i, (r, m) in enumerate(zip(rows, mu)) if r["knowledge"] == "partial" and m < 0.5]
    rehearsal: dict[str, Any] = {"train_questions": len(train), "low_mu_partial": len(low)}
    if low:
        after, _ = _mu(_rehearse(model, tokenizer, train, seed), tokenizer, kb, [rows[i] for i in low], k, seed + 1)
        rose = [a > mu[i] for a, i in zip(after, low)]
        delta = [a - mu[i] for a, i in zip(after, low)]
        rehearsal.update({"rose": sum(rose) / len(rose), "rose_ci": _ci(rose), "mean_delta_mu": sum(delta) / len(delta),
                          "mean_delta_mu_ci": _ci(delta)})
    return {"certainty": certainty, "entropy_gap": entropy, "rehearsal": rehearsal}


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
        report["mechanisms"] = measure_mechanisms(model, tok, world, seed)
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
