"""Batched generation: N samples per prompt, greedy answers, cached results.

Every recipe that samples from a policy (Mask-DPO's on-policy responses, CRaFT's
knowledge queries, SE-abstention's M samples, jailbreak evaluation) goes through
:func:`generate`, so decoding, seeding and caching behave the same everywhere — also
when the model is a generation backend (:mod:`alignkit.generation.backends`: an OpenAI-compatible
endpoint or vLLM) instead of a loaded HF model. :func:`sample_tokens` is the same
decoding loop with per-token detail, for ``alignkit serve``.

Determinism: each batch runs under its own torch RNG seeded from ``(seed, batch
index)`` inside :func:`torch.random.fork_rng`, so the caller's global RNG is left alone
and a batch's samples do not depend on what ran before it. Changing ``batch_size``
changes the batches and therefore the samples.

Caching: with ``cache_dir`` set, each batch's result is stored as one JSON file keyed
by sha256 of (model fingerprint, rendered prompts — message lists for an endpoint —,
sampling parameters, batch seed), written atomically as the batch completes. A re-run
only generates the batches that are missing, so an interrupted long run resumes where
it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from alignkit.core.fingerprint import model_fingerprint, source_fingerprint  # noqa: F401 - source_fingerprint re-exported
from alignkit.generation.base import _batch_seed

Prompt = str | list[dict[str, Any]]

_CACHE_VERSION = 1


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


def _atomic_write_json(path: Path, obj: Any) -> None:
    from alignkit.core.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, ensure_ascii=False))


def _read_json(path: Path) -> Any | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        # A corrupt entry is treated as a miss and rewritten.
        return None


class TokenSample(NamedTuple):
    """One generated sequence with per-token detail (:func:`sample_tokens`, ``alignkit serve``)."""

    token_ids: list[int]  # the new tokens, the end token included when one was produced
    logprobs: list[float] | None  # log-prob of each token in token_ids (when asked for)
    top_logprobs: list[list[tuple[int, float]]] | None  # the k most likely (token, log-prob) at each position
    finish: str  # "eos" (an end token), "length" (max_new_tokens), "stop" (on_step stopped it)


class _StepScores:
    """Logits processor that keeps the current step's log-softmax.

    HF runs custom processors before the temperature / top-k / top-p warpers, so
    ``scores`` here are the model's own logits (divided by ``temperature`` only when the
    caller asks for the sampling distribution). One step is kept: O(batch x vocab).
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.lp = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.lp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores


class _StepWatch:
    """Stopping criterion that sees each new token right after it is chosen.

    It records every live row's token (and, with a :class:`_StepScores`, the token's
    log-prob and the top-k alternatives), marks rows that produced an end token, and
    lets ``on_step(rows, watch)`` stop rows early (stop strings, a client that hung up).
    Rows that finish are padded by HF afterwards; those pads are ignored here.
    """

    def __init__(self, n_rows: int, eos_ids: list[int], scores: _StepScores | None, top_k: int,
                 on_step: Any = None) -> None:
        self.eos = set(eos_ids)
        self.scores = scores
        self.top_k = top_k
        self.on_step = on_step
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]
        self.logprobs: list[list[float]] | None = [[] for _ in range(n_rows)] if scores is not None else None
        self.tops: list[list[list[tuple[int, float]]]] | None = \
            [[] for _ in range(n_rows)] if scores is not None and top_k > 0 else None
        self.finish: list[str | None] = [None] * n_rows

    def __call__(self, input_ids: Any, scores: Any = None, **kwargs: Any) -> Any:
        import torch

        tok = input_ids[:, -1]
        chosen = top_v = top_i = None
        if self.scores is not None:
            chosen = self.scores.lp.gather(1, tok[:, None]).squeeze(1).tolist()
            if self.tops is not None:
                v, i = self.scores.lp.topk(self.top_k, dim=-1)
                top_v, top_i = v.tolist(), i.tolist()
        live = []
        for r, t in enumerate(tok.tolist()):
            if self.finish[r] is not None:
                continue
            self.tokens[r].append(t)
            if chosen is not None:
                self.logprobs[r].append(chosen[r])
            if top_v is not None:
                self.tops[r].append(list(zip(top_i[r], top_v[r])))
            if t in self.eos:
                self.finish[r] = "eos"
            live.append(r)
        if self.on_step is not None and live:
            for r in self.on_step(live, self) or ():
                if self.finish[r] is None:
                    self.finish[r] = "stop"
        return torch.tensor([f == "stop" for f in self.finish], dtype=torch.bool, device=input_ids.device)

    def samples(self) -> list[TokenSample]:
        return [TokenSample(self.tokens[r], self.logprobs[r] if self.logprobs is not None else None,
                            self.tops[r] if self.tops is not None else None, self.finish[r] or "length")
                for r in range(len(self.tokens))]


