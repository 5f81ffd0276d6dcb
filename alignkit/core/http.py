"""HTTP plumbing shared by the HTTP judge, the ``openai`` generation backend and attack
targets: endpoint URLs and one retrying JSON client, on ``httpx2`` (the maintained HTTP client
the official ``openai`` package and ``huggingface_hub`` are built on).

What the client guarantees, whoever calls it:

* **The API key never leaves for another address.** Redirects are not followed (a 3xx is an
  error naming where it pointed), so the ``Authorization`` header goes only to the configured
  URL; and a key is sent over plain ``http://`` only to a loopback host (a local
  ``alignkit serve`` or ``vllm serve``) — anywhere else it needs ``https://``.
* **The key is read per request** from the environment variable named by ``api_key_env``,
  and never stored, logged or put in an error.
* **Retries, timeouts, bounded connections.** 5xx, 429, timeouts and connection errors are
  retried with exponential backoff (at least a numeric ``Retry-After``, capped at 60 s);
  other 4xx fail at once. ``timeout`` bounds connecting, each read and each write; the
  connection pool holds at most ``max_connections`` (callers bound in-flight requests with
  their thread pools).
* Loopback endpoints bypass any proxy set in the environment.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx2

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def chat_completions_url(base_url: str) -> str:
    """Accept ``http://host``, ``http://host/v1`` or the full endpoint URL."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def is_loopback(url: str) -> bool:
    """A loopback address or ``localhost``; a name that merely starts with ``127.``
    (``127.example.com``) is a DNS name like any other."""
    host = (urlsplit(url).hostname or "").lower()
    if host in _LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_transport_error(url: str, api_key_env: str | None) -> str | None:
    """Why a key must not be sent to ``url`` (plain http to a non-loopback host), or None."""
    if urlsplit(url).scheme == "http" and not is_loopback(url):
        return (f"refusing to send the API key from ${api_key_env} over plain http:// to {urlsplit(url).hostname}: "
                "use an https:// URL, or set api_key_env to null if the endpoint needs no key")
    return None


class JSONClient:
    """POSTs JSON to one URL (see the module docstring for what it guarantees).

    ``where`` names the endpoint in errors (``"<where> failed ..."``), raised as ``error``;
    ``count`` gets ``"requests"`` per attempt and ``"retries"`` per repeat."""

    def __init__(self, url: str, *, api_key_env: str | None, timeout: float, max_retries: int, backoff: float,
                 where: str, error: type[Exception], max_connections: int = 16) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise error(f"{where}: the URL must start with http:// or https://, got {url!r}")
        self.url, self.api_key_env, self.timeout = url, api_key_env, timeout
        self.max_retries, self.backoff, self.where, self.error = max_retries, backoff, where, error
        if api_key_env and os.environ.get(api_key_env) and key_transport_error(url, api_key_env):
            raise error(f"{where}: {key_transport_error(url, api_key_env)}")  # fail before any request
        self._client = httpx2.Client(
            timeout=timeout, follow_redirects=False, trust_env=not is_loopback(url),
            limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))

    def close(self) -> None:
        self._client.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            problem = key_transport_error(self.url, self.api_key_env)
            if problem:
                raise self.error(f"{self.where}: {problem}")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def post(self, payload: dict[str, Any], count: Callable[[str], None] = lambda name: None) -> bytes:
        """The raw body of the first successful (2xx) reply to ``payload``."""
        body = json.dumps(payload).encode()
        attempts = self.max_retries + 1
        last = "no attempt made"
        for attempt in range(1, attempts + 1):
            headers = self._headers()
            count("requests")
            if attempt > 1:
                count("retries")
            retry_after = 0.0
            try:
                resp = self._client.post(self.url, content=body, headers=headers)
            except httpx2.TimeoutException as e:
                last = f"timeout after {self.timeout}s ({type(e).__name__})"
            except httpx2.TransportError as e:
                last = f"connection error: {type(e).__name__}: {e} (is the server running at this URL?)"
            else:
                code = resp.status_code
                if 200 <= code < 300:
                    return resp.content
                detail = resp.content[:200].decode("utf-8", "replace")
                if 300 <= code < 400:
                    raise self.error(
                        f"{self.where} failed: HTTP {code} redirect to {resp.headers.get('location', '?')!r} (not "
                        "followed, so the API key is never sent to another address): set the base URL to the "
                        "address the server redirects to") from None
                if code != 429 and code < 500:
                    raise self.error(f"{self.where} failed with HTTP {code} (not retried, attempt {attempt}): "
                                     f"{detail}") from None
                last = f"HTTP {code}: {detail}"
                retry_after = _retry_after(resp.headers.get("retry-after"))
            if attempt < attempts:
                time.sleep(max(self.backoff * 2 ** (attempt - 1), retry_after))
        raise self.error(f"{self.where} failed after {attempts} attempts; last error: {last}")


def _retry_after(value: str | None) -> float:
    # Honour a numeric Retry-After on 429/503, capped so a bad header cannot hang a run.
    try:
        return min(max(float(value or 0), 0.0), 60.0)
    except (TypeError, ValueError):
        return 0.0
