"""`alignkit serve` under load and against clients that misbehave, on 127.0.0.1 with the tiny
random model. Every test here is bounded: a fixed number of requests, client timeouts, a
deadline, and a pytest timeout; nothing leaves loopback.

The load test prints its numbers (``pytest -s``, or the PASSES section of ``-rA``) and writes
them to ``serve_load.json`` under its tmp_path."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import openai
import pytest

from alignkit.generation.serve import serve

MSGS = [{"role": "user", "content": "Tell me about Velm."}]
CLIENTS = 32
PER_CLIENT = 4
REQUEST_TIMEOUT_S = 60  # one request, connect to last byte (generous: a shared 2-core box can be 20x slower)
LOAD_DEADLINE_S = 60  # no client starts a request after this


def _server_threads(port: int) -> list[threading.Thread]:
    """The server's own threads: connection handlers, the engine and the accept loop."""
    return [t for t in threading.enumerate() if str(port) in t.name and t.name.startswith("alignkit-serve")]


def _raw_request(port: int, body: dict, path: str = "/v1/chat/completions", rcvbuf: int | None = None) -> socket.socket:
    """Send a request on a fresh socket and return it unread. A small receive buffer (set before
    connecting, so the window is small from the start) makes a client that does not read fill up fast."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(REQUEST_TIMEOUT_S)
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def _drain(s: socket.socket, deadline_s: float) -> tuple[bytes, bool]:
    """Read until the server closes the connection; (bytes, whether it closed before the deadline)."""
    out, end = [], time.monotonic() + deadline_s
    s.settimeout(1.0)
    while time.monotonic() < end:
        try:
            b = s.recv(1 << 16)
        except TimeoutError:
            continue
        except OSError:  # reset: closed too
            return b"".join(out), True
        if not b:
            return b"".join(out), True
        out.append(b)
    return b"".join(out), False


def _wait(cond, timeout_s: float, what: str, fail: bool = True) -> bool:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            if fail:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            return False
        time.sleep(0.02)
    return True


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


# Each client sends these in turn on one keep-alive connection: chat, streamed chat, a two-prompt
# completion with n=2, chat with a stop string. 8 tokens each.
def _requests(i: int) -> list[tuple[str, dict, bool]]:
    return [
        ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 8, "seed": i}, False),
        ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 8, "stream": True,
                                  "stream_options": {"include_usage": True}}, True),
        ("/v1/completions", {"model": "tiny", "prompt": ["Hello", "world"], "n": 2, "max_tokens": 8}, False),
        ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 8, "stop": ["e"]}, False),
    ][:PER_CLIENT]


def _client(port: int, i: int, start: float, out: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        for path, body, stream in _requests(i):
            if time.monotonic() - start > LOAD_DEADLINE_S:
                out.append({"client": i, "path": path, "status": None, "error": "load deadline passed"})
                return
            t0 = time.monotonic()
            try:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
            except Exception as e:  # noqa: BLE001 - recorded; the assertions below report it
                out.append({"client": i, "path": path, "status": None, "error": repr(e)})
                return  # a client that timed out does not queue more work behind a stuck server
            rec = {"client": i, "path": path, "status": r.status, "latency_s": time.monotonic() - t0}
            if r.status == 200 and stream:
                events = [x[6:] for x in data.decode().split("\n") if x.startswith("data: ")]
                rec["ok"] = events[-1:] == ["[DONE]"] and json.loads(events[-2])["usage"]["completion_tokens"] >= 1
            elif r.status == 200:
                reply = json.loads(data)
                rec["ok"] = len(reply["choices"]) == (4 if path == "/v1/completions" else 1)
            out.append(rec)
    finally:
        conn.close()


@pytest.mark.timeout(240)
def test_32_clients_and_one_that_stops_reading(tiny_random_model_dir, tmp_path):
    """32 concurrent clients x 4 requests while one client streams a large reply and never reads it.

    Before the engine/writer split, the streaming write happened under the generation lock with
    no socket timeout: the stuck client held the lock and every other request waited (here: timed
    out). Now the slow client is dropped, everyone else completes, nothing is a 5xx, and the server
    runs one thread per connection plus two."""
    server, thread = serve(tiny_random_model_dir, port=0, model_name="tiny", max_new_tokens_cap=480)
    port = server.server_address[1]
    peak, dropped_at, stop_monitor = [0], [], threading.Event()

    def monitor():
        while not stop_monitor.is_set():
            peak[0] = max(peak[0], len(_server_threads(port)))
            if not dropped_at and server.stats.get("slow_clients_dropped"):
                dropped_at.append(time.monotonic())
            time.sleep(0.02)

    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    slow = None
    try:
        # 32 choices x up to 450 tokens, each event ~1.5 kB with 20 top log-probs: over 10 MB, far more
        # than loopback socket buffers hold (4 MB at most here), so the server must stall on this client
        # or drop it.
        slow = _raw_request(port, {"model": "tiny", "messages": MSGS, "stream": True, "n": 32, "max_tokens": 450,
                                   "temperature": 1.0, "seed": 0, "logprobs": True, "top_logprobs": 20},
                            rcvbuf=4096)
        assert slow.recv(12) == b"HTTP/1.1 200"  # streaming has begun; from here on it never reads
        t_slow = time.monotonic()

        results: list[dict] = []
        start = time.monotonic()
        clients = [threading.Thread(target=_client, args=(port, i, start, results), daemon=True)
                   for i in range(CLIENTS)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(LOAD_DEADLINE_S + REQUEST_TIMEOUT_S + 5)
        wall = time.monotonic() - start

        failed = [r for r in results if r["status"] != 200 or not r.get("ok")]
        lat = [r["latency_s"] for r in results if r["status"] == 200]
        report = {"clients": CLIENTS, "requests": CLIENTS * PER_CLIENT, "completed": len(lat), "wall_s": round(wall, 2),
                  "requests_per_s": round(len(lat) / wall, 2),
                  "latency_s": {f"p{q}": round(_percentile(lat, q), 3) for q in (50, 90, 95, 99, 100)} if lat else {},
                  "peak_server_threads": peak[0], "stats": dict(server.stats)}
        # The slow client: the server shuts its connection without finishing its stream. (Waited for
        # before reading it: reading would let the stream go on.)
        dropped = _wait(lambda: server.stats["slow_clients_dropped"] >= 1, 30, "", fail=False)
        report["slow_client_dropped_after_s"] = \
            round((dropped_at[0] if dropped_at else time.monotonic()) - t_slow, 2) if dropped else None
        data, closed = _drain(slow, 30) if dropped else (b"", False)
        report["slow_client_bytes_received"] = len(data)
        # With no client left, the connection threads end: only the engine and the accept loop remain.
        _wait(lambda: len(_server_threads(port)) <= 2, 15, "", fail=False)
        report["threads_after"] = len(_server_threads(port))
        out = Path(tmp_path) / "serve_load.json"
        out.write_text(json.dumps(report, indent=1))
        print(f"\nserve load ({out}):\n{json.dumps(report, indent=1)}")

        assert not failed, f"{len(failed)} of {CLIENTS * PER_CLIENT} requests failed, e.g. {failed[:3]}"
        assert len(lat) == CLIENTS * PER_CLIENT
        assert not [r for r in results if (r["status"] or 0) >= 500]
        assert dropped and closed and b"data: [DONE]" not in data and not data.endswith(b"0\r\n\r\n")
        assert report["threads_after"] <= 2
        # One thread per open connection (32 clients + the slow one) plus the engine and the accept loop.
        assert peak[0] <= CLIENTS + 1 + 2, peak[0]
    finally:
        stop_monitor.set()
        if slow is not None:
            slow.close()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.timeout(90)
def test_requests_beyond_the_in_flight_cap_get_429_and_the_official_client_retries(tiny_random_model_dir):
    server, thread = serve(tiny_random_model_dir, port=0, model_name="tiny", max_concurrent_requests=2)
    port = server.server_address[1]
    results = []

    def ask():
        c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=30)
        results.append(c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).usage.completion_tokens)

    server.generate_lock.acquire()  # the engine waits: admitted requests stay in flight
    released = False
    try:
        held = [threading.Thread(target=ask, daemon=True) for _ in range(2)]
        for t in held:
            t.start()
        _wait(lambda: server.active_requests == 2, 20, "two admitted requests")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": "tiny", "messages": MSGS, "max_tokens": 2}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        err = json.loads(r.read())["error"]
        assert r.status == 429 and r.getheader("Retry-After") == "1" and "max-concurrent-requests" in err["message"]
        conn.close()
        # The official client, with retries on, waits the Retry-After and gets its answer once there is room.
        retried = []
        t = threading.Thread(daemon=True, target=lambda: retried.append(
            openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=3, timeout=30)
            .chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)))
        t.start()
        _wait(lambda: server.stats["rejected_busy"] >= 2, 20, "the official client to be turned away once")
        server.generate_lock.release()
        released = True
        t.join(30)
        for h in held:
            h.join(30)
        assert len(retried) == 1 and retried[0].choices[0].message.content is not None
        assert results == [2, 2]
    finally:
        if not released:
            server.generate_lock.release()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.timeout(60)
def test_connections_are_capped_and_idle_ones_closed(tiny_random_model_dir):
    server, thread = serve(tiny_random_model_dir, port=0, model_name="tiny", max_connections=3,
                           keep_alive_timeout=1.5)
    port = server.server_address[1]
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        _wait(lambda: len(_server_threads(port)) == 3 + 2, 10, "three connection threads")
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        data, closed = _drain(extra, 10)
        assert closed and data.startswith(b"HTTP/1.1 429") and b"Retry-After: 1" in data and b"max-connections" in data
        assert len(_server_threads(port)) == 3 + 2  # no thread was started for it
        # Connections that send nothing are closed once idle for the keep-alive timeout.
        t0 = time.monotonic()
        for s in idle:
            assert _drain(s, 10) == (b"", True)
        assert time.monotonic() - t0 < 8
        _wait(lambda: len(_server_threads(port)) == 2, 10, "the idle connections' threads to end")
        # A keep-alive connection serves request after request, then is closed once left idle.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(2):
            conn.request("GET", "/health")
            assert conn.getresponse().read() == b'{"status": "ok"}'
        assert _drain(conn.sock, 10) == (b"", True)
        conn.close()
        for s in (*idle, extra):
            s.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stall", ["headers", "body"])
def test_a_request_that_stalls_is_abandoned_after_the_read_timeout(tiny_random_model_dir, stall):
    """A client that sends its request line, then stalls in its headers or its body, holds a
    connection thread for read_timeout, not for the (longer) keep-alive timeout, and is closed
    without a reply; the server serves the next client as before."""
    server, thread = serve(tiny_random_model_dir, port=0, model_name="tiny", read_timeout=1.0,
                           keep_alive_timeout=30.0)
    port = server.server_address[1]
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        s.sendall(head if stall == "headers" else
                  head + b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"model\": \"tiny\"")
        _wait(lambda: len(_server_threads(port)) == 1 + 2, 10, "the stalled connection's thread")
        t0 = time.monotonic()
        data, closed = _drain(s, 20)
        waited = time.monotonic() - t0
        assert closed and data == b"", data[:200]
        assert waited < 10, f"closed after {waited:.1f} s: the keep-alive timeout (30 s), not the read timeout (1 s)"
        _wait(lambda: len(_server_threads(port)) == 2, 10, "the stalled connection's thread to end")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().read() == b'{"status": "ok"}'
        conn.close()
        s.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.timeout(90)
def test_a_client_that_does_not_read_its_reply_is_dropped_after_the_write_timeout(tiny_random_model_dir):
    """A non-streamed reply of several MB to a client that never reads: the write gives up after
    write_timeout and the connection is closed (before: the thread waited on it forever)."""
    server, thread = serve(tiny_random_model_dir, port=0, model_name="tiny", max_new_tokens_cap=480,
                           write_timeout=1.0)
    port = server.server_address[1]
    try:
        s = _raw_request(port, {"model": "tiny", "messages": MSGS, "n": 24, "max_tokens": 400, "seed": 1,
                                "logprobs": True, "top_logprobs": 20}, rcvbuf=4096)
        _wait(lambda: server.stats["slow_clients_dropped"] == 1, 60, "the write timeout")
        data, closed = _drain(s, 10)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(x.split(b":")[1] for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")))
        assert closed and head.startswith(b"HTTP/1.1 200") and len(body) < length
        s.close()
        # The server goes on serving.
        c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=30)
        assert c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).usage.completion_tokens == 2
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.timeout(90)
def test_a_prompt_being_tokenised_does_not_stall_generation(tiny_random_model_dir, monkeypatch):
    """Tokenising a prompt (seconds for a multi-MB body) happens in the request's own thread and
    never holds up the engine: a stream already generating completes while it runs."""
    import alignkit.generation.sampling as sampling

    server, thread = serve(tiny_random_model_dir, port=0, model_name="tiny")
    tok_cls = type(server.tokenizer)
    real_call, real_sample = tok_cls.__call__, sampling.sample_tokens
    parsing, release, t = threading.Event(), threading.Event(), {}

    def slow_tokenise(self, text, *a, **k):  # stands in for a huge prompt
        if isinstance(text, str) and "SLOW-PROMPT" in text:
            t["parse_started"] = time.monotonic()
            parsing.set()
            release.wait(30)
        return real_call(self, text, *a, **k)

    def gated(*a, on_step=None, **k):  # the stream pauses after 2 tokens until the slow tokenising has begun
        def step(rows, watch):
            if len(watch.tokens[rows[0]]) == 2:
                parsing.wait(10)
            return on_step(rows, watch) if on_step is not None else ()

        return real_sample(*a, on_step=step, **k)

    monkeypatch.setattr(tok_cls, "__call__", slow_tokenise)
    monkeypatch.setattr(sampling, "sample_tokens", gated)
    started, out = threading.Event(), {}

    def stream():
        s = _raw_request(server.server_address[1], {"model": "tiny", "messages": MSGS, "max_tokens": 24, "stream": True,
                                                    "seed": 3})
        f = s.makefile("rb")
        f.readline()
        started.set()
        for line in f:  # until the stream's last event
            if line.startswith(b"data: [DONE]"):
                out["done"] = time.monotonic()
                break
        s.close()

    def slow_request():
        c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
        out["slow"] = c.completions.create(model="tiny", prompt="SLOW-PROMPT", max_tokens=2).usage.completion_tokens

    tq = threading.Thread(target=slow_request, daemon=True)
    try:
        ts = threading.Thread(target=stream, daemon=True)
        ts.start()
        assert started.wait(20)
        tq.start()
        ts.join(25)
        # The stream ended while the other prompt was still being tokenised, which began mid-stream.
        assert "done" in out and not release.is_set()
        assert "parse_started" in t and t["parse_started"] < out["done"]
    finally:
        release.set()
        tq.join(30)
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert out.get("slow") == 2
