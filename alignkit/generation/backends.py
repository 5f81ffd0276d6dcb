"""Generation backends: where :func:`alignkit.generation.sampling.generate` sends its batches.

The prepare stages that sample from the base/policy model — Mask-DPO / DPO pair
sampling (:mod:`alignkit.stages.pairs`), unsafe-set generation (:mod:`alignkit.stages.unsafe_set`),
CRaFT's open-ended knowledge query and SE-abstention's samples — load their sampler
with :func:`load_sampler`, so the run config's ``generation`` section picks the engine
for all of them in one place:

* ``hf`` (default): the model loaded in this process (``model.name_or_path``).
* ``openai``: any OpenAI-compatible ``/v1/chat/completions`` endpoint — ``vllm serve``,
  SGLang, TGI, ``alignkit serve`` — through :class:`OpenAIBackend`.
* ``vllm``: offline ``vllm.LLM`` on the local GPUs through :class:`VLLMBackend`.

What stays local whatever the setting, because it needs the weights in this process:
evaluation after training (it scores the *trained* model in the run dir), CRaFT's
multiple-choice query (option log-probs from the logits), its rehearsal re-query (a
model fine-tuned in memory), judges, and attack targets (their own ``target`` config).

Seeding: ``generate`` seeds batch ``b`` with ``(seed, b)``; a backend gives prompt ``i``
of that batch the seed derived from ``(batch seed, i)``, so a prompt's samples depend
only on the run seed, its batch and its place in it, as with the local path. Samples of
different engines differ (different kernels and RNGs): a stage's cache key names the
backend (:func:`sampler_fingerprint`).

Caching: remote weights cannot be hashed, so an endpoint is identified by its URL, the
served model name and the user's ``generation.fingerprint`` (a revision or weights
digest). Without a fingerprint, a server that starts serving other weights under the
same name and URL is indistinguishable from the old one: cached samples would be reused.
Remote and vLLM backends keep a per-batch cache under ``<stage_dir>/generation`` so an
interrupted sampling run resumes with the batches it has not finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from alignkit.generation.base import (  # noqa: F401 - re-exported
    BatchResult,
    GenerationBackend,
    GenerationBackendError,
    prompt_seed,
)

log = logging.getLogger(__name__)

# Prompts per vllm.LLM.generate call: enough for continuous batching to fill the GPU, few
# enough that an interrupted run keeps most finished batches in the per-batch cache.
_VLLM_CHUNK_PROMPTS = 512


def _messages(prompt: Any, i: int) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return [dict(m) for m in prompt]
    raise TypeError(f"prompt {i}: expected str or list of message dicts, got {type(prompt).__name__}")


def _score(lps: list[float], lp_mode: str) -> float:
    return sum(lps) / len(lps) if (lp_mode == "mean" and lps) else sum(lps)


# ---------------------------------------------------------------- OpenAI-compatible HTTP


class OpenAIBackend(GenerationBackend):
    """Chat completions from any OpenAI-compatible server, one request per prompt (with
    ``n`` samples), at most ``max_concurrency`` in flight.

    Requests go through :class:`alignkit.core.http.JSONClient` (httpx2). Transient failures
    (5xx, 429, timeouts, connection errors) are retried with exponential backoff; other 4xx
    fail at once. The API key is read from the environment variable ``api_key_env`` at request
    time and never stored, logged or put in an error; it never follows a redirect and goes
    over plain ``http://`` only to loopback. ``stats`` counts ``requests`` (attempts),
    ``retries`` and ``completions``.

    ``top_k > 0`` is sent as ``top_k`` (a vLLM / SGLang extension). Log-probs come from
    ``logprobs: true``: the sum (or mean) of the reported per-token log-probs, which
    ``vllm serve`` (raw log-probs, its default) and ``alignkit serve`` give under the model's
    own distribution, the end token included as in the local path. ``finish_reason:
    "length"`` marks a sample truncated.
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, max_concurrency: int = 16,
                 timeout_s: float = 300.0, max_retries: int = 3, backoff: float = 0.5, fingerprint: str | None = None,
                 cache_dir: str | os.PathLike | None = None) -> None:
        from alignkit.core.http import JSONClient, chat_completions_url

        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if api_key_env and not os.environ.get(api_key_env):
            raise GenerationBackendError(f"generation.api_key_env: the environment variable {api_key_env} is not set")
        self.url = chat_completions_url(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout = timeout_s
        self.max_retries = max_retries
        self.backoff = backoff
        self.user_fingerprint = fingerprint
        self.fingerprint = "openai:" + json.dumps({"url": self.url, "model": model, "fingerprint": fingerprint},
                                                  sort_keys=True)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._client = JSONClient(self.url, api_key_env=api_key_env, timeout=timeout_s, max_retries=max_retries,
                                  backoff=backoff, where=self._where(), error=GenerationBackendError,
                                  max_connections=max_concurrency)

    def prompt_keys(self, prompts: Sequence[Any]) -> list[Any]:
        return [_messages(p, i) for i, p in enumerate(prompts)]

    def generate_batches(self, jobs, *, n, temperature, top_p, top_k, max_new_tokens, greedy, lp_mode,
                         logprob_source):
        got: dict[int, list] = {b: [None] * len(prompts) for b, prompts, _ in jobs}
        left = {b: len(prompts) for b, prompts, _ in jobs}
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = {pool.submit(self._complete, _messages(p, i), prompt_seed(bseed, i), n=n, temperature=temperature,
                                   top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, greedy=greedy,
                                   lp_mode=lp_mode): (b, i)
                       for b, prompts, bseed in jobs for i, p in enumerate(prompts)}
            try:
                for fut in as_completed(futures):
                    b, i = futures[fut]
                    got[b][i] = fut.result()
                    left[b] -= 1
                    if left[b] == 0:
                        rows = got.pop(b)
                        yield b, ([r[0] for r in rows], [r[1] for r in rows] if lp_mode else None,
                                  [r[2] for r in rows])
            finally:
                # A failure (or a caller that stops reading) cancels what has not started;
                # requests in flight finish, and finished batches are already with the caller.
                for f in futures:
                    f.cancel()

    def _complete(self, messages, seed, *, n, temperature, top_p, top_k, max_new_tokens, greedy, lp_mode):
        want = 1 if greedy else n
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens,
                                "n": want, "seed": seed}
        if greedy:
            body["temperature"] = 0.0
        else:
            body.update(temperature=temperature, top_p=top_p)
            if top_k and top_k > 0:
                body["top_k"] = top_k
        if lp_mode:
            body["logprobs"] = True
        data = self._post(body)
        try:
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            if len(choices) != want:
                raise ValueError(f"asked for {want} choice(s), got {len(choices)}")
            texts, lps, cut = [], [], []
            for c in choices:
                texts.append((c["message"].get("content") or "").strip())
                cut.append(c.get("finish_reason") == "length")
                if lp_mode:
                    content = (c.get("logprobs") or {}).get("content")
                    if content is None:
                        raise ValueError("no per-token log-probs in a choice although logprobs=true was sent; "
                                         "the server must support logprobs (vllm serve and alignkit serve do)")
                    lps.append(_score([float(t["logprob"]) for t in content], lp_mode))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise GenerationBackendError(f"{self._where()}: unexpected response ({e}): "
                                         f"{json.dumps(data)[:300]}") from None
        rep = n if greedy else 1
        return texts * rep, (lps * rep if lp_mode else None), cut * rep

    def _where(self) -> str:
        return f"generation backend openai (POST {self.url}, model {self.model!r})"

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        raw = self._client.post(payload, self._count)
        try:
            data = json.loads(raw)
        except ValueError:
            raise GenerationBackendError(f"{self._where()}: response is not JSON: {raw[:200]!r}") from None
        self._count("completions")
        return data


