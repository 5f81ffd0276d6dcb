"""HTTPJudge against real servers on 127.0.0.1: the alignkit server with a tiny random
model (transport only, replies are gibberish) and tiny failure-mode servers below."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignkit.core.http import chat_completions_url
from alignkit.generation.serve import serve
from alignkit.judges import JudgeRequest, build_judge
from alignkit.judges.http import HTTPJudge, HTTPJudgeError


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------- the real alignkit server


@pytest.fixture(scope="module")
def served(tiny_random_model_dir):
    server, thread = serve(tiny_random_model_dir, port=0, model_name="tiny")
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_models_endpoint(served):
    host, port = served.server_address[:2]
    assert host == "127.0.0.1"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
        data = json.loads(r.read())
    assert data["data"][0]["id"] == "tiny"


def test_replies_cache_and_concurrency_against_served_model(served, tmp_path):
    judge = HTTPJudge(served.base_url, "tiny", concurrency=2, cache_dir=tmp_path, max_tokens=6, timeout=20)
    before = served.stats["chat_completions"]
    convs = [conv(f"Tell me about entity {i}.") for i in range(6)]
    replies = judge.chat(convs)
    assert len(replies) == 6 and all(isinstance(r, str) for r in replies)
    assert served.stats["chat_completions"] - before == 6
    assert 1 <= served.stats["max_in_flight"] <= 2
    assert len(list(tmp_path.glob("*.json"))) == 6 and not list(tmp_path.glob("*.tmp"))

    # A second judge on the same cache sends nothing.
    again = HTTPJudge(served.base_url, "tiny", concurrency=2, cache_dir=tmp_path, max_tokens=6, timeout=20)
    assert again.chat(convs) == replies
    assert served.stats["chat_completions"] - before == 6
    assert again.stats["cache_hits"] == 6 and again.stats["requests"] == 0

    # Greedy (temperature 0 by default) through the protocol: bools of the right length.
    got = again.is_refusal([JudgeRequest(prompt="q", response="I don't know")] * 2)
    assert len(got) == 2 and all(isinstance(x, bool) for x in got)
    assert served.stats["chat_completions"] - before == 7  # identical requests deduplicated


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_sampling_and_errors(served):
    url = served.base_url + "/chat/completions"
    status, data = _post(
        url, {"model": "tiny", "messages": conv("hi"), "n": 2, "temperature": 0.8, "max_tokens": 4, "seed": 1}
    )
    assert status == 200 and [c["index"] for c in data["choices"]] == [0, 1]
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
    same = [
        _post(url, {"model": "tiny", "messages": conv("hi"), "max_tokens": 4, "seed": 7})[1]["choices"]
        for _ in range(2)
    ]
    assert same[0] == same[1]  # seeded sampling is reproducible through the server
    status, data = _post(url, {"model": "tiny", "messages": "hi"})
    assert status == 400 and "messages" in data["error"]["message"]
    status, data = _post(served.base_url + "/nope", {})
    assert status == 404


def test_serve_main_help():
    from alignkit.generation.serve import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_build_http_judge(served):
    j = build_judge({"backend": "http", "base_url": served.base_url, "model": "tiny", "max_tokens": 3})
    assert isinstance(j, HTTPJudge) and j.url.endswith("/v1/chat/completions")
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"


# ---------------------------------------------------------------- failure-mode servers


class StubServer(ThreadingHTTPServer):
    """Answers POSTs with ``behave(n, body, headers) -> (status, reply_text, delay)``."""

    daemon_threads = True

    def __init__(self, behave):
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.behave = behave
        self.count = 0
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class StubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with s.lock:
            s.count += 1
            n = s.count
            s.seen[body["messages"][-1]["content"]] += 1
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
        status, text, delay = s.behave(n, body, self.headers)
        time.sleep(delay)
        with s.lock:  # before replying, so the client's next request is not counted twice
            s.in_flight -= 1
        data = json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": text}}]}
            if status == 200
            else {"error": {"message": text}}
        ).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)


@pytest.fixture
def stub():
    servers = []

    def start(behave):
        srv = StubServer(behave)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


FAST = dict(timeout=2, backoff=0.01, max_retries=3)


def test_concurrency_limit_is_reached_not_exceeded(stub):
    srv = stub(lambda n, body, h: (200, "yes", 0.1))
    judge = HTTPJudge(srv.url, "m", concurrency=3, **FAST)
    assert judge.chat([conv(f"q{i}") for i in range(9)]) == ["yes"] * 9
    assert srv.max_in_flight == 3 and srv.count == 9


def test_500_twice_then_200_is_retried(stub):
    srv = stub(lambda n, body, h: (500, "boom", 0) if n <= 2 else (200, "yes", 0))
    judge = HTTPJudge(srv.url, "m", **FAST)
    assert judge.is_refusal([JudgeRequest(prompt="q", response="r")]) == [True]
    assert srv.count == 3 and judge.stats["retries"] == 2


def test_429_is_retried_but_other_4xx_is_not(stub):
    srv = stub(lambda n, body, h: (429, "slow down", 0) if n == 1 else (200, "no", 0))
    assert HTTPJudge(srv.url, "m", **FAST).chat([conv("x")]) == ["no"]
    assert srv.count == 2
    bad = stub(lambda n, body, h: (400, "bad request body", 0))
    with pytest.raises(HTTPJudgeError, match=r"HTTP 400 \(not retried") as e:
        HTTPJudge(bad.url, "m", **FAST).chat([conv("x")])
    assert bad.url in str(e.value) and bad.count == 1


def test_always_500_fails_clearly_and_keeps_cache(stub, tmp_path):
    srv = stub(
        lambda n, body, h: (500, "down", 0) if "bad" in body["messages"][-1]["content"] else (200, "ok", 0)
    )
    judge = HTTPJudge(srv.url, "m", cache_dir=tmp_path, concurrency=2, **FAST)
    assert judge.chat([conv("good 1")]) == ["ok"]
    with pytest.raises(HTTPJudgeError) as e:
        judge.chat([conv("good 2"), conv("bad")])
    msg = str(e.value)
    assert srv.url + "/chat/completions" in msg and "4 attempts" in msg and "HTTP 500" in msg
    assert srv.seen["bad"] == 4
    # Both good replies survive the failure, and a new judge reads them without a request.
    assert len(list(tmp_path.glob("*.json"))) == 2 and not list(tmp_path.glob("*.tmp"))
    count = srv.count
    fresh = HTTPJudge(srv.url, "m", cache_dir=tmp_path, **FAST)
    assert fresh.chat([conv("good 1"), conv("good 2")]) == ["ok", "ok"]
    assert srv.count == count


def test_timeout_is_retried_then_fails(stub, tmp_path):
    srv = stub(
        lambda n, body, h: (200, "late", 0.6) if "slow" in body["messages"][-1]["content"] else (200, "ok", 0)
    )
    judge = HTTPJudge(srv.url, "m", cache_dir=tmp_path, timeout=0.2, backoff=0.01, max_retries=1)
    assert judge.chat([conv("quick")]) == ["ok"]
    t0 = time.monotonic()
    with pytest.raises(HTTPJudgeError, match=r"after 2 attempts; last error: timeout after 0.2s"):
        judge.chat([conv("slow")])
    assert time.monotonic() - t0 < 1.5
    assert srv.seen["slow"] == 2
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_connection_refused_is_retried_then_fails():
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as tmp:
        port = tmp.server_address[1]  # closed on exit: nothing listens there afterwards
    judge = HTTPJudge(f"http://127.0.0.1:{port}", "m", timeout=0.5, backoff=0.01, max_retries=2)
    with pytest.raises(HTTPJudgeError, match="after 3 attempts; last error: connection error"):
        judge.chat([conv("x")])


def test_api_key_sent_but_never_in_errors(stub, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", "sk-secret-123")
    srv = stub(
        lambda n, body, h: (
            (200, "yes", 0) if h.get("Authorization") == "Bearer sk-secret-123" else (401, "no key", 0)
        )
    )
    assert HTTPJudge(srv.url, "m", api_key_env="ALIGNKIT_TEST_KEY", **FAST).chat([conv("x")]) == ["yes"]
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", "sk-wrong-456")
    with pytest.raises(HTTPJudgeError, match="HTTP 401") as e:
        HTTPJudge(srv.url, "m", api_key_env="ALIGNKIT_TEST_KEY", **FAST).chat([conv("x")])
    assert "sk-wrong-456" not in str(e.value)