def _decode(model: Any, enc: Any, *, n: int, greedy: bool, temperature: float, top_p: float, top_k: int,
            max_new_tokens: int, seed: int, eos_ids: list[int], pad_id: int | None,
            lp_temperature: float | None = None, top_logprobs: int = 0, on_step: Any = None) -> list[TokenSample]:
    """One ``model.generate`` call on a tokenised batch under its own RNG seed; one
    :class:`TokenSample` per output row (prompt-major: prompt i's samples are rows
    ``i*per .. i*per+per-1`` with ``per = 1 if greedy else n``)."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "use_cache": True, "eos_token_id": eos_ids,
                              "pad_token_id": pad_id}
    if greedy:
        kwargs.update(do_sample=False, num_return_sequences=1, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, num_return_sequences=n, temperature=temperature, top_p=top_p, top_k=top_k)
    scores = _StepScores(lp_temperature) if lp_temperature is not None else None
    if scores is not None:
        kwargs["logits_processor"] = LogitsProcessorList([scores])
    rows = enc["input_ids"].shape[0] * (1 if greedy else n)
    watch = _StepWatch(rows, eos_ids, scores, top_logprobs, on_step)
    kwargs["stopping_criteria"] = StoppingCriteriaList([watch])
    device = enc["input_ids"].device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        model.generate(**enc, **kwargs)
    return watch.samples()


def sample_tokens(model: Any, tokenizer: Any, prompt_ids: Sequence[int], *, n: int = 1, greedy: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 128,
                  seed: int = 0, logprobs: bool = False, top_logprobs: int = 0,
                  on_step: Any = None) -> list[TokenSample]:
    """``n`` samples of one tokenised prompt with per-token detail (``alignkit serve``).

    Seeded like batch 0 of :func:`generate` with the same ``seed``, so one prompt sampled
    here and through ``generate(..., batch_size=1)`` gives the same tokens. Log-probs are
    under the model's own distribution (temperature 1, no top-k/top-p truncation).
    ``greedy`` with ``n > 1`` decodes ``n`` identical rows (a streaming client sees each).
    ``on_step(rows, watch)`` runs after every token with the rows that just got one
    (``watch.tokens[r]``, ``watch.logprobs[r]``, ``watch.tops[r]``); the rows it returns
    stop (finish ``"stop"``).
    """
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)] * (n if greedy else 1), dtype=torch.long, device=device)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        want = logprobs or top_logprobs > 0
        return _decode(model, enc, n=n, greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                       max_new_tokens=max_new_tokens, seed=_batch_seed(seed, 0),
                       eos_ids=_eos_ids(model, tokenizer),
                       pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                       lp_temperature=1.0 if want else None, top_logprobs=top_logprobs, on_step=on_step)
    finally:
        if was_training:
            model.train()


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

    ``model`` is a loaded HF model (``tokenizer`` renders and decodes), or a generation
    backend from :mod:`alignkit.generation.backends` (an OpenAI-compatible endpoint, vLLM), which
    receives the same batches and per-batch seeds; the batching, seeding, caching and
    return values below are the same for both.

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
    defaults to :func:`model_fingerprint` of the model object, or to a backend's own
    fingerprint (and ``cache_dir`` to its ``cache_dir``).

    ``return_truncated=True`` appends, as the last element of the returned tuple, one
    flag per sample: ``True`` when it hit ``max_new_tokens`` without an end token (the
    text stops mid-answer; training it as finished teaches stopping mid-sentence).
    """
    from tqdm.auto import tqdm

    from alignkit.generation.base import GenerationBackend

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

    backend = model if isinstance(model, GenerationBackend) else None
    if backend is not None:
        backend.check(greedy=greedy, temperature=temperature, lp_mode=lp_mode, logprob_source=logprob_source)
        keyed = backend.prompt_keys(prompts)  # what identifies each prompt to this backend
        eos_ids = None
        cache_dir = backend.cache_dir if cache_dir is None else cache_dir
        fingerprint = backend.fingerprint if fingerprint is None else fingerprint
    else:
        keyed = render_prompts(tokenizer, prompts)
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

    starts = list(range(0, len(keyed), batch_size))
    results: list[tuple | None] = [None] * len(starts)
    paths: dict[int, Path] = {}
    todo: list[int] = []
    bar = tqdm(total=len(keyed), desc="generate", unit="prompt", disable=_progress_disabled(progress))
    for b, start in enumerate(starts):
        batch = keyed[start : start + batch_size]
        if cache is not None:
            key = hashlib.sha256(
                json.dumps([fingerprint, batch, params, _batch_seed(seed, b)], ensure_ascii=False).encode()
            ).hexdigest()
            paths[b] = cache / f"{key}.json"
            hit = _read_json(paths[b])
            # Entries written before truncation flags were recorded are misses when flags are asked for.
            if hit is not None and len(hit.get("texts", [])) == len(batch) \
                    and (not return_truncated or "truncated" in hit):
                results[b] = (hit["texts"], hit.get("logprobs"), hit.get("truncated") or [])
                bar.update(len(batch))
                continue
        todo.append(b)

    def done(b: int, out: tuple) -> None:
        # Written as each batch completes: an interrupted run keeps every finished batch.
        if b in paths:
            _atomic_write_json(paths[b], {"texts": out[0], "logprobs": out[1], "truncated": out[2]})
        results[b] = out
        bar.update(len(out[0]))

    decode_kw = dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                     greedy=greedy, lp_mode=lp_mode, logprob_source=logprob_source)
    try:
        if backend is not None and todo:
            jobs = [(b, list(prompts[starts[b] : starts[b] + batch_size]), _batch_seed(seed, b)) for b in todo]
            for b, out in backend.generate_batches(jobs, **decode_kw):
                done(b, out)
        elif todo:
            with _inference_mode(model, tokenizer):
                device = next(model.parameters()).device
                for b in todo:
                    batch = keyed[starts[b] : starts[b] + batch_size]
                    done(b, _generate_batch(model, tokenizer, batch, device=device, seed=_batch_seed(seed, b),
                                            eos_ids=eos_ids, **decode_kw))
    finally:
        bar.close()
    texts = [t for r in results for t in r[0]]
    logps = [x for r in results for x in (r[1] or [])]
    truncs = [x for r in results for x in (r[2] or [])]
    if return_truncated:
        return (texts, logps, truncs) if lp_mode else (texts, truncs)
    if lp_mode:
        return texts, logps
    return texts