# ---------------------------------------------------------------- offline vLLM


class VLLMBackend(GenerationBackend):
    """Offline generation with ``vllm.LLM`` (CUDA GPUs; ``pip install vllm``).

    Prompts are rendered and tokenised with the run's own tokenizer (the same token ids
    as the local path, no second BOS) and passed as token prompts; each prompt gets its
    own ``SamplingParams`` seed. Texts are decoded with the same tokenizer, cut at the
    first end token and stripped. Log-probs are vLLM's per-token log-probs of the sampled
    tokens (raw model log-probs: vLLM's default ``logprobs_mode`` since 0.10).
    """

    name = "vllm"

    def __init__(self, model_path: str, tokenizer: Any, *, revision: str | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False, llm_kwargs: dict[str, Any] | None = None,
                 fingerprint: str | None = None, cache_dir: str | os.PathLike | None = None) -> None:
        try:
            import vllm
        except ImportError as e:
            raise GenerationBackendError(
                f"generation.backend 'vllm' needs the vllm package, which is not installed ({e}); install it on a "
                "CUDA machine (pip install vllm), or use generation.backend: openai with a `vllm serve` endpoint"
            ) from None
        self.tokenizer = tokenizer
        self._params = vllm.SamplingParams
        self.llm = vllm.LLM(model=model_path, tokenizer=model_path, revision=revision, dtype=dtype,
                            trust_remote_code=trust_remote_code, **(llm_kwargs or {}))
        self.eos_ids = _eos_ids_of(model_path, tokenizer, revision)
        if fingerprint is None:  # the weights' content (or hub id + revision), not merely their path
            from alignkit.core.fingerprint import source_fingerprint

            fingerprint = source_fingerprint(model_path, revision)
        self.fingerprint = "vllm:" + json.dumps({"model": fingerprint, "dtype": dtype,
                                                 "llm": llm_kwargs or {}}, sort_keys=True, default=str)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def prompt_keys(self, prompts: Sequence[Any]) -> list[Any]:
        from alignkit.generation.sampling import render_prompts

        return render_prompts(self.tokenizer, prompts)

    def generate_batches(self, jobs, *, n, temperature, top_p, top_k, max_new_tokens, greedy, lp_mode,
                         logprob_source):
        group: list = []
        for job in jobs:
            group.append(job)
            if sum(len(j[1]) for j in group) >= _VLLM_CHUNK_PROMPTS or job is jobs[-1]:
                yield from self._run(group, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                     max_new_tokens=max_new_tokens, greedy=greedy, lp_mode=lp_mode)
                group = []

    def _run(self, group, *, n, temperature, top_p, top_k, max_new_tokens, greedy, lp_mode):
        requests, params = [], []
        for _, prompts, bseed in group:
            rendered = self.prompt_keys(prompts)
            ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
            for i, row in enumerate(ids):
                requests.append({"prompt_token_ids": row})
                params.append(self._params(
                    n=1 if greedy else n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                    top_k=top_k if (top_k and not greedy) else -1, max_tokens=max_new_tokens,
                    seed=prompt_seed(bseed, i), stop_token_ids=self.eos_ids, logprobs=0 if lp_mode else None))
        outs = self.llm.generate(requests, params, use_tqdm=False)
        k = 0
        for b, prompts, _ in group:
            texts, lps, cut = [], [], []
            for out in outs[k : k + len(prompts)]:
                t, lp, c = self._choices(out, n, greedy, lp_mode)
                texts.append(t)
                lps.append(lp)
                cut.append(c)
            k += len(prompts)
            yield b, (texts, lps if lp_mode else None, cut)

    def _choices(self, out, n, greedy, lp_mode):
        texts, lps, cut = [], [], []
        for o in sorted(out.outputs, key=lambda o: o.index):
            ids = list(o.token_ids)
            end = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
            texts.append(self.tokenizer.decode(ids if end is None else ids[:end], skip_special_tokens=True).strip())
            cut.append(o.finish_reason == "length")
            if lp_mode:
                lps.append(_score([float(step[t].logprob) for t, step in zip(ids, o.logprobs or [])], lp_mode))
        rep = n if greedy else 1
        return texts * rep, lps * rep, cut * rep


