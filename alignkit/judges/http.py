"""Judge backed by an OpenAI-compatible ``/v1/chat/completions`` endpoint.

Standard library only (urllib + a thread pool). The API key is read from an
environment variable at request time and never logged or put in an error message.
Transient failures (5xx, 429, timeouts, connection errors) are retried with
exponential backoff; other 4xx fail at once. Every successful reply is cached as one
JSON file per request (atomic write), so a run that dies half-way keeps everything it
already paid for.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from alignkit.judges.prompts import PromptJudge

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class HTTPJudgeError(RuntimeError):
    """A request to the judge endpoint failed for good (after retries, or a non-retryable 4xx)."""


def chat_completions_url(base_url: str) -> str:
    """Accept ``http://host``, ``http://host/v1`` or the full endpoint URL."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


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
        self._opener = opener_for(self.url)

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
        from alignkit.data.io import atomic_write_text

        record = {"model": self.model, "messages": messages, "params": dict(params), "content": content}
        atomic_write_text(self.cache_dir / f"{key}.json", json.dumps(record, ensure_ascii=False))

    def _fetch(self, messages: list[dict[str, str]], params: Mapping[str, Any], key: str) -> str:
        content = self._post({"model": self.model, "messages": messages, **params})
        self._cache_put(key, messages, params, content)
        self._count("completions")
        return content

    def _post(self, payload: dict[str, Any]) -> str:
        raw = post_json(self._opener, self.url, payload, api_key_env=self.api_key_env, timeout=self.timeout,
                        max_retries=self.max_retries, backoff=self.backoff, count=self._count,
                        where=f"POST {self.url}", error=HTTPJudgeError)
        return self._parse(raw)

    def _parse(self, raw: bytes) -> str:
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise HTTPJudgeError(
                f"POST {self.url}: unexpected response body ({type(e).__name__}): {raw[:200]!r}"
            ) from None
        return content if isinstance(content, str) else ""


def opener_for(url: str) -> urllib.request.OpenerDirector:
    """A urllib opener for ``url``; loopback endpoints (a local ``alignkit serve`` or
    ``vllm serve``) bypass any proxy set in the environment."""
    host = urllib.parse.urlsplit(url).hostname or ""
    return urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if host in _LOOPBACK else []))


def post_json(opener: urllib.request.OpenerDirector, url: str, payload: dict[str, Any], *,
              api_key_env: str | None, timeout: float, max_retries: int, backoff: float,
              count: Callable[[str], None], where: str, error: type[Exception]) -> bytes:
    """POST ``payload`` as JSON; the raw body of the first successful reply.

    Shared by the HTTP judge and the ``openai`` generation backend. Transient failures
    (5xx, 429, timeouts, connection errors) are retried ``max_retries`` times with
    exponential backoff (at least a numeric ``Retry-After``); other 4xx raise at once.
    The key is read from ``api_key_env`` per call and never put in a message. ``count``
    gets ``"requests"`` per attempt and ``"retries"`` per repeat; failures raise
    ``error("<where> failed ...")``.
    """
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    key = os.environ.get(api_key_env) if api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    attempts = max_retries + 1
    last = "no attempt made"
    for attempt in range(1, attempts + 1):
        count("requests")
        if attempt > 1:
            count("retries")
        retry_after = 0.0
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with opener.open(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            detail = _snippet(e)
            if e.code != 429 and e.code < 500:
                raise error(f"{where} failed with HTTP {e.code} (not retried, attempt {attempt}): {detail}") from None
            last = f"HTTP {e.code}: {detail}"
            retry_after = _retry_after(e)
        except TimeoutError as e:  # socket.timeout is an alias since 3.10
            last = f"timeout after {timeout}s ({e})"
        except urllib.error.URLError as e:
            last = (f"timeout after {timeout}s" if isinstance(e.reason, TimeoutError)
                    else f"connection error: {e.reason} (is the server running at this URL?)")
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            last = f"connection error: {type(e).__name__}: {e}"
        if attempt < attempts:
            time.sleep(max(backoff * 2 ** (attempt - 1), retry_after))
    raise error(f"{where} failed after {attempts} attempts; last error: {last}")


def _snippet(e: urllib.error.HTTPError) -> str:
    try:
        return e.read()[:200].decode("utf-8", "replace")
    except Exception:  # the body is only decoration for the error message
        return e.reason if isinstance(e.reason, str) else ""


def _retry_after(e: urllib.error.HTTPError) -> float:
    # Honour a numeric Retry-After on 429/503, capped so a bad header cannot hang a run.
    try:
        return min(float((e.headers or {}).get("Retry-After", 0) or 0), 60.0)
    except (TypeError, ValueError):
        return 0.0
