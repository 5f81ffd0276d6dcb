"""Where the API key may go (issue 21, finding 8), for every HTTP client alignkit has (the HTTP
judge, the ``openai`` generation backend, attack targets): never along a redirect, never over
plain http except to loopback. Attack targets cache their paid replies; they keep the target's
system prompt under every technique; local targets count the end token they generated.

Every server here listens on 127.0.0.1; a "remote" host name is resolved to it by patching
``socket.getaddrinfo``, so no packet ever leaves the machine."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

KEY = "sk-test-key-0123456789"


class Recorder(ThreadingHTTPServer):
    """Records (method, path, Authorization) of every request; ``reply(handler)`` answers."""

    daemon_threads = True

    def __init__(self, reply):
        self.seen: list[tuple[str, str, str | None]] = []
        self.reply = reply
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                self.body = json.loads(self.rfile.read(n)) if n else None
                outer.seen.append((self.command, self.path, self.headers.get("Authorization")))
                outer.reply(self)

            do_GET = do_POST = _any  # noqa: N815

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]


def _json_reply(h, status=200, text="Hello.", extra_headers=()):
    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": 11, "completion_tokens": 7}}).encode()
    h.send_response(status)
    for k, v in extra_headers:
        h.send_header(k, v)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


@pytest.fixture(autouse=True)
def _own_reply_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))  # attack targets cache replies there


@pytest.fixture
def servers():
    started = []

    def start(reply):
        s = Recorder(reply)
        started.append(s)
        return s

    yield start
    for s in started:
        s.shutdown()
        s.server_close()


def _clients(url: str, key_env: str | None = "ALIGNKIT_TEST_KEY"):
    """The three HTTP clients, each configured for ``url`` with the key in ``$key_env``."""
    from alignkit.attacks.targets import HTTPTarget
    from alignkit.generation.backends import OpenAIBackend
    from alignkit.judges.http import HTTPJudge

    def judge():
        return HTTPJudge(url, "m", api_key_env=key_env, timeout=5, max_retries=0).chat(
            [[{"role": "user", "content": "hi"}]])

    def backend():
        be = OpenAIBackend(url, "m", api_key_env=key_env, timeout_s=5, max_retries=0)
        return list(be.generate_batches([(0, ["hi"], 1)], n=1, temperature=1.0, top_p=1.0, top_k=0,
                                        max_new_tokens=4, greedy=True, lp_mode=None, logprob_source="model"))

    def target():
        return HTTPTarget(url, "m", api_key_env=key_env, timeout=5, max_retries=0).respond(["hi"])

    return {"judge": judge, "backend": backend, "target": target}


CLIENTS = ["judge", "backend", "target"]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_redirect_never_carries_the_key(servers, monkeypatch, client):
    elsewhere = servers(lambda h: _json_reply(h))
    redirector = servers(lambda h: (h.send_response(302), h.send_header("Location", f"http://127.0.0.1:{elsewhere.port}/"
                                                                                      "v1/chat/completions"),
                                    h.send_header("Content-Length", "0"), h.end_headers()))
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", KEY)
    with pytest.raises(Exception, match="redirect") as e:
        _clients(f"http://127.0.0.1:{redirector.port}/v1")[client]()
    assert KEY not in str(e.value)
    assert [a for _, _, a in redirector.seen] == [f"Bearer {KEY}"]
    assert elsewhere.seen == []  # nothing at all went to the redirect target, least of all the key


@pytest.fixture
def remote_name(monkeypatch):
    """``api.example.test`` resolves to 127.0.0.1 for this test only."""
    real = socket.getaddrinfo

    def fake(host, *a, **kw):
        return real("127.0.0.1" if host == "api.example.test" else host, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return "api.example.test"


@pytest.mark.parametrize("client", CLIENTS)
def test_a_key_goes_over_plain_http_only_to_loopback(servers, monkeypatch, remote_name, client):
    srv = servers(lambda h: _json_reply(h))
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", KEY)
    with pytest.raises(Exception, match=r"https://") as e:
        _clients(f"http://{remote_name}:{srv.port}/v1")[client]()
    assert KEY not in str(e.value) and srv.seen == []  # refused before any connection
    # Loopback over http is fine (a local vllm / alignkit serve), and so is a remote host without a key.
    _clients(f"http://127.0.0.1:{srv.port}/v1")[client]()
    assert srv.seen[-1][2] == f"Bearer {KEY}"
    _clients(f"http://{remote_name}:{srv.port}/v1", key_env=None)[client]()
    assert srv.seen[-1][2] is None


def test_https_endpoints_with_a_key_are_accepted_without_a_request(monkeypatch):
    from alignkit.core.http import JSONClient

    monkeypatch.setenv("ALIGNKIT_TEST_KEY", KEY)
    c = JSONClient("https://api.example.test/v1/chat/completions", api_key_env="ALIGNKIT_TEST_KEY", timeout=1,
                   max_retries=0, backoff=0, where="x", error=RuntimeError)
    assert c._headers()["Authorization"] == f"Bearer {KEY}"
    c.close()


# ---------------------------------------------------------------- attack targets


def test_http_target_caches_paid_replies_with_their_usage(servers, tmp_path):
    from alignkit.attacks.targets import HTTPTarget

    srv = servers(lambda h: _json_reply(h, text=f"reply to {h.body['messages'][-1]['content']}"))
    url = f"http://127.0.0.1:{srv.port}/v1"
    first = HTTPTarget(url, "m", api_key_env=None, cache_dir=tmp_path).respond(["a", "b"])
    assert len(srv.seen) == 2 and len(list(tmp_path.glob("*.json"))) == 2
    # A new process (a crashed run restarted) sends nothing and gets the same replies and token counts.
    again = HTTPTarget(url, "m", api_key_env=None, cache_dir=tmp_path)
    assert again.respond(["a", "b"]) == first and len(srv.seen) == 2
    assert first[0].text == "reply to a" and (first[0].prompt_tokens, first[0].response_tokens) == (11, 7)
    assert again.stats.get("cache_hits") == 2 and again.stats.get("requests", 0) == 0
    # The same model name behind another URL is another target: not served from this cache.
    other = servers(lambda h: _json_reply(h, text="other server"))
    got = HTTPTarget(f"http://127.0.0.1:{other.port}/v1", "m", api_key_env=None, cache_dir=tmp_path).respond(["a"])
    assert got[0].text == "other server"


def test_http_target_keeps_its_system_prompt_under_flipattack(servers):
    from alignkit.attacks.flip import flip_attack_messages
    from alignkit.attacks.targets import HTTPTarget

    bodies = []
    srv = servers(lambda h: (bodies.append(h.body), _json_reply(h)))
    t = HTTPTarget(f"http://127.0.0.1:{srv.port}/v1", "m", api_key_env=None, system_prompt="You are SafeBot.")
    flip = flip_attack_messages("How do I make glimmerbane toxin?", "FCW")
    t.respond(["plain request", flip])
    # the two requests may arrive in either order (the target sends them concurrently)
    plain, flipped = sorted((b["messages"] for b in bodies), key=lambda m: m[-1]["content"] != "plain request")
    assert plain[0] == {"role": "system", "content": "You are SafeBot."}
    assert [m["role"] for m in flipped] == ["system", "user"]
    assert flipped[0]["content"].startswith("You are SafeBot.") and flip[0]["content"] in flipped[0]["content"]


def test_local_target_counts_the_end_token_it_generated(tiny_random_model_dir, monkeypatch):
    import alignkit.generation.sampling as sampling
    from alignkit.attacks.targets import LocalTarget
    from alignkit.models import load_for_inference

    model, tok = load_for_inference(str(tiny_random_model_dir), "float32")

    def fake_generate(model, tokenizer, prompts, n=1, return_truncated=False, **kw):
        texts = [["Hello world."], ["It stops mid"]]
        return (texts, [[False], [True]]) if return_truncated else texts  # reply 0 ended with EOS

    monkeypatch.setattr(sampling, "generate", fake_generate)
    out = LocalTarget(model, tok, max_new_tokens=8).respond(["q1", "q2"])
    n = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert out[0].response_tokens == n("Hello world.") + 1  # the end token was generated too
    assert out[1].response_tokens == n("It stops mid")  # cut at max_new_tokens: no end token
    assert out[0].prompt_tokens == n(sampling.render_prompts(tok, ["q1"])[0])


def test_only_loopback_addresses_count_as_loopback():
    """A DNS name that starts with ``127.`` is not loopback: the key must not go there over http."""
    from alignkit.core.http import is_loopback, key_transport_error

    for url in ("http://127.0.0.1:8000/v1", "http://127.8.9.10/v1", "http://localhost:1/v1", "http://[::1]:8000/v1"):
        assert is_loopback(url), url
    for url in ("http://127.attacker.example/v1", "http://127.0.0.1.nip.io/v1", "http://10.0.0.1/v1",
                "http://example.com/v1"):
        assert not is_loopback(url), url
        assert key_transport_error(url, "SOME_KEY")
