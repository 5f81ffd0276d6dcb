"""Targets of an attack: ``respond(prompts) -> list[Reply]`` (text + prompt / response tokens spent).

* :class:`LocalTarget` — a loaded model (a path, a run's ``model/`` or ``world:tiny``) through
  :func:`alignkit.generation.sampling.generate`: batched, chat-template rendered, greedy or sampled.
* :class:`HTTPTarget` — any OpenAI-compatible ``/v1/chat/completions`` endpoint, through the HTTP judge
  backend's client (:class:`alignkit.judges.http.HTTPJudge`: timeouts, retries with backoff on
  5xx / 429 / connection errors, immediate failure on other 4xx, a bounded thread pool). The API key
  is read from the environment variable named by ``api_key_env`` at request time; it is never stored
  on the target, logged, or written to a record. Tokens come from the reply's ``usage``.
"""

from __future__ import annotations

import json
import threading

from alignkit.attacks import Prompt, Reply
from alignkit.judges.http import HTTPJudge, HTTPJudgeError


class AttackTargetError(RuntimeError):
    """The target could not answer (after retries); names the target, never its key."""


class LocalTarget:
    def __init__(self, model, tokenizer, max_new_tokens: int = 64, temperature: float = 0.0, batch_size: int = 32,
                 seed: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.batch_size, self.seed = max_new_tokens, temperature, batch_size, seed
        self.calls = 0

    def respond(self, prompts: list[Prompt]) -> list[Reply]:
        from alignkit.generation.sampling import generate, render_prompts

        if not prompts:
            return []
        greedy = self.temperature == 0
        outs = generate(self.model, self.tokenizer, list(prompts), n=1, greedy=greedy,
                        temperature=self.temperature or 1.0, max_new_tokens=self.max_new_tokens,
                        batch_size=self.batch_size, seed=self.seed + self.calls, progress=False)
        self.calls += 1
        rendered = render_prompts(self.tokenizer, list(prompts))
        enc = lambda t: len(self.tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
        return [Reply(o[0], enc(p), enc(o[0])) for p, o in zip(rendered, outs)]


class _UsageHTTPJudge(HTTPJudge):
    """HTTPJudge that also keeps each reply's ``usage`` (prompt / completion tokens)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._tls = threading.local()
        self._usage_lock = threading.Lock()
        self.usage: dict[str, dict] = {}

    def _parse(self, raw: bytes) -> str:
        content = super()._parse(raw)
        try:
            self._tls.usage = json.loads(raw).get("usage") or {}
        except (ValueError, AttributeError):
            self._tls.usage = {}
        return content

    def _fetch(self, messages, params, key):
        content = super()._fetch(messages, params, key)
        with self._usage_lock:
            self.usage[key] = getattr(self._tls, "usage", {})
        return content


class HTTPTarget:
    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 3, concurrency: int = 4, max_new_tokens: int = 64, temperature: float = 0.0,
                 system_prompt: str | None = None, backoff: float = 0.5):
        self.name = model
        self.system_prompt = system_prompt
        self.client = _UsageHTTPJudge(base_url, model, api_key_env=api_key_env, timeout=timeout,
                                      max_retries=max_retries, concurrency=concurrency, backoff=backoff,
                                      temperature=temperature, max_tokens=max_new_tokens)

    def respond(self, prompts: list[Prompt]) -> list[Reply]:
        convs = []
        for p in prompts:
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            if self.system_prompt and msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": self.system_prompt}, *msgs]
            convs.append(msgs)
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
