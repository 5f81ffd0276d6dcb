"""Judge backed by an OpenAI-compatible ``/v1/chat/completions`` endpoint.

Requests go through :class:`alignkit.core.http.JSONClient` (httpx2) from a bounded thread
pool. The API key is read from an environment variable at request time and never logged or
put in an error message; it never follows a redirect, and goes over plain ``http://`` only to
loopback. Transient failures (5xx, 429, timeouts, connection errors) are retried with
exponential backoff; other 4xx fail at once. Every successful reply is cached as one JSON
file per request (atomic write), so a run that dies half-way keeps everything it already
paid for.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from alignkit.core.http import JSONClient, chat_completions_url
from alignkit.judges.prompts import PromptJudge


class HTTPJudgeError(RuntimeError):
    """A request to the judge endpoint failed for good (after retries, or a non-retryable 4xx)."""


class HTTPJudge(PromptJudge):
    """LLM judge over HTTP. ``concurrency`` caps in-flight requests; ``cache_dir``
    (optional) holds one ``<sha256>.json`` per (model, messages, params).

    ``stats`` counts ``requests`` (HTTP attempts sent), ``retries``, ``cache_hits``
    and ``completions`` (fresh replies).
    """

    name = "http"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 30,
        max_retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 4,
        cache_dir: str | os.PathLike | None = None,
        prompt_templates: Mapping[str, str] | None = None,
        *,
        temperature: float = 0.0,
        max_tokens: int = 64,
        extra_params: Mapping[str, Any] | None = None,
        system_prompt: str | None = None,
        parse_fallbacks: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(prompt_templates, system_prompt=system_prompt, parse_fallbacks=parse_fallbacks)
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url = chat_completions_url(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.params: dict[str, Any] = {
            "temperature": temperature,
            "max_tokens": max_tokens,
            **(extra_params or {}),
        }
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._client = JSONClient(self.url, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                                  backoff=backoff, where=f"POST {self.url}", error=HTTPJudgeError,
                                  max_connections=concurrency)

    # ------------------------------------------------------------------ public

    def complete(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        return self.chat(conversations)

    def chat(self, conversations: list[list[dict[str, str]]], **params: Any) -> list[str]:
        """Reply to each conversation; cached replies are returned without a request.
        Identical conversations in one call are sent once."""
        p = {**self.params, **params}
        keys = [self.cache_key(c, p) for c in conversations]
        results: dict[str, str] = {}
        todo: dict[str, list[dict[str, str]]] = {}
        for k, conv in zip(keys, conversations):
            if k in results or k in todo:
                continue
            hit = self._cache_get(k)
            if hit is not None:
                results[k] = hit
                self._count("cache_hits")
            else:
                todo[k] = conv
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo))) as pool:
                futures = {pool.submit(self._fetch, conv, p, k): k for k, conv in todo.items()}
                try:
                    for fut in as_completed(futures):
                        results[futures[fut]] = fut.result()
                except BaseException:
                    # Stop what has not started; running requests finish and get cached.
                    for f in futures:
                        f.cancel()
                    raise
        return [results[k] for k in keys]

    def cache_key(self, messages: list[dict[str, str]], params: Mapping[str, Any]) -> str:
        blob = json.dumps(
            {"model": self.model, "messages": messages, "params": dict(params)},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    # ------------------------------------------------------------------ internals

    def _count(self, name: str, k: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += k

    def _cache_get(self, key: str) -> str | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.json"
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)["content"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def _cache_put(
        self, key: str, messages: list[dict[str, str]], params: Mapping[str, Any], content: str
    ) -> None:
        if self.cache_dir is None:
            return
        from alignkit.core.io import atomic_write_text

        record = {"model": self.model, "messages": messages, "params": dict(params), "content": content}
        atomic_write_text(self.cache_dir / f"{key}.json", json.dumps(record, ensure_ascii=False))

    def _fetch(self, messages: list[dict[str, str]], params: Mapping[str, Any], key: str) -> str:
        content = self._post({"model": self.model, "messages": messages, **params})
        self._cache_put(key, messages, params, content)
        self._count("completions")
        return content

    def _post(self, payload: dict[str, Any]) -> str:
        return self._parse(self._client.post(payload, self._count))

    def _parse(self, raw: bytes) -> str:
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise HTTPJudgeError(
                f"POST {self.url}: unexpected response body ({type(e).__name__}): {raw[:200]!r}"
            ) from None
        return content if isinstance(content, str) else ""