def _eos_ids_of(model_path: str, tokenizer: Any, revision: str | None = None) -> list[int]:
    """End tokens as the local path has them: the model's generation config, then the tokenizer's."""
    from transformers import AutoConfig, GenerationConfig

    ids: list[int] = []
    try:
        gen = GenerationConfig.from_pretrained(model_path, revision=revision).eos_token_id
    except (OSError, ValueError):
        # No generation_config.json: a loaded model derives its generation config from config.json.
        try:
            gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_path, revision=revision))
            gen = gen.eos_token_id
        except (OSError, ValueError):
            gen = None
    for src in (gen, tokenizer.eos_token_id):
        for i in src if isinstance(src, (list, tuple)) else ([] if src is None else [src]):
            if int(i) not in ids:
                ids.append(int(i))
    return ids


# ---------------------------------------------------------------- the one place stages choose


def sampler_fingerprint(cfg: Any) -> str:
    """The sampler's identity for prepare-stage cache keys. For ``hf`` exactly the model
    fingerprint the stages always used (their caches stay valid); for the others the
    engine's identity (see the module docstring for what an endpoint's identity can be)."""
    from alignkit.core.fingerprint import source_fingerprint
    from alignkit.models import resolve_path

    g, m = cfg.generation, cfg.model
    if g.backend == "openai":
        from alignkit.core.http import chat_completions_url

        return "openai:" + json.dumps({"url": chat_completions_url(g.base_url), "model": g.model,
                                       "fingerprint": g.fingerprint}, sort_keys=True)
    local = source_fingerprint(resolve_path(m.name_or_path), m.revision)
    if g.backend == "vllm":
        return "vllm:" + hashlib.sha256(json.dumps([local, m.dtype, g.vllm], sort_keys=True,
                                                   default=str).encode()).hexdigest()[:16]
    return local


