"""A small OpenAI-compatible server for a local HF model (standard library only).

``alignkit serve MODEL_DIR`` exposes ``/v1/chat/completions`` and ``/v1/models`` so that
the HTTP judge, or any OpenAI client, can talk to a local checkpoint. Generation goes
through :func:`alignkit.sampling.generate` (same chat-template rendering and decoding as
training-time sampling) and is serialised by a lock: one model, one generate at a time;
requests queue in their handler threads. Binds loopback by default — there is no
authentication unless ``api_key`` is set, so exposing it is an explicit choice.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_MAX_BODY = 8 << 20


class _BadRequest(ValueError):
    pass


class ChatServer(ThreadingHTTPServer):
    """The HTTP server plus the model it serves. ``stats`` counts ``requests`` (all),
    ``chat_completions`` (successful generations) and ``max_in_flight`` (peak number of
    requests being handled at once)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        model: Any,
        tokenizer: Any,
        model_name: str,
        api_key: str | None = None,
        max_new_tokens_cap: int = 1024,
    ) -> None:
        super().__init__(address, _Handler)
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.max_new_tokens_cap = max_new_tokens_cap
        self.generate_lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._in_flight = 0

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def _enter(self) -> None:
        with self._stats_lock:
            self.stats["requests"] += 1
            self._in_flight += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self._in_flight)

    def _leave(self) -> None:
        with self._stats_lock:
            self._in_flight -= 1

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        from alignkit.sampling import generate

        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise _BadRequest("'messages' must be a non-empty list of {role: str, content: str}")
        try:
            temperature = float(body.get("temperature", 1.0))
            top_p = float(body.get("top_p", 1.0))
            n = int(body.get("n", 1))
            max_tokens = int(body.get("max_tokens", body.get("max_completion_tokens", 256)))
            seed = int(body.get("seed", 0))
        except (TypeError, ValueError) as e:
            raise _BadRequest(f"bad sampling parameter: {e}") from None
        if n < 1 or max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise _BadRequest("need n >= 1, max_tokens >= 1, temperature >= 0, 0 < top_p <= 1")
        max_tokens = min(max_tokens, self.max_new_tokens_cap)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        with self.generate_lock:
            texts = generate(
                self.model,
                self.tokenizer,
                [messages],
                n=n,
                greedy=temperature == 0,
                temperature=temperature or 1.0,
                top_p=top_p,
                max_new_tokens=max_tokens,
                seed=seed,
                batch_size=1,
                progress=False,
            )[0]
        choices = []
        for i, text in enumerate(texts):
            cut = min((text.find(s) for s in stop if s and s in text), default=-1)
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text if cut < 0 else text[:cut]},
                    "finish_reason": "stop",
                }
            )
        with self._stats_lock:
            self.stats["chat_completions"] += 1
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
        }


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, obj: dict[str, Any]) -> None:
        if status >= 400:
            self.close_connection = True  # an unread body must not leak into a next request
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _respond(self, route: Any) -> None:
        # In-flight ends before the reply is written, so a client that sends its next
        # request as soon as it reads this one is never counted twice.
        self.server._enter()
        try:
            status, obj = route()
        finally:
            self.server._leave()
        self._send(status, obj)

    def _unauthorised(self) -> tuple[int, dict[str, Any]] | None:
        if (
            not self.server.api_key
            or self.headers.get("Authorization", "") == f"Bearer {self.server.api_key}"
        ):
            return None
        return _err(401, "invalid or missing API key", "authentication_error")

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._respond(self._get)

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self._respond(self._post)

    def _get(self) -> tuple[int, dict[str, Any]]:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            return 200, {"status": "ok"}
        denied = self._unauthorised()
        if denied:
            return denied
        if path == "/v1/models":
            return 200, {
                "object": "list",
                "data": [{"id": self.server.model_name, "object": "model", "owned_by": "alignkit"}],
            }
        return _err(404, f"no route for GET {path}", "not_found")

    def _post(self) -> tuple[int, dict[str, Any]]:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            return _err(404, f"no route for POST {path}", "not_found")
        denied = self._unauthorised()
        if denied:
            return denied
        try:
            length = int(self.headers.get("Content-Length", 0))
            if not 0 < length <= _MAX_BODY:
                raise _BadRequest(f"Content-Length must be in 1..{_MAX_BODY}")
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise _BadRequest("request body must be a JSON object")
        except ValueError as e:  # _BadRequest and JSONDecodeError are ValueErrors
            return _err(400, str(e), "invalid_request_error")
        try:
            return 200, self.server.chat(body)
        except _BadRequest as e:
            return _err(400, str(e), "invalid_request_error")
        except Exception as e:  # a generation failure is the server's fault: 500, keep serving
            log.exception("generation failed")
            return _err(500, f"{type(e).__name__}: {e}", "server_error")


def _err(status: int, message: str, kind: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"message": message, "type": kind}}


def serve(
    model_dir: str | os.PathLike | None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_name: str | None = None,
    api_key: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    max_new_tokens_cap: int = 1024,
) -> tuple[ChatServer, threading.Thread]:
    """Start serving in a daemon thread; returns ``(server, thread)``.

    ``port=0`` picks a free port (read it from ``server.server_address`` or
    ``server.base_url``). Pass ``model``/``tokenizer`` to serve already-loaded objects.
    Stop with ``server.shutdown(); server.server_close()``.
    """
    if model is None:
        if model_dir is None:
            raise ValueError("serve: pass model_dir or model=")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        if device is not None:
            model = model.to(device)
    if tokenizer is None:
        if model_dir is None:
            raise ValueError("serve: pass tokenizer= with model=")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if host not in _LOOPBACK:
        log.warning(
            "serving on %s: reachable from other machines%s",
            host,
            "" if api_key else " and without an API key",
        )
    name = model_name or (Path(model_dir).name if model_dir is not None else "local-model")
    server = ChatServer(
        (host, port), model, tokenizer, name, api_key=api_key, max_new_tokens_cap=max_new_tokens_cap
    )
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name=f"alignkit-serve-{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return server, thread


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``alignkit serve``."""
    ap = argparse.ArgumentParser(prog="alignkit serve", description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", help="a save_pretrained model directory")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name", default=None, help="the model id clients send (default: directory name)")
    ap.add_argument(
        "--api-key-env",
        default=None,
        help="require 'Authorization: Bearer $VAR' using the key in this environment variable",
    )
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-new-tokens-cap", type=int, default=1024)
    args = ap.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            ap.error(f"--api-key-env {args.api_key_env}: the variable is not set")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    server, thread = serve(
        args.model_dir,
        args.host,
        args.port,
        model_name=args.model_name,
        api_key=api_key,
        dtype=args.dtype,
        device=args.device,
        max_new_tokens_cap=args.max_new_tokens_cap,
    )
    print(f"serving {server.model_name} on {server.base_url} (Ctrl-C to stop)", flush=True)
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
