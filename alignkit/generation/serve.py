"""A small OpenAI-compatible server for a local HF model (standard library only).

``alignkit serve MODEL_DIR`` exposes ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models`` so that the HTTP judge, the ``openai`` generation backend, or any OpenAI
client (the official ``openai`` Python package included) can talk to a local checkpoint.
Generation goes through :func:`alignkit.generation.sampling.sample_tokens` (the decoding loop of
training-time sampling) and is serialised by a lock: one model, one generate at a time;
requests queue in their handler threads. Binds loopback by default — there is no
authentication unless ``api_key`` is set, so exposing it is an explicit choice.

What a client gets, and what it does not:

* ``stream: true`` streams server-sent events while the model decodes
  (``chat.completion.chunk`` / ``text_completion`` chunks, a last chunk per choice with its
  ``finish_reason``, ``data: [DONE]``); ``stream_options.include_usage`` adds a usage chunk.
* ``logprobs`` (chat: ``true`` plus ``top_logprobs`` 0..20; completions: an int 0..20) gives
  each generated token's log-prob under the model's own distribution (temperature 1, no
  top-k/top-p truncation), the end token included when one was generated.
* ``usage`` counts prompt tokens as the model saw them (after the chat template) and every
  generated token of every choice, the end token included.
* ``finish_reason`` is ``length`` when ``max_tokens`` was reached, else ``stop`` (end token
  or a ``stop`` string; the stop string itself is not returned).
* ``seed``: with one, sampling is reproducible (a chat request with seed s samples the same
  tokens as ``alignkit.generation.sampling.generate([...], seed=s, batch_size=1)``); without one each
  request draws a fresh random seed. ``temperature: 0`` decodes greedily.
* Text is the exact decode of the generated tokens (special tokens skipped); clients that
  want it trimmed trim it (the ``openai`` generation backend does, like ``generate``).
* ``/v1/completions`` takes a raw prompt (a string or a list of strings; no chat template);
  ``echo``, ``suffix`` and ``best_of`` > 1 are rejected with a 400, as is any parameter this
  server does not implement (tools, response_format, penalties other than 0, ...).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_MAX_BODY = 8 << 20
_MAX_N = 128
_MAX_TOP_LOGPROBS = 20
_DEFAULT_MAX_TOKENS = {"chat": 256, "completions": 16}  # OpenAI's default for completions is 16

_COMMON = {"model", "n", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "stream", "stream_options",
           "logprobs", "user", "presence_penalty", "frequency_penalty"}
_ALLOWED = {"chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
            "completions": _COMMON | {"prompt", "echo", "suffix", "best_of"}}


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def _bad(message: str, param: str | None = None) -> _HTTPError:
    return _HTTPError(400, message, param=param)


def _number(body: dict, key: str, default: Any, kind: type, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise _bad(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", key)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise _bad(f"'{key}' must be in {rng}, got {v!r}", key)
    return kind(v)


@dataclass
class _Request:
    kind: str  # "chat" | "completions"
    prompts: list[list[int]]
    n: int
    greedy: bool
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    max_tokens_set: bool  # the client chose max_tokens (else the default, which shrinks to fit the context)
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int


class _Choice:
    """One output row as a client sees it: the text sent so far, and whether a stop string ended it."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tok = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = ""
        self.stopped = False
        self.offset = 0  # completions' text_offset of the next token

    def text(self, ids: list[int], final: bool) -> str:
        t = self.tok.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (t.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return t[:cut]
        if final:
            return t
        # Hold back an unfinished UTF-8 character and anything that may begin a stop string.
        t = t.rstrip("\ufffd")
        return t[: len(t) - self.hold] if self.hold else t

    def delta(self, ids: list[int], final: bool) -> str:
        t = self.text(ids, final)
        if not t.startswith(self.sent):
            # A longer decode changed earlier characters (rare tokenizer clean-up): the rest waits.
            if final:
                log.warning("streamed text diverged from the final decode; the stream keeps what it sent")
            return ""
        d, self.sent = t[len(self.sent):], t
        return d


class ChatServer(ThreadingHTTPServer):
    """The HTTP server plus the model it serves. ``stats`` counts ``requests`` (all),
    ``chat_completions`` and ``completions`` (successful generations) and ``max_in_flight``
    (peak number of requests being handled at once)."""

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
        self.context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.created = int(time.time())

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

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1

    # ------------------------------------------------------------------ requests

    def parse(self, body: dict[str, Any], kind: str) -> _Request:
        unknown = sorted(set(body) - _ALLOWED[kind])
        if unknown:
            raise _bad(f"unsupported parameter(s) {unknown}: this server implements "
                       f"{sorted(_ALLOWED[kind])}", unknown[0])
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise _HTTPError(404, f"The model `{model}` does not exist (this server serves `{self.model_name}`).",
                             "NotFoundError", "model")
        for key in ("presence_penalty", "frequency_penalty"):
            if body.get(key) not in (None, 0, 0.0):
                raise _bad(f"'{key}' is not supported (only 0)", key)
        n = _number(body, "n", 1, int, 1, _MAX_N)
        temperature = _number(body, "temperature", 1.0, float, 0, 2)
        top_p = _number(body, "top_p", 1.0, float, 0, 1, lo_open=True)
        top_k = max(_number(body, "top_k", 0, int, -1), 0)  # vLLM's extension; <= 0 disables it
        mt_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, mt_key, min(_DEFAULT_MAX_TOKENS[kind], self.max_new_tokens_cap), int, 1)
        if max_tokens > self.max_new_tokens_cap:
            raise _bad(f"'{mt_key}' {max_tokens} exceeds this server's cap of {self.max_new_tokens_cap} "
                       "(alignkit serve --max-new-tokens-cap)", mt_key)
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbits(63)  # a fresh seed per request: seedless requests must not repeat
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise _bad(f"'seed' must be an integer, got {seed!r}", "seed")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise _bad("'stop' must be a non-empty string or a list of them", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("'stream' must be true or false", "stream")
        opts = body.get("stream_options")
        if opts is not None and (not stream or not isinstance(opts, dict) or set(opts) - {"include_usage"}):
            raise _bad("'stream_options' is only allowed with stream: true, and takes only include_usage",
                       "stream_options")
        logprobs, top = self._logprobs(body, kind)
        return _Request(kind, self._prompts(body, kind), n, temperature == 0, temperature or 1.0, top_p, top_k,
                        max_tokens, body.get(mt_key) is not None, seed, stop, stream,
                        bool((opts or {}).get("include_usage")), logprobs, top)

    def _logprobs(self, body: dict[str, Any], kind: str) -> tuple[bool, int]:
        if kind == "completions":
            k = _number(body, "logprobs", None, int, 0, _MAX_TOP_LOGPROBS)
            return k is not None, k or 0
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise _bad("'logprobs' must be true or false", "logprobs")
        top = _number(body, "top_logprobs", 0, int, 0, _MAX_TOP_LOGPROBS)
        if top and not lp:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return bool(lp), top

    def _prompts(self, body: dict[str, Any], kind: str) -> list[list[int]]:
        tok = self.tokenizer
        if kind == "chat":
            msgs = [_message(m, i) for i, m in enumerate(body.get("messages") or [])] \
                if isinstance(body.get("messages"), list) else None
            if not msgs:
                raise _bad("'messages' must be a non-empty list of {role: str, content: str}", "messages")
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            prompts = [tok(text, add_special_tokens=False)["input_ids"]]  # the template has its specials
        else:
            if body.get("echo"):
                raise _bad("'echo' is not supported", "echo")
            if body.get("suffix") is not None:
                raise _bad("'suffix' is not supported", "suffix")
            if body.get("best_of") not in (None, 1):
                raise _bad("'best_of' > 1 is not supported", "best_of")
            raw = body.get("prompt")
            raw = [raw] if isinstance(raw, str) else raw
            if not isinstance(raw, list) or not raw or not all(isinstance(p, str) for p in raw):
                raise _bad("'prompt' must be a string or a non-empty list of strings (token ids are not supported)",
                           "prompt")
            prompts = [tok(p, add_special_tokens=True)["input_ids"] for p in raw]
        for ids in prompts:
            if not ids:
                raise _bad("the prompt is empty after tokenisation", "prompt")
        return prompts

    def _check_context(self, req: _Request) -> None:
        longest = max(len(p) for p in req.prompts)
        if self.context and not req.max_tokens_set and longest < self.context:
            req.max_tokens = min(req.max_tokens, self.context - longest)
        if self.context and longest + req.max_tokens > self.context:
            raise _bad(f"the prompt ({longest} tokens) plus max_tokens ({req.max_tokens}) exceeds the model's "
                       f"context of {self.context} tokens", "max_tokens")

    # ------------------------------------------------------------------ generation

    def _token_text(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False)

    def _chat_entry(self, t: int, lp: float, tops: list | None) -> dict[str, Any]:
        def entry(i: int, v: float) -> dict[str, Any]:
            s = self._token_text(i)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        return {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in (tops or [])]}

    def _completion_lps(self, choice: _Choice, ids: list[int], lps: list[float], tops: list | None,
                        want_top: bool) -> dict[str, Any]:
        tokens, offsets = [], []
        for t in ids:
            tokens.append(self._token_text(t))
            offsets.append(choice.offset)
            choice.offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": list(lps),
                "top_logprobs": [{self._token_text(i): v for i, v in step} for step in tops] if want_top else None,
                "text_offset": offsets}

    def _generate(self, req: _Request, p: int, emit: Any) -> tuple[list[dict[str, Any]], int]:
        """Prompt ``p`` of the request: one dict per choice (text, tokens, log-probs, finish);
        ``emit(row, delta, step, finish)`` streams as the model decodes. Returns the choices
        and the completion tokens."""
        from alignkit.generation.sampling import sample_tokens

        choices = [_Choice(self.tokenizer, req.stop) for _ in range(req.n)]

        def on_step(rows, watch):
            stopped = []
            for r in rows:
                ids, eos = watch.tokens[r], watch.finish[r] == "eos"
                d = choices[r].delta(ids[:-1] if eos else ids, final=eos)
                if choices[r].stopped:
                    stopped.append(r)
                if emit is not None:
                    step = (ids[-1], watch.logprobs[r][-1] if watch.logprobs is not None else None,
                            watch.tops[r][-1] if watch.tops is not None else None)
                    emit(r, d, step, "stop" if (eos or choices[r].stopped) else None)
            return stopped

        seed = req.seed + p  # several completions prompts: each its own (reproducible) seed
        samples = sample_tokens(self.model, self.tokenizer, req.prompts[p], n=req.n, greedy=req.greedy,
                                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                max_new_tokens=req.max_tokens, seed=seed, logprobs=req.logprobs,
                                top_logprobs=req.top_logprobs,
                                on_step=on_step if (emit is not None or req.stop) else None)
        out, used = [], 0
        for r, s in enumerate(samples):
            c = choices[r]
            visible = s.token_ids[:-1] if s.finish == "eos" else s.token_ids
            text = c.text(visible, final=True)  # cut at a stop string, if one is in it
            finish = "length" if s.finish == "length" and not c.stopped else "stop"
            if emit is not None and s.finish == "length":  # rows that ended otherwise were closed in on_step
                emit(r, c.delta(visible, final=True), None, finish)
            out.append({"text": text, "ids": s.token_ids, "logprobs": s.logprobs, "tops": s.top_logprobs,
                        "finish": finish, "choice": c})
            used += len(s.token_ids)
        return out, used

    def handle(self, body: dict[str, Any], kind: str, sse: _SSE | None) -> dict[str, Any] | None:
        """One request; the response body, or None when it was streamed through ``sse``."""
        # Parsing tokenises: it shares the lock with generation, so one thread uses the tokenizer at a time.
        with self.generate_lock:
            req = self.parse(body, kind)
            self._check_context(req)
            rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            head = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                    "created": int(time.time()), "model": self.model_name}
            if req.include_usage:  # OpenAI: every chunk but the last one carries "usage": null
                head["usage"] = None
            choices, prompt_tokens, completion_tokens = [], 0, 0
            for p in range(len(req.prompts)):
                base = p * req.n
                emit = None
                if req.stream:
                    if kind == "chat":
                        for r in range(req.n):
                            sse.send({**head, "choices": [{"index": base + r, "logprobs": None, "finish_reason": None,
                                                           "delta": {"role": "assistant", "content": ""}}]})
                    emit = self._emitter(req, sse, head, base)
                out, used = self._generate(req, p, emit)
                prompt_tokens += len(req.prompts[p])
                completion_tokens += used
                choices += [self._choice(req, base + r, c) for r, c in enumerate(out)] if not req.stream else []
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        self._count("chat_completions" if kind == "chat" else "completions")
        if req.stream:
            if req.include_usage:
                sse.send({**head, "choices": [], "usage": usage})
            sse.done()
            return None
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": head["created"], "model": self.model_name, "choices": choices, "usage": usage}

    def _choice(self, req: _Request, index: int, c: dict[str, Any]) -> dict[str, Any]:
        if req.kind == "chat":
            lps = None
            if req.logprobs:
                tops = c["tops"] or [None] * len(c["ids"])
                lps = {"content": [self._chat_entry(t, lp, tp) for t, lp, tp in zip(c["ids"], c["logprobs"], tops)],
                       "refusal": None}
            return {"index": index, "message": {"role": "assistant", "content": c["text"]}, "logprobs": lps,
                    "finish_reason": c["finish"]}
        lps = self._completion_lps(c["choice"], c["ids"], c["logprobs"], c["tops"], req.top_logprobs > 0) \
            if req.logprobs else None
        return {"index": index, "text": c["text"], "logprobs": lps, "finish_reason": c["finish"]}

    def _emitter(self, req: _Request, sse: _SSE, head: dict[str, Any], base: int) -> Any:
        choices: dict[int, _Choice] = {}

        def emit(r: int, delta: str, step: tuple | None, finish: str | None) -> None:
            i = base + r
            if step is not None and (delta or req.logprobs):
                t, lp, tops = step
                if req.kind == "chat":
                    lps = {"content": [self._chat_entry(t, lp, tops)], "refusal": None} if req.logprobs else None
                    part = {"index": i, "delta": {"content": delta}, "logprobs": lps, "finish_reason": None}
                else:
                    c = choices.setdefault(r, _Choice(self.tokenizer, []))
                    lps = self._completion_lps(c, [t], [lp], [tops] if tops is not None else None,
                                               req.top_logprobs > 0) if req.logprobs else None
                    part = {"index": i, "text": delta, "logprobs": lps, "finish_reason": None}
                sse.send({**head, "choices": [part]})
            elif delta:  # the held-back tail of a choice that ran out of tokens
                part = {"index": i, "delta": {"content": delta}} if req.kind == "chat" else {"index": i, "text": delta}
                sse.send({**head, "choices": [{**part, "logprobs": None, "finish_reason": None}]})
            if finish is not None:
                part = {"index": i, "delta": {}} if req.kind == "chat" else {"index": i, "text": ""}
                sse.send({**head, "choices": [{**part, "logprobs": None, "finish_reason": finish}]})

        return emit


