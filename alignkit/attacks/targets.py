"""Targets of an attack: ``respond(prompts) -> list[Reply]`` (text + prompt / response tokens spent).

* :class:`LocalTarget` — a loaded model (a path, a run's ``model/`` or ``world:tiny``) through
  :func:`alignkit.generation.sampling.generate`: batched, chat-template rendered, greedy or sampled.
  Response tokens count the end token that finished a reply (it was generated, and paid for).
* :class:`HTTPTarget` — any OpenAI-compatible ``/v1/chat/completions`` endpoint, through the HTTP judge
  backend's client (:class:`alignkit.judges.http.HTTPJudge`: timeouts, retries with backoff on
  5xx / 429 / connection errors, immediate failure on other 4xx, a bounded thread pool, no redirects,
  no key over plain http except to loopback). The API key is read from the environment variable
  named by ``api_key_env`` at request time; it is never stored on the target, logged, or written to a
  record or the cache. Tokens come from the reply's ``usage``. Replies are cached like the judge's
  (one JSON file per request under ``cache_dir``, default ``$ALIGNKIT_CACHE/attack_replies``, keyed
  by endpoint URL, model, messages and parameters), so a run that dies keeps every reply it paid for.

Both keep the target's configured ``system_prompt`` for every technique: a technique that sends its
own system turn (FlipAttack's guidance) gets it after the target's, in one system message, because
the deployment's system prompt is part of what is attacked.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from alignkit.attacks import Prompt, Reply
from alignkit.judges.http import HTTPJudge, HTTPJudgeError


class AttackTargetError(RuntimeError):
    """The target could not answer (after retries); names the target, never its key."""


def with_system_prompt(prompt: Prompt, system_prompt: str | None) -> list[dict[str, str]]:
    """The chat messages of ``prompt`` with the target's ``system_prompt`` first. A prompt that
    has its own system turn keeps it, after the target's (one system message: many chat
    templates accept only one, at the start)."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if not system_prompt:
        return msgs
    if msgs and msgs[0].get("role") == "system":
        own = msgs[0].get("content") or ""
        if own != system_prompt and not own.startswith(system_prompt + "\n\n"):
            msgs[0]["content"] = f"{system_prompt}\n\n{own}" if own else system_prompt
        return msgs
    return [{"role": "system", "content": system_prompt}, *msgs]


class LocalTarget:
    def __init__(self, model, tokenizer, max_new_tokens: int = 64, temperature: float = 0.0, batch_size: int = 32,
                 seed: int = 0, system_prompt: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.batch_size, self.seed = max_new_tokens, temperature, batch_size, seed
        self.system_prompt = system_prompt
        self.calls = 0

    def respond(self, prompts: list[Prompt]) -> list[Reply]:
        from alignkit.generation.sampling import generate, render_prompts

        if not prompts:
            return []
        convs = [with_system_prompt(p, self.system_prompt) for p in prompts]
        greedy = self.temperature == 0
        outs, truncated = generate(self.model, self.tokenizer, convs, n=1, greedy=greedy,
                                   temperature=self.temperature or 1.0, max_new_tokens=self.max_new_tokens,
                                   batch_size=self.batch_size, seed=self.seed + self.calls, progress=False,
                                   return_truncated=True)
        self.calls += 1
        rendered = render_prompts(self.tokenizer, convs)
        enc = lambda t: len(self.tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
        # A reply that stopped before max_new_tokens ended with an end token, which the decoded text
        # no longer shows but the model generated (as the usage of an HTTP endpoint counts it).
        return [Reply(o[0], enc(p), enc(o[0]) + (0 if cut[0] else 1)) for p, o, cut in zip(rendered, outs, truncated)]


class _UsageHTTPJudge(HTTPJudge):
    """HTTPJudge that also keeps each reply's ``usage`` (prompt / completion tokens), in memory and in
    its cache records, and keys its cache by the endpoint URL too (two servers may serve one name)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._tls = threading.local()
        self._usage_lock = threading.Lock()
        self.usage: dict[str, dict] = {}

    def cache_key(self, messages, params) -> str:
        return super().cache_key([{"role": "_endpoint", "content": self.url}, *messages], params)

    def _parse(self, raw: bytes) -> str:
        content = super()._parse(raw)
        try:
            self._tls.usage = json.loads(raw).get("usage") or {}
        except (ValueError, AttributeError):
            self._tls.usage = {}
        return content

    def _fetch(self, messages, params, key):
        content = self._post({"model": self.model, "messages": messages, **params})
        usage = getattr(self._tls, "usage", {})
        with self._usage_lock:
            self.usage[key] = usage
        self._cache_put(key, messages, params, content, usage)
        self._count("completions")
        return content

    def _cache_put(self, key, messages, params, content, usage=None) -> None:
        if self.cache_dir is None:
            return
        from alignkit.core.io import atomic_write_text

        record = {"url": self.url, "model": self.model, "messages": messages, "params": dict(params),
                  "content": content, "usage": usage or {}}
        atomic_write_text(self.cache_dir / f"{key}.json", json.dumps(record, ensure_ascii=False))

    def _cache_get(self, key):
        if self.cache_dir is None:
            return None
        try:
            with open(self.cache_dir / f"{key}.json", encoding="utf-8") as f:
                record = json.load(f)
            content = record["content"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None
        with self._usage_lock:
            self.usage[key] = record.get("usage") or {}
        return content


def default_reply_cache() -> Path:
    from alignkit.core.cache import cache_root

    return cache_root() / "attack_replies"


class HTTPTarget:
    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 3, concurrency: int = 4, max_new_tokens: int = 64, temperature: float = 0.0,
                 system_prompt: str | None = None, backoff: float = 0.5,
                 cache_dir: str | os.PathLike | None | bool = None):
        """``cache_dir``: where replies are cached; None = :func:`default_reply_cache`, False = no cache."""
        self.name = model
        self.system_prompt = system_prompt
        if cache_dir is None:
            cache_dir = default_reply_cache()
        self.client = _UsageHTTPJudge(base_url, model, api_key_env=api_key_env, timeout=timeout,
                                      max_retries=max_retries, concurrency=concurrency, backoff=backoff,
                                      temperature=temperature, max_tokens=max_new_tokens,
                                      cache_dir=cache_dir or None)

    def respond(self, prompts: list[Prompt]) -> list[Reply]:
        convs = [with_system_prompt(p, self.system_prompt) for p in prompts]
        try:
            texts = self.client.chat(convs)
        except HTTPJudgeError as e:
            raise AttackTargetError(f"target {self.name!r}: {e}") from None
        p = {**self.client.params}
        out = []
        for conv, t in zip(convs, texts):
            u = self.client.usage.get(self.client.cache_key(conv, p), {})
            out.append(Reply(t, u.get("prompt_tokens"), u.get("completion_tokens")))
        return out

    @property
    def stats(self) -> dict:
        return dict(self.client.stats)
