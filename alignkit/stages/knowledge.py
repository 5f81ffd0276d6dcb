"""Knowledge-state queries: how often, and how consistently, does a model know an answer?

Shared by the refusal-aware recipes (CRaFT's μ / σ, craft.md §3 and §5.1; semantic-entropy
abstention samples the same way).

* **Open-ended** (:func:`oe_knowledge_state`): N samples per question at temperature T,
  batched through :func:`alignkit.generation.sampling.generate` (per-batch seeds, optional cache).
  μ = fraction of samples judged correct; σ = mean pairwise cosine similarity of the
  samples' sentence embeddings (:mod:`alignkit.judges.embedding`).
* **Multiple choice** (:func:`mc_knowledge_state`): one forward pass per item; μ = the
  normalised probability of the gold option letter, σ = −H over the option letters
  (renormalised over them, or their raw probabilities: only meaningful after the code's
  completion prompt ending in "Answer:", where the letters take nearly all the mass; the
  mass they take is reported per item). Items come from multiple-choice rows
  (``{question, A, B, C, D, target}``, MMLU's columns: :func:`read_mc_rows`) or are built
  from QA rows by :func:`build_mc_items` (distractors drawn from the same attribute's values).

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


def mc_prompt(question: str, options: Sequence[str], prompt_format: str = "chat") -> str:
    """The question and its lettered options. ``chat``: a user turn asking for the letter;
    ``completion``: the official code's plain text ending in ``Answer:`` (craft.md §5.1)."""
    body = "\n".join(f"{L}. {o}" for L, o in zip(LETTERS, options))
    if prompt_format == "completion":
        return f"{question}\n{body}\nAnswer:"
    if prompt_format != "chat":
        raise ValueError(f"prompt_format must be 'chat' or 'completion', got {prompt_format!r}")
    return f"{question}\n{body}\nAnswer with the letter of the correct option."


def build_mc_items(rows: Sequence[dict], values: dict[str, Sequence[str]] | None = None, n_options: int = 4,
                   seed: int = 0, attribute_key: str = "attribute", prompt_format: str = "chat") -> list[dict]:
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
        items.append({**r, "options": opts, "target": LETTERS[pos],
                      "mc_prompt": mc_prompt(r["question"], opts, prompt_format)})
    return items


def read_mc_rows(source: Any, n_options: int = 4, prompt_format: str = "chat", max_errors: int = 20
                 ) -> list[dict] | None:
    """Multiple-choice rows as the paper's MMLU files have them (craft.md §4: ``{id, subject,
    question, A, B, C, D, target}``), validated: a non-empty ``question``, every option letter
    present and non-empty, ``target`` one of the letters — else a data error naming file, row
    and field. ``None`` when the file's first row has no option columns (QA rows: build the
    items with :func:`build_mc_items`). ``source``: a ``DataSource`` (path, format, split, where, limit)."""
    from alignkit.data import IssueCollector, read_rows, select_rows

    letters = LETTERS[:n_options]
    issues = IssueCollector(source.path, max_errors)
    raw = select_rows(read_rows(source.path, source.format, source.split, max_errors, issues), source.path,
                      source.where, source.limit)
    if not raw or not all(L in raw[0][1] for L in letters):
        issues.raise_if_any()
        return None
    items = []
    for i, r in raw:
        q = r.get("question")
        if not isinstance(q, str) or not q.strip():
            issues.add(i, "question", "missing or empty")
        opts = []
        for L in letters:
            o = r.get(L)
            if o is None or (isinstance(o, str) and not o.strip()) or isinstance(o, (list, dict)):
                issues.add(i, L, f"option {L} missing or empty (method.mc_options={n_options})")
            opts.append(str(o))
        t = str(r.get("target", "")).strip().upper()
        if t not in letters:
            issues.add(i, "target", f"must be one of {', '.join(letters)}, got {r.get('target')!r}")
        if isinstance(q, str) and q.strip():
            items.append({**r, "question": q, "options": opts, "target": t, "answers": [opts[letters.index(t)]]
                          if t in letters else [], "_row": i, "mc_prompt": mc_prompt(q, opts, prompt_format)})
    issues.raise_if_any()
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


def mc_letter_ids(tokenizer: Any, n_options: int = 4, prompt_format: str = "chat") -> list[int]:
    """The token of each option letter as the model would write it next: right after the
    chat template's generation prompt ``"A"``, after ``"Answer:"`` in plain text ``" A"``."""
    ids = []
    for L in LETTERS[:n_options]:
        text = L if prompt_format == "chat" else f" {L}"
        enc = tokenizer.encode(text, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"option letter {text!r} is {len(enc)} tokens for this tokenizer; need exactly 1")
        ids.append(enc[0])
    return ids


def mc_knowledge_state(model: Any, tokenizer: Any, items: Sequence[dict], *, batch_size: int = 32,
                       certainty_probs: str = "normalised", prompt_key: str = "mc_prompt",
                       prompt_format: str = "chat") -> list[dict]:
    """One forward pass per item (batched, left-padded): the next-token distribution after the
    prompt — chat-templated with the generation prompt appended (``chat``), or the plain text
    as given (``completion``: the code's base-model prompt ending in "Answer:").

    Per item: ``mu`` (gold letter, renormalised over the options), ``sigma`` = −H over the
    letters (``certainty_probs``: renormalised, or raw), and ``letter_mass``: the share of the
    whole distribution the letters take — raw entropy is only meaningful when it is near 1."""
    import torch

    from alignkit.generation.sampling import render_prompts

    if certainty_probs not in ("raw", "normalised"):
        raise ValueError(f"certainty_probs must be 'raw' or 'normalised', got {certainty_probs!r}")
    n_opt = len(items[0]["options"]) if items else 4
    ids = mc_letter_ids(tokenizer, n_opt, prompt_format)
    prompts = [it[prompt_key] for it in items]
    texts = render_prompts(tokenizer, prompts) if prompt_format == "chat" else list(prompts)
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
                                add_special_tokens=prompt_format == "completion").to(device)
                logits = model(**enc).logits[:, -1, :]
                for row, it in zip(logits, items[start:start + batch_size]):
                    raw, norm = letter_probs(row, ids)
                    gold = LETTERS.index(it["target"])
                    probs = raw if certainty_probs == "raw" else norm
                    out.append({"option_probs": dict(zip(LETTERS, norm)), "option_probs_raw": dict(zip(LETTERS, raw)),
                                "letter_mass": float(sum(raw)), "mu": norm[gold], "entropy": -neg_entropy(probs),
                                "sigma": neg_entropy(probs)})
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
    return out


