"""A small OpenAI-compatible server for a local HF model (standard library only).

``alignkit serve MODEL_DIR`` exposes ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models`` so that the HTTP judge, the ``openai`` generation backend, or any OpenAI
client (the official ``openai`` Python package included) can talk to a local checkpoint.
Generation goes through :func:`alignkit.generation.sampling.sample_tokens` (the decoding loop of
training-time sampling) in one engine thread: one model, one generate at a time, admitted
requests taken in arrival order. Binds loopback by default — there is no authentication
unless ``api_key`` is set, so exposing it is an explicit choice.

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
  or a ``stop`` string; the stop string itself is not returned). At most 4 stop strings of at
  most 128 characters each, as OpenAI documents.
* ``seed``: with one, sampling is reproducible (a chat request with seed s samples the same
  tokens as ``alignkit.generation.sampling.generate([...], seed=s, batch_size=1)``); without one each
  request draws a fresh random seed. ``temperature: 0`` decodes greedily.
* Text is the exact decode of the generated tokens (special tokens skipped); clients that
  want it trimmed trim it (the ``openai`` generation backend does, like ``generate``).
* ``/v1/completions`` takes a raw prompt (a string or a list of strings; no chat template);
  ``echo``, ``suffix`` and ``best_of`` > 1 are rejected with a 400, as is any parameter this
  server does not implement (tools, response_format, penalties other than 0, ...).

Under load and against clients that misbehave:

* The engine never writes to a socket. A streamed request's chunks go through a bounded
  per-request queue that the request's own connection thread writes out; a client that stops
  reading fills its socket buffers, then that queue (``stream_backlog`` chunks), and is dropped
  (its generation stops, its connection is shut). A reply write that makes no progress for
  ``write_timeout`` seconds drops the client too. Nobody else waits for it.
* At most ``max_concurrent_requests`` generation requests are admitted (queued or
  generating); beyond that a request gets a 429 with ``Retry-After``, which the official
  client's retries honour. At most ``max_connections`` connections are open (one thread
  each); beyond that a new connection gets a 429 and is closed. A connection that sends no
  request for ``keep_alive_timeout`` seconds (new, or between requests) is closed; a request sent slower than
  ``read_timeout`` per read is abandoned.
* ``len(prompts) * n`` is capped per request (``max_choices_per_request``, a 400 beyond it).
* A 500 carries a short message and an error id; the traceback is in the server log under that id.
* Streaming decodes incrementally: each token re-decodes only the last few tokens (the
  prefix/read-offset scheme vLLM and TGI use), and the stream's last chunk reconciles the text
  with one full decode, so a streamed choice joins to exactly its non-streamed text.
"""

from __future__ import annotations

import argparse
import copy
import hmac
import itertools
import json
import logging
import os
import queue
import secrets
import select
import socket
import sys
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
# OpenAI's documented limit ("up to 4 sequences"); a length bound keeps the per-token stop search
# and the streamed hold-back (longest stop string - 1 characters) small.
_MAX_STOP = 4
_MAX_STOP_CHARS = 128
_RETRY_AFTER_S = 1
_WRITE_BATCH = 64  # streamed chunks joined into one socket write when a client lags a little
_DEFAULT_MAX_TOKENS = {"chat": 256, "completions": 16}  # OpenAI's default for completions is 16

