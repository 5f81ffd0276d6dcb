"""Batched generation: N samples per prompt, greedy answers, cached results.

Every recipe that samples from a policy (Mask-DPO's on-policy responses, CRaFT's
knowledge queries, SE-abstention's M samples, jailbreak evaluation) goes through
:func:`generate`, so decoding, seeding and caching behave the same everywhere.

Determinism: each batch runs under its own torch RNG seeded from ``(seed, batch
index)`` inside :func:`torch.random.fork_rng`, so the caller's global RNG is left alone
and a batch's samples do not depend on what ran before it. Changing ``batch_size``
changes the batches and therefore the samples.

Caching: with ``cache_dir`` set, each batch's result is stored as one JSON file keyed
by sha256 of (model fingerprint, rendered prompts, sampling parameters, batch seed),
written atomically. A re-run only generates the batches that are missing, so an
interrupted long run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Prompt = str | list[dict[str, Any]]

_CACHE_VERSION = 1
# Files hashed in full below this size; larger ones (weights) are hashed by sampled chunks.
_FULL_HASH_LIMIT = 4 << 20
_CHUNK = 1 << 16


def render_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> list[str]:
    """Render prompts (plain user strings or message lists) with the chat template and
    the generation prompt appended."""
    rendered = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            messages = [{"role": "user", "content": p}]
        elif isinstance(p, list) and all(isinstance(m, dict) for m in p):
            messages = p
        else:
            raise TypeError(f"prompt {i}: expected str or list of message dicts, got {type(p).__name__}")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rendered.append(text)
    return rendered


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for src in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        if src is None:
            continue
        for i in src if isinstance(src, (list, tuple)) else [src]:
            if int(i) not in ids:
                ids.append(int(i))
    return ids


def _batch_seed(seed: int, batch_index: int) -> int:
    # Hash rather than seed + index so (seed=0, batch 1) and (seed=1, batch 0) differ.
    digest = hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _atomic_write_json(path: Path, obj: Any) -> None:
    from alignkit.data.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, ensure_ascii=False))


def _read_json(path: Path) -> Any | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        # A corrupt entry is treated as a miss and rewritten.
        return None


def _hash_file(h: Any, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            h.update(f.read())
            return
        # Cheap digest of large weight files: 64 evenly spaced chunks plus the tail.
        # Any retrained checkpoint changes these bytes (and usually the safetensors header).
        for k in range(64):
            f.seek((size - _CHUNK) * k // 63)
            h.update(f.read(_CHUNK))


def model_fingerprint(model_dir_or_model: Any) -> str:
    """A short content hash identifying a model, for cache keys.

    * A directory: hashes every top-level file (config, tokenizer, weights, adapters);
      files over 4 MiB are hashed by size plus 64 sampled 64 KiB chunks, so an 8B
      checkpoint costs milliseconds rather than a full read.
    * A model object: hashes its config plus, per parameter, name, shape, dtype and the
      float64 sum and sum of squares (one pass over the weights, no copy to the host).
    """
    h = hashlib.sha256()
    if isinstance(model_dir_or_model, (str, os.PathLike)):
        root = Path(model_dir_or_model)
        if not root.is_dir():
            raise FileNotFoundError(f"model_fingerprint: {root} is not a directory")
        for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
            _hash_file(h, path)
        return h.hexdigest()[:16]

    import torch

    model = model_dir_or_model
    config = getattr(model, "config", None)
    if config is not None:
        h.update(
            config.to_json_string(use_diff=False).encode()
            if hasattr(config, "to_json_string")
            else repr(config).encode()
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().to(torch.float64)
            h.update(
                f"{name}:{tuple(p.shape)}:{p.dtype}:{x.sum().item():.10e}:{(x * x).sum().item():.10e}".encode()
            )
    return h.hexdigest()[:16]


def source_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """A cache-key fingerprint for a model *reference* (a config's ``model.name_or_path``).

    * A local directory: :func:`model_fingerprint` of its files.
    * A hub id (``name`` or ``org/name``): ``hub:<id>@<revision or main>``. Never the
      downloaded files: the key must be the same before and after the first download,
      and on every rank (rank 0 downloads and samples under ``main_process_first``; the
      others must hit its cache, not re-sample). Pin ``model.revision`` to a commit for
      a key that cannot go stale when the branch moves.

    A name that looks like a local path (``/``, ``./``, ``~``, more than one ``/``, or
    whose parent folder exists, like ``runs/model``) but is not a directory is an error.
    """
    root = Path(name_or_path).expanduser()
    if root.is_dir():
        return model_fingerprint(root)
    parent = root.parent
    path_like = (name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
                 or not _HUB_ID.fullmatch(name_or_path) or (str(parent) not in ("", ".") and parent.is_dir()))
    if path_like:
        raise FileNotFoundError(f"model_fingerprint: {name_or_path} is not a directory")
    return f"hub:{name_or_path}@{revision or 'main'}"


# Hub repo ids: "name" or "org/name" of letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")


class _LogprobRecorder:
    """Logits processor that accumulates the log-prob of each sampled token.

    HF applies custom processors before the temperature / top-k / top-p warpers, so
    ``scores`` here are the model's own logits. At step t the token chosen at step t-1
    is the last input id, so only one step's distribution is kept (O(batch x vocab)
    memory instead of storing every step's logits).
    """

    def __init__(self, eos_ids: list[int], temperature: float) -> None:
        self.eos = eos_ids
        self.temperature = temperature
        self.prev = None
        self.total = None
        self.count = None
        self.done = None

    def _take(self, tokens: Any) -> None:
        import torch

        lp = self.prev.gather(1, tokens[:, None]).squeeze(1)
        active = ~self.done
        self.total += torch.where(active, lp, torch.zeros_like(lp))
        self.count += active.long()
        self.done |= torch.isin(tokens, torch.tensor(self.eos, device=tokens.device))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.prev is None:
            n = scores.shape[0]
            self.total = torch.zeros(n, dtype=torch.float64, device=scores.device)
            self.count = torch.zeros(n, dtype=torch.long, device=scores.device)
            self.done = torch.zeros(n, dtype=torch.bool, device=scores.device)
        else:
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1).double()
        return scores

    def finish(self, sequences: Any) -> tuple[list[float], list[int]]:
        if self.prev is None:  # nothing generated
            n = sequences.shape[0]
            return [0.0] * n, [0] * n
        self._take(sequences[:, -1])
        return self.total.tolist(), self.count.tolist()


def _progress_disabled(progress: bool) -> bool:
    env = os.environ.get("TQDM_DISABLE", "").strip().lower()
    return (not progress) or env not in ("", "0", "false", "no")


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    greedy: bool = False,
    progress: bool = True,
    return_logprobs: bool | str = False,
    logprob_source: str = "model",
    cache_dir: str | os.PathLike | None = None,
    fingerprint: str | None = None,
    return_truncated: bool = False,
) -> list[list[str]] | tuple:
    """Generate ``n`` completions for each prompt; returns ``n`` strings per prompt.

    Prompts are plain user strings or message lists, rendered with the chat template
    and the generation prompt. Batches are left-padded (the tokenizer's padding side is
    restored afterwards); one ``model.generate`` call per batch with
    ``num_return_sequences=n`` and the KV cache on. Only new tokens are decoded, cut at
    the first eos, and stripped of surrounding whitespace. ``greedy=True`` decodes once
    and repeats the answer ``n`` times (greedy decoding gives identical copies anyway).

    ``return_logprobs``: ``True``/``"sum"`` also returns, per sample, the summed token
    log-probs of the generated tokens (eos included, padding excluded); ``"mean"``
    returns the length-normalised mean (semantic entropy's ℓ̄, se_abstention.md §2.1).
    ``logprob_source="model"`` scores under the model's own distribution;
    ``"sampling"`` divides logits by ``temperature`` first (top-k/top-p truncation is
    not applied to the score).

    ``cache_dir``: per-batch JSON cache (see module docstring); ``fingerprint``
    defaults to :func:`model_fingerprint` of the model object.

    ``return_truncated=True`` appends, as the last element of the returned tuple, one
    flag per sample: ``True`` when it hit ``max_new_tokens`` without an end token (the
    text stops mid-answer; training it as finished teaches stopping mid-sentence).
    """
    import torch
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling (got {temperature}); use greedy=True")
    if return_logprobs not in (False, True, "sum", "mean"):
        raise ValueError(f"return_logprobs must be False, True, 'sum' or 'mean', got {return_logprobs!r}")
    if logprob_source not in ("model", "sampling"):
        raise ValueError(f"logprob_source must be 'model' or 'sampling', got {logprob_source!r}")
    lp_mode = "sum" if return_logprobs is True else return_logprobs

    rendered = render_prompts(tokenizer, prompts)
    eos_ids = _eos_ids(model, tokenizer)
    params = {
        "n": n,
        "temperature": None if greedy else temperature,
        "top_p": None if greedy else top_p,
        "top_k": None if greedy else top_k,
        "max_new_tokens": max_new_tokens,
        "greedy": greedy,
        "logprobs": lp_mode and f"{lp_mode}:{logprob_source}",
        "eos": eos_ids,
        "v": _CACHE_VERSION,
    }
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None and fingerprint is None:
        fingerprint = model_fingerprint(model)

    texts: list[list[str]] = []
    logps: list[list[float]] = []
    truncs: list[list[bool]] = []
    was_training = getattr(model, "training", False)
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    try:
        model.eval()
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        device = next(model.parameters()).device
        bar = tqdm(total=len(rendered), desc="generate", unit="prompt", disable=_progress_disabled(progress))
        for b, start in enumerate(range(0, len(rendered), batch_size)):
            batch = rendered[start : start + batch_size]
            bseed = _batch_seed(seed, b)
            path = None
            if cache is not None:
                key = hashlib.sha256(
                    json.dumps([fingerprint, batch, params, bseed], ensure_ascii=False).encode()
                ).hexdigest()
                path = cache / f"{key}.json"
                hit = _read_json(path)
                # Entries written before truncation flags were recorded are misses when flags are asked for.
                if hit is not None and len(hit.get("texts", [])) == len(batch) \
                        and (not return_truncated or "truncated" in hit):
                    texts.extend(hit["texts"])
                    logps.extend(hit.get("logprobs") or [])
                    truncs.extend(hit.get("truncated") or [])
                    bar.update(len(batch))
                    continue
            bt, bl, btr = _generate_batch(
                model,
                tokenizer,
                batch,
                device=device,
                n=n,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_new_tokens=max_new_tokens,
                greedy=greedy,
                seed=bseed,
                eos_ids=eos_ids,
                lp_mode=lp_mode,
                logprob_source=logprob_source,
                torch=torch,
            )
            if path is not None:
                _atomic_write_json(path, {"texts": bt, "logprobs": bl, "truncated": btr})
            texts.extend(bt)
            logps.extend(bl or [])
            truncs.extend(btr)
            bar.update(len(batch))
        bar.close()
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
        if was_training:
            model.train()
    if return_truncated:
        return (texts, logps, truncs) if lp_mode else (texts, truncs)
    if lp_mode:
        return texts, logps
    return texts


def _generate_batch(
    model,
    tokenizer,
    batch,
    *,
    device,
    n,
    temperature,
    top_p,
    top_k,
    max_new_tokens,
    greedy,
    seed,
    eos_ids,
    lp_mode,
    logprob_source,
    torch,
):
    from transformers import LogitsProcessorList

    enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_len = enc["input_ids"].shape[1]
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "use_cache": True,
        "eos_token_id": eos_ids,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if greedy:
        kwargs.update(do_sample=False, num_return_sequences=1, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(
            do_sample=True, num_return_sequences=n, temperature=temperature, top_p=top_p, top_k=top_k
        )
    recorder = None
    if lp_mode:
        t = temperature if (logprob_source == "sampling" and not greedy) else 1.0
        recorder = _LogprobRecorder(eos_ids, t)
        kwargs["logits_processor"] = LogitsProcessorList([recorder])
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        seqs = model.generate(**enc, **kwargs)
        rec = recorder.finish(seqs) if recorder is not None else None
    new = seqs[:, prompt_len:].tolist()
    decoded, cut_off = [], []
    for row in new:
        cut = next((i for i, tok in enumerate(row) if tok in eos_ids), None)
        # No end token among the new tokens: generation stopped at the max_new_tokens cap.
        cut_off.append(cut is None)
        decoded.append(tokenizer.decode(row[: len(row) if cut is None else cut], skip_special_tokens=True).strip())
    lps = None
    if rec is not None:
        total, count = rec
        lps = [s / c if (lp_mode == "mean" and c) else s for s, c in zip(total, count)]
    per = 1 if greedy else n
    texts = [decoded[i * per : (i + 1) * per] * (n if greedy else 1) for i in range(len(batch))]
    truncated = [cut_off[i * per : (i + 1) * per] * (n if greedy else 1) for i in range(len(batch))]
    logps = None
    if lps is not None:
        logps = [lps[i * per : (i + 1) * per] * (n if greedy else 1) for i in range(len(batch))]
    return texts, logps, truncated


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[Prompt], **kw: Any) -> list[str]:
    """One greedy answer per prompt (evaluation decoding in every spec)."""
    kw.pop("n", None)
    kw.pop("greedy", None)
    out = generate(model, tokenizer, prompts, n=1, greedy=True, **kw)
    if isinstance(out, tuple):
        out = out[0]
    return [r[0] for r in out]