def load_sampler(cfg: Any, stage_dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """``(model or backend, tokenizer)`` to pass to :func:`alignkit.generation.sampling.generate`, as
    ``cfg.generation`` says. ``hf``: the policy loaded here (``models.load_for_sampling``).
    ``openai``: an :class:`OpenAIBackend` and no tokenizer (the server renders the chat
    template). ``vllm``: a :class:`VLLMBackend` and the run's tokenizer. Remote and vLLM
    backends cache per batch under ``<stage_dir or $ALIGNKIT_CACHE/stages>/generation``."""
    from alignkit.core.cache import default_stage_dir
    from alignkit.models import load_for_sampling, load_tokenizer, resolve_path

    g, m = cfg.generation, cfg.model
    if g.backend == "hf":
        return load_for_sampling(m)
    cache = Path(stage_dir or default_stage_dir()) / "generation"
    if g.backend == "openai":
        if not g.fingerprint:
            log.warning("generation.fingerprint is not set: samples from %s are cached under the served model "
                        "name %r and the URL alone; set it to the served weights' revision so other weights behind "
                        "the same name are never mistaken for these", g.base_url, g.model)
        return OpenAIBackend(g.base_url, g.model, api_key_env=g.api_key_env, max_concurrency=g.max_concurrency,
                             timeout_s=g.timeout_s, max_retries=g.max_retries, fingerprint=g.fingerprint,
                             cache_dir=cache), None
    tok = load_tokenizer(m)
    return VLLMBackend(resolve_path(m.name_or_path), tok, revision=m.revision, dtype=m.dtype,
                       trust_remote_code=m.trust_remote_code, llm_kwargs=g.vllm, fingerprint=sampler_fingerprint(cfg),
                       cache_dir=cache), tok
