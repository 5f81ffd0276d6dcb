"""HTTP plumbing shared by the HTTP judge, the ``openai`` generation backend and attack
targets: endpoint URLs, a proxy-free opener for loopback, and one retrying JSON POST."""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def chat_completions_url(base_url: str) -> str:
    """Accept ``http://host``, ``http://host/v1`` or the full endpoint URL."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


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