# Load limits (constructor, serve() and CLI defaults). 64 admitted requests and 128 connections
# leave room for a 32-client load with keep-alive pools; 5 s keep-alive is uvicorn's default.
DEFAULT_LIMITS: dict[str, Any] = {
    "max_concurrent_requests": 64,
    "max_connections": 128,
    "max_choices_per_request": 128,
    "keep_alive_timeout": 5.0,
    "read_timeout": 30.0,
    "write_timeout": 30.0,
    "stream_backlog": 256,
}

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
    """One output row as a client sees it: its text, decoded incrementally, and where a stop
    string cut it.

    Each token re-decodes only the tokens since the piece before last (``prefix``..end) and
    takes what that adds to the decode of ``prefix``..``read``: the scheme of vLLM's
    ``detokenize_incrementally`` and TGI's ``decode_token``, linear in the length instead of
    re-decoding the whole text per token. A decode ending in U+FFFD is an unfinished UTF-8
    character: nothing is taken until a later token completes it. :meth:`final` decodes the
    whole row once, so the returned text is exactly the decode of the tokens."""

    def __init__(self, decode: Any, stop: list[str]) -> None:
        self.decode = decode
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""  # whole characters decoded so far
        self.sent = 0  # characters of self.text handed out by delta()
        self.cut = -1  # where the first stop string begins, once one is seen
        self.closed: tuple[str, str] | None = None  # final()'s answer, once given

    @property
    def stopped(self) -> bool:
        return self.cut >= 0

    def push(self, token: int) -> None:
        if self.stopped:
            return
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return
        start = len(self.text)
        self.text += now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:  # only where the new piece can complete a stop string
            i = self.text.find(s, max(0, start - len(s) + 1))
            if i >= 0 and (self.cut < 0 or i < self.cut):
                self.cut = i

    def delta(self) -> str:
        """The text that may be sent now: up to a stop string, holding back anything that may begin one."""
        end = self.cut if self.stopped else len(self.text) - self.hold
        if end <= self.sent:
            return ""
        d, self.sent = self.text[self.sent:end], end
        return d

    def final(self, ids: list[int]) -> tuple[str, str]:
        """``(text, rest)``: the row's text (the decode of ``ids``, cut at the first stop string) and
        the part of it a stream has not sent yet (empty once given)."""
        if self.closed is not None:
            return self.closed[0], ""
        t = self.decode(ids)
        cut = min((i for i in (t.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.cut, t = cut, t[:cut]
        sent = self.text[: self.sent]
        if not t.startswith(sent):
            # A longer decode changed earlier characters (rare tokenizer clean-up): the stream keeps what it sent.
            log.warning("streamed text diverged from the final decode; the stream keeps what it sent")
            self.closed = (t, "")
        else:
            self.closed = (t, t[len(sent):])
        return self.closed


_END = object()  # a streamed job's last queue item


class _Job:
    """One admitted generation request, between the engine thread (which generates) and its
    connection thread (which writes the reply). ``events`` is the stream's bounded queue."""

    def __init__(self, req: _Request, rid: str, head: dict[str, Any], conn: socket.socket | None,
                 backlog: int) -> None:
        self.req, self.rid, self.head, self.conn = req, rid, head, conn
        self.events: queue.Queue | None = queue.Queue(backlog) if req.stream else None
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.result: dict[str, Any] | None = None
        self.error: tuple[int, dict[str, Any]] | None = None
        self.overflowed = False  # the stream's queue was full: the engine drops the client when it stops
        self.dropped = False

    def put(self, item: Any) -> None:
        """Queue a stream item without ever blocking the engine: a full queue cancels the job."""
        if self.cancelled.is_set():
            return
        try:
            self.events.put_nowait(item)
        except queue.Full:
            self.overflowed = True
            self.cancelled.set()

    def cancel(self, shut: bool = False) -> None:
        """Stop generating for this job; ``shut`` also shuts the socket, which wakes a connection
        thread blocked writing to it."""
        self.cancelled.set()
        if shut and self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _peer_closed(sock: socket.socket | None) -> bool:
    """Whether the client hung up (EOF or reset) — checked without blocking and without consuming
    a pipelined next request. (A socket with a timeout waits for data before any recv, whatever
    its flags: hence the zero-timeout poll first.)"""
    if sock is None:
        return False
    try:
        if hasattr(select, "poll"):
            p = select.poll()
            p.register(sock, select.POLLIN)
            if not p.poll(0):
                return False
        elif not select.select([sock], [], [], 0)[0]:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):  # reset, or already closed on our side
        return True


def _server_error(eid: str) -> tuple[int, dict[str, Any]]:
    return 500, {"error": {"message": f"internal server error (error id {eid}); the server log has the details",
                           "type": "server_error", "error_id": eid}}


class ChatServer(ThreadingHTTPServer):
    """The HTTP server plus the model it serves. ``stats`` counts ``requests`` (all),
    ``chat_completions`` and ``completions`` (successful generations), ``max_in_flight``
    (peak number of requests being handled at once), ``rejected_busy`` and
    ``rejected_connections`` (429s), ``slow_clients_dropped`` and ``server_errors``.
    ``active_requests`` is the number of admitted generation requests (queued or generating)."""

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
        *,
        max_concurrent_requests: int = DEFAULT_LIMITS["max_concurrent_requests"],
        max_connections: int = DEFAULT_LIMITS["max_connections"],
        max_choices_per_request: int = DEFAULT_LIMITS["max_choices_per_request"],
        keep_alive_timeout: float = DEFAULT_LIMITS["keep_alive_timeout"],
        read_timeout: float = DEFAULT_LIMITS["read_timeout"],
        write_timeout: float = DEFAULT_LIMITS["write_timeout"],
        stream_backlog: int = DEFAULT_LIMITS["stream_backlog"],
    ) -> None:
        limits = {"max_new_tokens_cap": max_new_tokens_cap, "max_concurrent_requests": max_concurrent_requests,
                  "max_connections": max_connections, "max_choices_per_request": max_choices_per_request,
                  "keep_alive_timeout": keep_alive_timeout, "read_timeout": read_timeout,
                  "write_timeout": write_timeout, "stream_backlog": stream_backlog}
        for name, v in limits.items():
            whole = name not in ("keep_alive_timeout", "read_timeout", "write_timeout")
            if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)) or not v > 0:
                raise ValueError(f"ChatServer: {name} must be a positive {'integer' if whole else 'number'}, "
                                 f"got {v!r}")
        # The listen backlog holds connections that arrive in a burst (a client pool opening at
        # once) instead of dropping their SYNs into a 1 s retransmit.
        self.request_queue_size = max(max_connections, 5)
        super().__init__(address, _Handler)
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_concurrent_requests = max_concurrent_requests
        self.max_connections = max_connections
        self.max_choices_per_request = max_choices_per_request
        self.keep_alive_timeout = float(keep_alive_timeout)
        self.read_timeout = float(read_timeout)
        self.write_timeout = float(write_timeout)
        self.stream_backlog = stream_backlog
        self.generate_lock = threading.Lock()  # held by the engine while it generates
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._in_flight = 0
        self._admitted = 0
        # Handler threads tokenise prompts (taking turns: a fast tokenizer whose padding or
        # truncation settings change mid-call raises "Already borrowed"); the engine decodes with
        # its own copy, so a long prompt being tokenised never stalls generation (TGI likewise
        # tokenises in workers of its own, apart from the model's loop).
        self._tok_lock = threading.Lock()
        try:
            self._detok, self._detok_lock = copy.deepcopy(tokenizer), threading.Lock()
        except Exception:  # noqa: BLE001 - a tokenizer that cannot be copied is shared, taking turns
            self._detok, self._detok_lock = tokenizer, self._tok_lock
        self._token_texts: dict[int, str] = {}
        self._connections = threading.BoundedSemaphore(max_connections)
        self._conn_ids = itertools.count(1)
        self.context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.created = int(time.time())
        self._jobs: queue.Queue = queue.Queue()  # bounded by admission
        self._engine_thread = threading.Thread(target=self._engine, name=f"alignkit-serve-engine-{self.port}",
                                               daemon=True)
        self._engine_thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def active_requests(self) -> int:
        with self._stats_lock:
            return self._admitted

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

    def _admit(self) -> bool:
        with self._stats_lock:
            if self._admitted >= self.max_concurrent_requests:
                self.stats["rejected_busy"] += 1
                return False
            self._admitted += 1
            return True

    def _release(self) -> None:
        with self._stats_lock:
            self._admitted -= 1

    def drop(self, job: _Job, why: str) -> None:
        """Drop a client that stopped taking its reply: its generation stops, its socket is shut."""
        with self._stats_lock:
            if job.dropped:
                return
            job.dropped = True
            self.stats["slow_clients_dropped"] += 1
        job.cancel(shut=True)
        log.warning("dropped the client of %s: %s", job.rid, why)

    # ------------------------------------------------------------------ connections

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per connection, at most max_connections of them.
        if not self._connections.acquire(blocking=False):
            self._count("rejected_connections")
            self._reject_connection(request)
            return
        try:
            t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                 name=f"alignkit-serve-conn-{self.port}-{next(self._conn_ids)}", daemon=True)
            t.start()
        except BaseException:
            self._connections.release()
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def _reject_connection(self, sock: socket.socket) -> None:
        data = json.dumps({"error": {"message": f"too many open connections (this server allows "
                                                f"{self.max_connections}; alignkit serve --max-connections)",
                                     "type": "rate_limit_error", "param": None, "code": 429}}).encode()
        head = (f"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
                f"\r\nRetry-After: {_RETRY_AFTER_S}\r\nConnection: close\r\n\r\n").encode()
        try:
            sock.setblocking(False)  # the accept loop never waits on a client: a fresh socket takes this at once
            sock.send(head + data)
        except OSError:
            pass
        self.shutdown_request(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints these to stderr; a client that vanished mid-request is routine.
        e = sys.exc_info()[1]
        if isinstance(e, OSError):
            log.debug("connection from %s ended: %r", client_address, e)
        else:
            log.error("error while handling a connection from %s", client_address, exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self._jobs.put(None)
        self._engine_thread.join(10)

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
        if len(stop) > _MAX_STOP or any(len(s) > _MAX_STOP_CHARS for s in stop):
            raise _bad(f"'stop' takes at most {_MAX_STOP} strings of at most {_MAX_STOP_CHARS} characters each "
                       f"(got {len(stop)}, the longest {max(map(len, stop))} characters)", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("'stream' must be true or false", "stream")
        opts = body.get("stream_options")
        if opts is not None and (not stream or not isinstance(opts, dict) or set(opts) - {"include_usage"}):
            raise _bad("'stream_options' is only allowed with stream: true, and takes only include_usage",
                       "stream_options")
        logprobs, top = self._logprobs(body, kind)
        return _Request(kind, self._prompts(body, kind, n), n, temperature == 0, temperature or 1.0, top_p, top_k,
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

    def _prompts(self, body: dict[str, Any], kind: str, n: int) -> list[list[int]]:
        tok = self.tokenizer
        if kind == "chat":
            msgs = [_message(m, i) for i, m in enumerate(body.get("messages") or [])] \
                if isinstance(body.get("messages"), list) else None
            if not msgs:
                raise _bad("'messages' must be a non-empty list of {role: str, content: str}", "messages")
            self._check_choices(1, n)
            with self._tok_lock:
                try:
                    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                except Exception as e:
                    from jinja2.exceptions import TemplateError  # transformers' template engine

                    if not isinstance(e, TemplateError):
                        raise
                    # The template refused these messages (raise_exception: roles out of order, ...).
                    raise _bad(f"the model's chat template rejected the messages: {e}", "messages") from None
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
            self._check_choices(len(raw), n)
            with self._tok_lock:
                prompts = [tok(p, add_special_tokens=True)["input_ids"] for p in raw]
        for ids in prompts:
            if not ids:
                raise _bad("the prompt is empty after tokenisation", "prompt")
        return prompts

    def _check_choices(self, prompts: int, n: int) -> None:
        # Before any tokenising: the work a request may ask for is bounded before it costs anything.
        if prompts * n > self.max_choices_per_request:
            raise _bad(f"{prompts} prompt(s) x n={n} = {prompts * n} choices exceeds this server's cap of "
                       f"{self.max_choices_per_request} per request (alignkit serve --max-choices-per-request)", "n")

    def _check_context(self, req: _Request) -> None:
        longest = max(len(p) for p in req.prompts)
        if self.context and not req.max_tokens_set and longest < self.context:
            req.max_tokens = min(req.max_tokens, self.context - longest)
        if self.context and longest + req.max_tokens > self.context:
            raise _bad(f"the prompt ({longest} tokens) plus max_tokens ({req.max_tokens}) exceeds the model's "
                       f"context of {self.context} tokens", "max_tokens")

    def submit(self, body: dict[str, Any], kind: str, conn: socket.socket | None) -> _Job:
        """Parse an admitted request and queue it for the engine; the admission slot is given
        back here when parsing fails, else by the engine when the job is over."""
        try:
            req = self.parse(body, kind)
            self._check_context(req)
        except BaseException:
            self._release()
            raise
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        if req.include_usage:  # OpenAI: every chunk but the last one carries "usage": null
            head["usage"] = None
        job = _Job(req, rid, head, conn, self.stream_backlog)
        self._jobs.put(job)
        return job

    # ------------------------------------------------------------------ the engine

    def _engine(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            try:
                if _peer_closed(job.conn):  # gave up while queued (a client timeout): nothing to generate
                    job.cancel()
                else:
                    with self.generate_lock:
                        self._run(job)
            except Exception:  # a generation failure is the server's fault: 500, keep serving
                eid = uuid.uuid4().hex[:12]
                log.exception("request %s failed (error id %s)", job.rid, eid)
                self._count("server_errors")
                job.error = _server_error(eid)
                if job.events is not None:
                    job.put(job.error)
            finally:
                self._release()
                if job.events is not None:
                    job.put(_END)
                job.done.set()
                if job.overflowed:
                    self.drop(job, f"it fell {self.stream_backlog} chunks behind (alignkit serve --stream-backlog) "
                                   "with its socket buffers full: the client stopped reading")
        while True:  # shutting down: whoever still waits gets an answer
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.error = (503, {"error": {"message": "the server is shutting down", "type": "server_error"}})
                if job.events is not None:
                    job.put(job.error)
                    job.put(_END)
                job.done.set()

    def _run(self, job: _Job) -> None:
        req, head = job.req, job.head
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p in range(len(req.prompts)):
            if job.cancelled.is_set():
                return
            base = p * req.n
            emit = None
            if req.stream:
                if req.kind == "chat":
                    for r in range(req.n):
                        job.put({**head, "choices": [{"index": base + r, "logprobs": None, "finish_reason": None,
                                                      "delta": {"role": "assistant", "content": ""}}]})
                emit = self._emitter(job, base)
            out, used = self._generate(job, p, emit)
            prompt_tokens += len(req.prompts[p])
            completion_tokens += used
            choices += [self._choice(req, base + r, c) for r, c in enumerate(out)] if not req.stream else []
        if job.cancelled.is_set():
            return
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        self._count("chat_completions" if req.kind == "chat" else "completions")
        if req.stream:
            if req.include_usage:
                job.put({**head, "choices": [], "usage": usage})
            return
        job.result = {"id": job.rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                      "created": head["created"], "model": self.model_name, "choices": choices, "usage": usage}

    def _decode(self, ids: list[int]) -> str:
        with self._detok_lock:
            return self._detok.decode(ids, skip_special_tokens=True)

    def _token_text(self, t: int) -> str:
        s = self._token_texts.get(t)
        if s is None:  # one decode per vocabulary entry, not one per log-prob entry
            with self._detok_lock:
                s = self._token_texts[t] = self._detok.decode([t], skip_special_tokens=False)
        return s

    def _chat_entry(self, t: int, lp: float, tops: list | None) -> dict[str, Any]:
        def entry(i: int, v: float) -> dict[str, Any]:
            s = self._token_text(i)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        return {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in (tops or [])]}

    def _completion_lps(self, offset: int, ids: list[int], lps: list[float], tops: list | None,
                        want_top: bool) -> tuple[dict[str, Any], int]:
        """Completions' log-prob block for ``ids`` whose text starts at ``offset``; and the next offset."""
        tokens, offsets = [], []
        for t in ids:
            tokens.append(self._token_text(t))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": list(lps),
                "top_logprobs": [{self._token_text(i): v for i, v in step} for step in tops] if want_top else None,
                "text_offset": offsets}, offset

    def _generate(self, job: _Job, p: int, emit: Any) -> tuple[list[dict[str, Any]], int]:
        """Prompt ``p`` of the job: one dict per choice (text, tokens, log-probs, finish);
        ``emit(row, delta, step, finish)`` streams as the model decodes. Returns the choices
        and the completion tokens."""
        from alignkit.generation.sampling import sample_tokens

        req = job.req
        choices = [_Choice(self._decode, req.stop) for _ in range(req.n)]
        follow = emit is not None or bool(req.stop)  # decode as we go only when someone looks at the text
        steps = itertools.count()

        def on_step(rows, watch):
            # A client that went away (dropped, hung up) stops its rows at once; a non-streamed
            # one is checked every 32 tokens (a non-blocking peek at its socket).
            if job.cancelled.is_set() or (emit is None and next(steps) % 32 == 31 and _peer_closed(job.conn)):
                job.cancel()
                return rows
            if not follow:
                return ()
            stopped = []
            for r in rows:
                c, ids, eos = choices[r], watch.tokens[r], watch.finish[r] == "eos"
                if not eos:
                    c.push(ids[-1])
                if eos or c.stopped:
                    d = c.final(ids[:-1] if eos else ids)[1]
                    if c.stopped:
                        stopped.append(r)
                else:
                    d = c.delta()
                if emit is not None:
                    step = (ids[-1], watch.logprobs[r][-1] if watch.logprobs is not None else None,
                            watch.tops[r][-1] if watch.tops is not None else None)
                    emit(r, d, step, "stop" if (eos or c.stopped) else None)
            return stopped

        seed = req.seed + p  # several completions prompts: each its own (reproducible) seed
        samples = sample_tokens(self.model, self.tokenizer, req.prompts[p], n=req.n, greedy=req.greedy,
                                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                max_new_tokens=req.max_tokens, seed=seed, logprobs=req.logprobs,
                                top_logprobs=req.top_logprobs, on_step=on_step)
        out, used = [], 0
        for r, s in enumerate(samples):
            c = choices[r]
            visible = s.token_ids[:-1] if s.finish == "eos" else s.token_ids
            text, rest = c.final(visible)  # cut at a stop string, if one is in it
            finish = "length" if s.finish == "length" and not c.stopped else "stop"
            if emit is not None and s.finish == "length":  # rows that ended otherwise were closed in on_step
                emit(r, rest, None, finish)
            out.append({"text": text, "ids": s.token_ids, "logprobs": s.logprobs, "tops": s.top_logprobs,
                        "finish": finish})
            used += len(s.token_ids)
        return out, used

    def _choice(self, req: _Request, index: int, c: dict[str, Any]) -> dict[str, Any]:
        if req.kind == "chat":
            lps = None
            if req.logprobs:
                tops = c["tops"] or [None] * len(c["ids"])
                lps = {"content": [self._chat_entry(t, lp, tp) for t, lp, tp in zip(c["ids"], c["logprobs"], tops)],
                       "refusal": None}
            return {"index": index, "message": {"role": "assistant", "content": c["text"]}, "logprobs": lps,
                    "finish_reason": c["finish"]}
        lps = self._completion_lps(0, c["ids"], c["logprobs"], c["tops"], req.top_logprobs > 0)[0] \
            if req.logprobs else None
        return {"index": index, "text": c["text"], "logprobs": lps, "finish_reason": c["finish"]}

    def _emitter(self, job: _Job, base: int) -> Any:
        req, head = job.req, job.head
        offsets: dict[int, int] = {}

        def emit(r: int, delta: str, step: tuple | None, finish: str | None) -> None:
            i = base + r
            if step is not None and (delta or req.logprobs):
                t, lp, tops = step
                if req.kind == "chat":
                    lps = {"content": [self._chat_entry(t, lp, tops)], "refusal": None} if req.logprobs else None
                    part = {"index": i, "delta": {"content": delta}, "logprobs": lps, "finish_reason": None}
                else:
                    lps = None
                    if req.logprobs:
                        lps, offsets[r] = self._completion_lps(offsets.get(r, 0), [t], [lp],
                                                               [tops] if tops is not None else None,
                                                               req.top_logprobs > 0)
                    part = {"index": i, "text": delta, "logprobs": lps, "finish_reason": None}
                job.put({**head, "choices": [part]})
            elif delta:  # the held-back tail of a choice that ran out of tokens
                part = {"index": i, "delta": {"content": delta}} if req.kind == "chat" else {"index": i, "text": delta}
                job.put({**head, "choices": [{**part, "logprobs": None, "finish_reason": None}]})
            if finish is not None:
                part = {"index": i, "delta": {}} if req.kind == "chat" else {"index": i, "text": ""}
                job.put({**head, "choices": [{**part, "logprobs": None, "finish_reason": finish}]})

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

    def send(self, *objs: dict[str, Any]) -> None:
        self._write(b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs))

    def done(self) -> None:
        self._write(b"data: [DONE]\n\n")
        self.h.wfile.write(b"0\r\n\r\n")


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"
    # A reply is written as headers, then body (then, streaming, one chunk per event): with Nagle's
    # algorithm the second small write waits for the client's delayed ACK of the first (40-200 ms
    # on Linux) — per request, on an idle server.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)

    # Socket timeouts per phase: waiting for the next request line is the keep-alive idle
    # time; the rest of a request is read under read_timeout; replies are written under
    # write_timeout (set where they are written). The stdlib closes the connection on a read timeout.
    def handle_one_request(self) -> None:
        self.connection.settimeout(self.server.keep_alive_timeout)
        super().handle_one_request()

    def parse_request(self) -> bool:
        self.connection.settimeout(self.server.read_timeout)
        return super().parse_request()

    def _send(self, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.connection.settimeout(self.server.write_timeout)
        try:
            self.send_response(status)
            if status >= 400:
                # An unread body must not leak into a next request; saying so keeps clients from reusing the socket.
                self.send_header("Connection", "close")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(0, len(data), 1 << 18):  # in slices: the timeout bounds a stall, not the whole reply
                self.wfile.write(data[i:i + (1 << 18)])
        except OSError as e:  # TimeoutError included: a client that does not take its reply is dropped
            self.close_connection = True
            if isinstance(e, TimeoutError):
                self.server._count("slow_clients_dropped")
                log.warning("dropped a client that took no reply bytes for %.0f s (alignkit serve --write-timeout)",
                            self.server.write_timeout)
            else:
                log.debug("client went away before its reply was written: %r", e)

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

    def _post(self) -> tuple | None:
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
        if not self.server._admit():
            return 429, {"error": {"message": f"this server is busy ({self.server.max_concurrent_requests} requests "
                                              "in flight; alignkit serve --max-concurrent-requests): retry later",
                                   "type": "rate_limit_error", "param": None, "code": 429}}, \
                {"Retry-After": str(_RETRY_AFTER_S)}
        try:
            job = self.server.submit(body, kind, self.connection)
        except _HTTPError as e:
            return e.status, e.payload()
        except Exception:  # e.g. a tokenizer failure: the server's fault, told without its internals
            eid = uuid.uuid4().hex[:12]
            log.exception("request failed before generation (error id %s)", eid)
            self.server._count("server_errors")
            return _server_error(eid)
        if job.req.stream:
            self._stream(job)
            return None
        job.done.wait()
        if job.error is not None:
            return job.error
        if job.result is None:  # the client went away: nobody to answer
            self.close_connection = True
            return None
        return 200, job.result

    def _stream(self, job: _Job) -> None:
        """Write a streamed job's queued chunks as the engine produces them (this thread only writes)."""
        sse = _SSE(self)
        self.connection.settimeout(self.server.write_timeout)
        try:
            while True:
                try:
                    items = [job.events.get(timeout=0.25)]
                except queue.Empty:
                    if job.cancelled.is_set():
                        break
                    continue
                while len(items) < _WRITE_BATCH:  # a lagging client gets what piled up in one write
                    try:
                        items.append(job.events.get_nowait())
                    except queue.Empty:
                        break
                end = _END in items
                chunks = [x for x in items if x is not _END]
                if chunks and isinstance(chunks[0], tuple) and not sse.started:  # failed before any chunk
                    self._send(*chunks[0])
                    return
                if chunks:
                    sse.send(*(x[1] if isinstance(x, tuple) else x for x in chunks))
                if end:
                    sse.done()
                    return
        except OSError as e:
            if job.cancelled.is_set():  # the engine dropped it (backlog full) and shut the socket
                pass
            elif isinstance(e, TimeoutError):
                self.server.drop(job, f"no reply bytes taken for {self.server.write_timeout:.0f} s "
                                      "(alignkit serve --write-timeout)")
            else:
                job.cancel()
                log.debug("client closed the connection during a streamed reply: %r", e)
        self.close_connection = True


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
    **limits: Any,
) -> tuple[ChatServer, threading.Thread]:
    """Start serving in a daemon thread; returns ``(server, thread)``.

    ``port=0`` picks a free port (read it from ``server.server_address`` or
    ``server.base_url``). Pass ``model``/``tokenizer`` to serve already-loaded objects.
    ``limits``: any of :data:`DEFAULT_LIMITS` (``max_concurrent_requests``,
    ``max_connections``, ``max_choices_per_request``, ``keep_alive_timeout``,
    ``read_timeout``, ``write_timeout``, ``stream_backlog``).
    Stop with ``server.shutdown(); server.server_close()``.
    """
    unknown = sorted(set(limits) - set(DEFAULT_LIMITS))
    if unknown:
        raise TypeError(f"serve: unknown option(s) {unknown}; the limits are {sorted(DEFAULT_LIMITS)}")
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
        (host, port), model, tokenizer, name, api_key=api_key, max_new_tokens_cap=max_new_tokens_cap, **limits
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


def _positive_seconds(v: str) -> float:
    s = float(v)
    if not s > 0 or s == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {v}")
    return s


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``alignkit serve`` (shared by ``python -m alignkit.generation.serve`` and the CLI)."""
    d = DEFAULT_LIMITS
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
    ap.add_argument("--max-concurrent-requests", type=_positive_int, default=d["max_concurrent_requests"],
                    metavar="N", help="generation requests admitted at once, queued or generating; more get a 429 "
                                      f"with Retry-After (default {d['max_concurrent_requests']})")
    ap.add_argument("--max-connections", type=_positive_int, default=d["max_connections"], metavar="N",
                    help="open client connections (one thread each); a connection beyond gets a 429 and is closed "
                         f"(default {d['max_connections']})")
    ap.add_argument("--max-choices-per-request", type=_positive_int, default=d["max_choices_per_request"],
                    metavar="N", help="prompts x n one request may ask for; more get a 400 "
                                      f"(default {d['max_choices_per_request']})")
    ap.add_argument("--keep-alive-timeout", type=_positive_seconds, default=d["keep_alive_timeout"], metavar="S",
                    help="close a connection that sends no request for this long, new or between requests "
                         f"(default {d['keep_alive_timeout']:g})")
    ap.add_argument("--read-timeout", type=_positive_seconds, default=d["read_timeout"], metavar="S",
                    help="abandon a request whose headers or body stall this long "
                         f"(default {d['read_timeout']:g})")
    ap.add_argument("--write-timeout", type=_positive_seconds, default=d["write_timeout"], metavar="S",
                    help="drop a client that takes none of its reply for this long "
                         f"(default {d['write_timeout']:g})")
    ap.add_argument("--stream-backlog", type=_positive_int, default=d["stream_backlog"], metavar="N",
                    help="chunks a stream may queue behind a client whose socket buffers are full before the "
                         f"client is dropped (default {d['stream_backlog']})")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C with the options of :func:`add_arguments`; 2 when the key variable is unset."""
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
        **{k: getattr(args, k) for k in DEFAULT_LIMITS},
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