def _message(m: Any, i: int) -> dict[str, str]:
    """A chat message with string content (OpenAI's list of text parts is joined)."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise _bad(f"messages[{i}] must be an object with a string 'role'", "messages")
    if m["role"] not in ("system", "user", "assistant", "developer"):
        raise _bad(f"messages[{i}].role {m['role']!r} is not supported (system, user, assistant)", "messages")
    extra = sorted(set(m) - {"role", "content", "name"})
    if extra:
        raise _bad(f"messages[{i}]: unsupported field(s) {extra}", "messages")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content must be a string", "messages")
    return {"role": "system" if m["role"] == "developer" else m["role"], "content": content}


class _SSE:
    """Server-sent events over HTTP/1.1 chunked transfer encoding (the connection stays usable)."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self.h = handler
        self.started = False

    def _write(self, data: bytes) -> None:
        if not self.started:
            self.h.send_response(200)
            self.h.send_header("Content-Type", "text/event-stream")
            self.h.send_header("Cache-Control", "no-cache")
            self.h.send_header("Transfer-Encoding", "chunked")
            self.h.end_headers()
            self.started = True
        self.h.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")

    def send(self, obj: dict[str, Any]) -> None:
        self._write(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def done(self) -> None:
        self._write(b"data: [DONE]\n\n")
        self.h.wfile.write(b"0\r\n\r\n")


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        if status >= 400:
            # An unread body must not leak into a next request; saying so keeps clients from reusing the socket.
            self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _respond(self, route: Any) -> None:
        # In-flight ends before the reply is written, so a client that sends its next
        # request as soon as it reads this one is never counted twice.
        self.server._enter()
        try:
            reply = route()
        finally:
            self.server._leave()
        if reply is not None:  # None: streamed already
            self._send(*reply)

    def _unauthorised(self) -> tuple[int, dict[str, Any]] | None:
        got = self.headers.get("Authorization", "").encode()
        if not self.server.api_key or hmac.compare_digest(got, f"Bearer {self.server.api_key}".encode()):
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
                "data": [{"id": self.server.model_name, "object": "model", "created": self.server.created,
                          "owned_by": "alignkit"}],
            }
        return _err(404, f"no route for GET {path}", "not_found")

    def _post(self) -> tuple[int, dict[str, Any]] | None:
        path = self.path.split("?", 1)[0].rstrip("/")
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}.get(path)
        if kind is None:
            return _err(404, f"no route for POST {path}", "not_found")
        denied = self._unauthorised()
        if denied:
            return denied
        try:
            length = int(self.headers.get("Content-Length", 0))
            if not 0 < length <= _MAX_BODY:
                raise ValueError(f"Content-Length must be in 1..{_MAX_BODY}")
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
        except ValueError as e:  # JSONDecodeError is a ValueError
            return _err(400, str(e), "invalid_request_error")
        sse = _SSE(self) if body.get("stream") is True else None
        try:
            out = self.server.handle(body, kind, sse)
            return None if out is None else (200, out)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client closed the connection during a streamed reply")
            self.close_connection = True
            return None
        except _HTTPError as e:
            failure = e.status, e.payload()
        except Exception as e:  # a generation failure is the server's fault: 500, keep serving
            log.exception("generation failed")
            failure = _err(500, f"{type(e).__name__}: {e}", "server_error")
        if sse is not None and sse.started:  # headers are out: the error goes in the stream
            try:
                sse.send(failure[1])
                sse.done()
            except OSError:
                pass
            return None
        return failure


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


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``alignkit serve`` (shared by ``python -m alignkit.generation.serve`` and the CLI)."""
    ap.add_argument("model_dir", metavar="MODEL_DIR", help="a save_pretrained model directory (weights + tokenizer)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="bind address (default 127.0.0.1: this machine only; another address warns, and without "
                         "--api-key-env anyone who reaches it can generate)")
    ap.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    ap.add_argument("--model-name", default=None,
                    help="the model id clients send as 'model' and /v1/models lists (default: the directory name); "
                         "requests naming another model get a 404")
    ap.add_argument("--api-key-env", default=None, metavar="VAR",
                    help="require 'Authorization: Bearer <key>', the key read from environment variable VAR (so it "
                         "is never on the command line or in logs); default: no authentication")
    ap.add_argument("--dtype", default="auto", help="weights dtype: auto (as saved), float32, bfloat16 or float16")
    ap.add_argument("--device", default=None, help="torch device for the model, e.g. cuda:0 (default: CPU)")
    ap.add_argument("--max-new-tokens-cap", type=_positive_int, default=1024, metavar="N",
                    help="the most tokens one request may generate per choice; a larger max_tokens gets a 400 "
                         "(default 1024)")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C with the options of :func:`add_arguments`; 2 when the key variable is unset."""
    import sys

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"alignkit serve: error: --api-key-env {args.api_key_env}: the environment variable is not set",
                  file=sys.stderr)
            return 2
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


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m alignkit.generation.serve`` (``alignkit serve`` shares its options)."""
    ap = argparse.ArgumentParser(prog="alignkit serve", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