# --------------------------------------------------------------------------- stage plumbing


def judges_code_digest() -> str:
    """Digest of every judge module (and the world knowledge base the ``kb`` judge reads), for
    the key of a stage whose output a judge decides: a changed refusal pattern or matching rule
    must never reuse verdicts the old code wrote."""
    import importlib
    import pkgutil

    import alignkit.judges as J
    import alignkit.world.kb as world_kb
    from alignkit.core.fingerprint import code_digest

    mods = [J, *(importlib.import_module(f"alignkit.judges.{m.name}")
                 for m in sorted(pkgutil.iter_modules(J.__path__), key=lambda m: m.name))]
    return code_digest(*mods, world_kb)


def release_memory() -> None:
    """Free what a finished stage's model held (host and accelerator caches) before the next
    stage loads one: on an 8B model the sampler, the NLI judge and a sweep point's fine-tune
    do not fit on one GPU together."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- brief fine-tune


def brief_finetune(model: Any, tokenizer: Any, rows: Sequence[dict], *, learning_rate: float, epochs: float = 1.0,
                   batch_size: int = 8, grad_accum: int = 1, max_length: int | None = 256, seed: int = 0,
                   warmup_ratio: float = 0.0, scheduler: str = "cosine", max_grad_norm: float = 1.0,
                   weight_decay: float = 0.0, autocast_dtype: Any = None) -> dict:
    """A short single-process SFT (completion-only loss) of ``model`` in place.

    CRaFT's rehearsal (craft.md §5.3) and SE abstention's τ sweep need a fine-tuned copy only
    to re-query or evaluate it, so it runs as a plain PyTorch loop: no Trainer, no accelerate
    state, no process group — safe to run on rank 0 of a DDP/ZeRO launch before the
    distributed trainer exists. ``rows`` are ``sft`` rows (``prompt`` messages, ``completion``).

    One optimiser step takes ``batch_size × grad_accum`` rows, run as ``grad_accum`` forward
    passes of ``batch_size`` rows (the Trainer's per-device batch and accumulation: an 8B
    model cannot take 48 rows in one pass). The loss of a step is the token mean over all
    completion tokens of its rows, whatever the split — the same step as one pass of the
    whole batch, and as the Trainer's (``num_items_in_batch``). Gradient checkpointing,
    quantisation and the attention kernel are the model's own (load it with
    :func:`alignkit.models.load_model`); ``autocast_dtype`` (bf16 / fp16) runs the forward
    under ``torch.autocast`` as ``train.bf16`` / ``fp16`` do. Returns loss stats.
    """
    import contextlib

    import torch

    from alignkit.data import tokenize_rows

    if batch_size < 1 or grad_accum < 1:
        raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size} and {grad_accum}")
    tok_rows, _ = tokenize_rows("sft", list(rows), tokenizer, "<rehearsal>", max_length, "truncate")
    if not tok_rows:
        return {"steps": 0, "rows": 0}
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=weight_decay)
    step_rows = batch_size * grad_accum
    per_epoch = math.ceil(len(tok_rows) / step_rows)
    total = max(1, math.ceil(per_epoch * epochs))
    warm = int(round(warmup_ratio * total))

    def lr_at(step: int) -> float:  # linear warmup, then cosine (or linear) to 0
        if step < warm:
            return (step + 1) / max(warm, 1)
        frac = (step - warm) / max(total - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * frac)) if scheduler == "cosine" else 1 - frac

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def tensors(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        lab = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, r in enumerate(batch):
            L = len(r["input_ids"])
            ids[i, :L] = torch.tensor(r["input_ids"])
            att[i, :L] = 1
            lab[i, :L] = torch.tensor([t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])])
        return ids.to(device), att.to(device), lab.to(device)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    was_training = model.training
    model.train()
    losses, step, max_rows = [], 0, 0
    while step < total:
        order = torch.randperm(len(tok_rows), generator=g).tolist()
        for b in range(0, len(order), step_rows):
            if step >= total:
                break
            group = [tok_rows[i] for i in order[b:b + step_rows]]
            # completion tokens of the whole step: each micro-batch's summed NLL is divided by it
            n_tok = sum(sum(1 for m in r["completion_mask"][1:] if m) for r in group)
            step_loss = 0.0
            for m in range(0, len(group), batch_size):
                ids, att, lab = tensors(group[m:m + batch_size])
                max_rows = max(max_rows, ids.shape[0])
                with autocast():
                    logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten(),
                                                        ignore_index=-100, reduction="sum")
                loss = nll / max(n_tok, 1)
                loss.backward()
                step_loss += float(loss.detach())
                del logits, nll, loss
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            step += 1
    model.train(was_training)
    model.eval()
    return {"steps": step, "rows": len(tok_rows), "loss_first": losses[0], "loss_last": losses[-1],
            "rows_per_step": step_rows, "rows_per_forward": max_rows}
