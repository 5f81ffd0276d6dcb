"""Knowledge-state queries: how often, and how consistently, does a model know an answer?

Shared by the refusal-aware recipes (CRaFT's μ / σ, craft.md §3 and §5.1; semantic-entropy
abstention samples the same way).

* **Open-ended** (:func:`oe_knowledge_state`): N samples per question at temperature T,
  batched through :func:`alignkit.generation.sampling.generate` (per-batch seeds, optional cache).
  μ = fraction of samples judged correct; σ = mean pairwise cosine similarity of the
  samples' sentence embeddings (:mod:`alignkit.judges.embedding`).
* **Multiple choice** (:func:`mc_knowledge_state`): one forward pass per item; μ = the
  normalised probability of the gold option letter, σ = −H over the option letters.
  Items are built from QA rows by :func:`build_mc_items` (distractors drawn from the
  same attribute's values).

Correctness (:func:`is_correct_alias_substring`): a lower-cased alias is a substring of
the lower-cased prediction, and a prediction containing a refusal keyword is never correct
(the official code's evaluator; craft.md §5.1, §9.3).

This module imports torch only inside functions.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

# The official evaluator's refusal test is the substring "i don't know" (craft.md §5.7).
DEFAULT_REFUSAL_KEYWORDS = ("i don't know", "i do not know")
LETTERS = "ABCDEFGHIJ"


def is_refusal_keyword(prediction: str, keywords: Sequence[str] = DEFAULT_REFUSAL_KEYWORDS) -> bool:
    low = prediction.lower().replace("\u2019", "'")
    return any(k in low for k in keywords)


def is_correct_alias_substring(prediction: str, aliases: Sequence[str],
                               keywords: Sequence[str] = DEFAULT_REFUSAL_KEYWORDS) -> bool:
    """Case-insensitive alias-substring containment; refusals are not correct."""
    if is_refusal_keyword(prediction, keywords):
        return False
    low = prediction.lower()
    return any(a.strip() and a.strip().lower() in low for a in aliases)


def is_correct_exact(prediction: str, aliases: Sequence[str], keywords: Sequence[str] = DEFAULT_REFUSAL_KEYWORDS) -> bool:
    """The paper's wording ("exact match"): the whole prediction equals an alias, case and
    surrounding punctuation/space ignored."""
    norm = lambda s: s.lower().strip().strip(".!?,;:").strip()  # noqa: E731
    return not is_refusal_keyword(prediction, keywords) and norm(prediction) in {norm(a) for a in aliases}


MATCHERS = {"alias_substring": is_correct_alias_substring, "exact": is_correct_exact}


def majority_correct(samples: Sequence[str], correct: Sequence[bool]) -> str | None:
    """The most frequent correct sample (ties: the one sampled first) — the rehearsal
    target in the official code (``replace_ans``, craft.md §9.6)."""
    counts = Counter(s for s, c in zip(samples, correct) if c)
    if not counts:
        return None
    best = max(counts.values())
    return next(s for s in samples if counts.get(s) == best)


def oe_knowledge_state(model: Any, tokenizer: Any, rows: Sequence[dict], *, n: int = 10, temperature: float = 1.0,
                       top_p: float = 1.0, max_new_tokens: int = 50, batch_size: int = 32, seed: int = 0,
                       embedder: Any = None, match: str = "alias_substring",
                       refusal_keywords: Sequence[str] = DEFAULT_REFUSAL_KEYWORDS, prompt_key: str = "prompt",
                       cache_dir: str | None = None, fingerprint: str | None = None,
                       progress: bool = False) -> list[dict]:
    """Open-ended knowledge state of each row (``{prompt_key, answers, ...}``).

    Returns one dict per row: ``samples``, ``sample_is_correct``, ``mu`` and — when an
    ``embedder`` is given — ``sigma`` (craft.md §4 knowledge-state schema).
    """
    from alignkit.generation.sampling import generate

    outs = generate(model, tokenizer, [r[prompt_key] for r in rows], n=n, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress,
                    cache_dir=cache_dir, fingerprint=fingerprint)
    return score_samples(rows, outs, embedder=embedder, match=match, refusal_keywords=refusal_keywords)


def score_samples(rows: Sequence[dict], samples: Sequence[Sequence[str]], *, embedder: Any = None,
                  match: str = "alias_substring",
                  refusal_keywords: Sequence[str] = DEFAULT_REFUSAL_KEYWORDS) -> list[dict]:
    """μ (and σ with an embedder) of given samples: the pure part of the OE query."""
    from alignkit.judges.embedding import certainty_scores

    if match not in MATCHERS:
        raise ValueError(f"unknown correctness match {match!r}; valid: {sorted(MATCHERS)}")
    judge = MATCHERS[match]
    sigmas = certainty_scores(samples, embedder) if embedder is not None else [None] * len(samples)
    out = []
    for r, ss, sg in zip(rows, samples, sigmas):
        flags = [judge(s, r["answers"], refusal_keywords) for s in ss]
        out.append({"samples": list(ss), "sample_is_correct": flags,
                    "mu": sum(flags) / len(flags) if flags else float("nan"), "sigma": sg})
    return out


# --------------------------------------------------------------------------- multiple choice


def build_mc_items(rows: Sequence[dict], values: dict[str, Sequence[str]] | None = None, n_options: int = 4,
                   seed: int = 0, attribute_key: str = "attribute") -> list[dict]:
    """Multiple-choice items from short-answer QA rows.

    The gold option is the row's canonical answer (``answers[0]``); distractors are other
    values of the same attribute — from ``values`` (e.g. the tiny world's attribute
    table) or, without it, from the canonical answers of the other rows with that
    attribute. The gold letter's position is drawn with a per-item RNG seeded from
    ``(seed, index)``, so items do not depend on each other.
    """
    pools: dict[str, list[str]] = {}
    if values is not None:
        pools = {a: list(v) for a, v in values.items()}
    else:
        for r in rows:
            pools.setdefault(str(r.get(attribute_key, "")), []).append(r["answers"][0])
    items = []
    for i, r in enumerate(rows):
        gold = r["answers"][0]
        aliases = {a.lower() for a in r["answers"]}
        pool = sorted({v for v in pools.get(str(r.get(attribute_key, "")), []) if v.lower() not in aliases})
        if len(pool) < n_options - 1:
            raise ValueError(f"row {i}: only {len(pool)} distinct distractors for attribute "
                             f"{r.get(attribute_key)!r}; need {n_options - 1}")
        rng = random.Random(f"{seed}:{i}")
        opts = rng.sample(pool, n_options - 1)
        pos = rng.randrange(n_options)
        opts.insert(pos, gold)
        letters = LETTERS[:n_options]
        body = "\n".join(f"{L}. {o}" for L, o in zip(letters, opts))
        items.append({**r, "options": opts, "target": letters[pos],
                      "mc_prompt": f"{r['question']}\n{body}\nAnswer with the letter of the correct option."})
    return items


def letter_probs(logits_last: Any, letter_ids: Sequence[int]) -> tuple[list[float], list[float]]:
    """(raw, normalised) probabilities of the option letters from one next-token
    distribution: raw = softmax over the whole vocabulary, normalised = renormalised over
    the letters (craft.md §5.1: μ uses normalised, the code's entropy raw ones, §9.5)."""
    import torch

    p = torch.softmax(logits_last.float(), dim=-1)[list(letter_ids)]
    raw = p.tolist()
    s = float(p.sum())
    norm = [x / s for x in raw] if s > 0 else [1.0 / len(raw)] * len(raw)
    return raw, norm


def neg_entropy(probs: Sequence[float]) -> float:
    """σ = Σ p log p (= −H), in [−log K, 0] for a distribution over K options."""
    return float(sum(p * math.log(p) for p in probs if p > 0))


def mc_letter_ids(tokenizer: Any, n_options: int = 4) -> list[int]:
    ids = []
    for L in LETTERS[:n_options]:
        enc = tokenizer.encode(L, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"option letter {L!r} is {len(enc)} tokens for this tokenizer; need exactly 1")
        ids.append(enc[0])
    return ids


def mc_knowledge_state(model: Any, tokenizer: Any, items: Sequence[dict], *, batch_size: int = 32,
                       certainty_probs: str = "raw", prompt_key: str = "mc_prompt") -> list[dict]:
    """One forward pass per item (batched, left-padded): the next-token distribution after
    the chat-templated prompt with the generation prompt appended."""
    import torch

    from alignkit.generation.sampling import render_prompts

    if certainty_probs not in ("raw", "normalised"):
        raise ValueError(f"certainty_probs must be 'raw' or 'normalised', got {certainty_probs!r}")
    n_opt = len(items[0]["options"]) if items else 4
    ids = mc_letter_ids(tokenizer, n_opt)
    texts = render_prompts(tokenizer, [it[prompt_key] for it in items])
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                logits = model(**enc).logits[:, -1, :]
                for row, it in zip(logits, items[start:start + batch_size]):
                    raw, norm = letter_probs(row, ids)
                    gold = LETTERS.index(it["target"])
                    probs = raw if certainty_probs == "raw" else norm
                    out.append({"option_probs": dict(zip(LETTERS, norm)), "option_probs_raw": dict(zip(LETTERS, raw)),
                                "mu": norm[gold], "entropy": -neg_entropy(probs), "sigma": neg_entropy(probs)})
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
    return out


# --------------------------------------------------------------------------- brief fine-tune


def brief_finetune(model: Any, tokenizer: Any, rows: Sequence[dict], *, learning_rate: float, epochs: float = 1.0,
                   batch_size: int = 8, max_length: int | None = 256, seed: int = 0, warmup_ratio: float = 0.0,
                   scheduler: str = "cosine", max_grad_norm: float = 1.0, weight_decay: float = 0.0) -> dict:
    """A short single-process SFT (completion-only loss) of ``model`` in place.

    CRaFT's rehearsal (craft.md §5.3) needs a fine-tuned copy only to re-query it, so it
    runs as a plain PyTorch loop: no Trainer, no accelerate state, no process group —
    safe to run on rank 0 of a DDP/ZeRO launch before the distributed trainer exists.
    ``rows`` are ``sft`` rows (``prompt`` messages, ``completion``). Returns loss stats.
    """
    import torch

    from alignkit.data import tokenize_rows

    tok_rows, _ = tokenize_rows("sft", list(rows), tokenizer, "<rehearsal>", max_length, "truncate")
    if not tok_rows:
        return {"steps": 0, "rows": 0}
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=weight_decay)
    per_epoch = math.ceil(len(tok_rows) / batch_size)
    total = max(1, math.ceil(per_epoch * epochs))
    warm = int(round(warmup_ratio * total))

    def lr_at(step: int) -> float:  # linear warmup, then cosine (or linear) to 0
        if step < warm:
            return (step + 1) / max(warm, 1)
        frac = (step - warm) / max(total - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * frac)) if scheduler == "cosine" else 1 - frac

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.train()
    losses, step = [], 0
    while step < total:
        order = torch.randperm(len(tok_rows), generator=g).tolist()
        for b in range(0, len(order), batch_size):
            if step >= total:
                break
            batch = [tok_rows[i] for i in order[b:b + batch_size]]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            att = torch.zeros((len(batch), width), dtype=torch.long)
            lab = torch.full((len(batch), width), -100, dtype=torch.long)
            for i, r in enumerate(batch):
                L = len(r["input_ids"])
                ids[i, :L] = torch.tensor(r["input_ids"])
                att[i, :L] = 1
                lab[i, :L] = torch.tensor([t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])])
            out = model(input_ids=ids.to(device), attention_mask=att.to(device), labels=lab.to(device), use_cache=False)
            out.loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            step += 1
    model.train(was_training)
    model.eval()
    return {"steps": step, "rows": len(tok_rows), "loss_first": losses[0], "loss_last": losses[-1]}