class _inference_mode:  # noqa: N801 - used as a context manager
    """Eval mode and left padding for the duration of a local generate; both restored."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tok = model, tokenizer

    def __enter__(self) -> None:
        self.was_training = getattr(self.model, "training", False)
        self.old_side, self.old_pad = self.tok.padding_side, self.tok.pad_token
        self.model.eval()
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token

    def __exit__(self, *exc: Any) -> None:
        self.tok.padding_side = self.old_side
        if self.old_pad is None:
            self.tok.pad_token = None
        if self.was_training:
            self.model.train()


def _generate_batch(model, tokenizer, batch, *, device, n, temperature, top_p, top_k, max_new_tokens, greedy, seed,
                    eos_ids, lp_mode, logprob_source):
    enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    lp_t = None
    if lp_mode:
        lp_t = temperature if (logprob_source == "sampling" and not greedy) else 1.0
    samples = _decode(model, enc, n=n, greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                      max_new_tokens=max_new_tokens, seed=seed, eos_ids=eos_ids, pad_id=tokenizer.pad_token_id,
                      lp_temperature=lp_t)
    return _group(samples, len(batch), n, greedy, lp_mode,
                  lambda s: tokenizer.decode(s.token_ids[:-1] if s.finish == "eos" else s.token_ids,
                                             skip_special_tokens=True).strip())


def _group(samples: list[TokenSample], n_prompts: int, n: int, greedy: bool, lp_mode: str | bool,
           text_of: Any) -> tuple[list[list[str]], list[list[float]] | None, list[list[bool]]]:
    """Prompt-major rows -> (texts, log-probs, truncated) per prompt, ``n`` each (greedy rows repeated)."""
    per = 1 if greedy else n
    rep = n if greedy else 1
    texts, logps, truncs = [], [] if lp_mode else None, []
    for i in range(n_prompts):
        rows = samples[i * per : (i + 1) * per]
        texts.append([text_of(s) for s in rows] * rep)
        # No end token among the new tokens: generation stopped at the max_new_tokens cap.
        truncs.append([s.finish == "length" for s in rows] * rep)
        if lp_mode:
            lps = [sum(s.logprobs) / len(s.logprobs) if (lp_mode == "mean" and s.logprobs) else sum(s.logprobs)
                   for s in rows]
            logps.append(lps * rep)
    return texts, logps, truncs


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[Prompt], **kw: Any) -> list[str]:
    """One greedy answer per prompt (evaluation decoding in every spec)."""
    kw.pop("n", None)
    kw.pop("greedy", None)
    out = generate(model, tokenizer, prompts, n=1, greedy=True, **kw)
    if isinstance(out, tuple):
        out = out[0]
    return [r[0] for r in out]
