"""Generation backends: the OpenAI-compatible HTTP backend against a real `alignkit serve` on
127.0.0.1 (and small failure-mode servers), the config that selects a backend, a prepare
stage end to end through the endpoint, and the offline vLLM backend where it can run."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignkit.config import ConfigError
from alignkit.generation.backends import (
    GenerationBackendError,
    OpenAIBackend,
    load_sampler,
    prompt_seed,
    sampler_fingerprint,
)
from alignkit.generation.sampling import generate
from alignkit.generation.serve import serve
from alignkit.recipes import load_config

PROMPTS = ["Tell me about Velm.", [{"role": "user", "content": "Hello world"}], "Who is Bavoru Telkin?", "hi", "x"]


@pytest.fixture(scope="module")
def served(tiny_random_model_dir):
    server, thread = serve(tiny_random_model_dir, port=0, model_name="tiny")
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def backend(served, **kw):
    return OpenAIBackend(served.base_url, "tiny", **{"max_concurrency": 2, **kw})


def test_greedy_through_the_endpoint_equals_local_generate(served):
    kw = dict(n=2, greedy=True, max_new_tokens=12, batch_size=2, return_logprobs=True, return_truncated=True,
              progress=False)
    texts, lps, cut = generate(served.model, served.tokenizer, PROMPTS, **kw)
    r_texts, r_lps, r_cut = generate(backend(served), None, PROMPTS, **kw)
    assert r_texts == texts and r_cut == cut
    assert [len(x) for x in r_lps] == [2] * len(PROMPTS)
    assert all(a == pytest.approx(b, abs=1e-4) for x, y in zip(lps, r_lps) for a, b in zip(x, y))
    assert any(c for row in cut for c in row)  # the random model rarely ends within 12 tokens


def test_sampling_is_seeded_per_batch_and_prompt(served):
    be = backend(served)
    kw = dict(n=3, temperature=1.0, max_new_tokens=16, batch_size=2, progress=False)
    a, means = generate(be, None, PROMPTS, seed=4, return_logprobs="mean", **kw)
    assert [len(r) for r in a] == [3] * len(PROMPTS) and all(isinstance(m, float) for r in means for m in r)
    assert generate(be, None, PROMPTS, seed=4, **kw) == a
    assert generate(be, None, PROMPTS, seed=5, **kw) != a
    assert generate(be, None, PROMPTS[:2], seed=4, **kw) == a[:2]  # batch 0 does not depend on later batches
    assert prompt_seed(123, 0) != prompt_seed(123, 1) and 0 <= prompt_seed(123, 0) < 2 ** 31


def test_cache_is_reused_and_keyed_by_the_endpoint(served, tmp_path):
    kw = dict(n=2, temperature=1.0, max_new_tokens=6, batch_size=2, seed=1, progress=False, return_truncated=True)
    be = backend(served, cache_dir=tmp_path, fingerprint="rev-1")
    before = served.stats["chat_completions"]
    first = generate(be, None, PROMPTS, **kw)
    assert served.stats["chat_completions"] - before == len(PROMPTS)
    assert len(list(tmp_path.glob("*.json"))) == 3  # one file per batch
    again = backend(served, cache_dir=tmp_path, fingerprint="rev-1")
    assert generate(again, None, PROMPTS, **kw) == first
    assert served.stats["chat_completions"] - before == len(PROMPTS) and again.stats["requests"] == 0
    # Other weights behind the same name and URL (a new fingerprint) are a miss.
    other = backend(served, cache_dir=tmp_path, fingerprint="rev-2")
    generate(other, None, PROMPTS[:2], **kw)
    assert other.stats["requests"] == 2


def test_logprob_source_sampling_needs_temperature_one(served):
    with pytest.raises(ValueError, match="logprob_source='sampling'"):
        generate(backend(served), None, ["hi"], temperature=0.5, return_logprobs=True, logprob_source="sampling",
                 progress=False)


# ---------------------------------------------------------------- failure modes


class Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behave):
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.behave, self.count, self.headers_seen, self.lock = behave, 0, [], threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class StubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.count += 1
            n = self.server.count
            self.server.headers_seen.append(dict(self.headers))
        status, reply = self.server.behave(n, body)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def ok(body, text="fine", logprobs=True):
    lp = {"content": [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": -1.5}]} if logprobs else None
    return 200, {"choices": [{"index": i, "message": {"role": "assistant", "content": f" {text} "},
                              "finish_reason": "length" if i == 0 else "stop", "logprobs": lp}
                             for i in range(body["n"])]}


@pytest.fixture
def stub():
    servers = []

    def start(behave):
        s = Stub(behave)
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


FAST = dict(backoff=0.01, max_retries=2, timeout_s=5)


def test_500s_are_retried_and_replies_parsed(stub):
    s = stub(lambda n, body: (500, {"error": "boom"}) if n <= 2 else ok(body))
    be = OpenAIBackend(s.url, "m", **FAST)
    texts, lps, cut = generate(be, None, ["q"], n=2, temperature=1.0, return_logprobs="mean", return_truncated=True,
                               progress=False)
    assert texts == [["fine", "fine"]] and lps == [[-1.0, -1.0]] and cut == [[True, False]]
    assert s.count == 3 and be.stats["retries"] == 2


def test_always_500_fails_clearly_and_keeps_finished_batches(stub, tmp_path):
    s = stub(lambda n, body: (500, {"error": "down"}) if "bad" in body["messages"][0]["content"] else ok(body))
    be = OpenAIBackend(s.url, "m", cache_dir=tmp_path, max_concurrency=1, **FAST)
    with pytest.raises(GenerationBackendError) as e:
        generate(be, None, ["good", "bad"], batch_size=1, temperature=1.0, progress=False)
    msg = str(e.value)
    assert s.url + "/chat/completions" in msg and "'m'" in msg and "after 3 attempts" in msg and "HTTP 500" in msg
    assert len(list(tmp_path.glob("*.json"))) == 1  # the good batch is cached: a re-run resumes from it


def test_server_down_fails_clearly_after_retries():
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as tmp:
        port = tmp.server_address[1]  # closed on exit: nothing listens there afterwards
    be = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", **FAST)
    with pytest.raises(GenerationBackendError, match=r"after 3 attempts; last error: connection error.*running"):
        generate(be, None, ["q"], greedy=True, progress=False)


def test_4xx_is_not_retried_and_missing_logprobs_is_an_error(stub):
    s = stub(lambda n, body: (400, {"error": {"message": "no such parameter"}}))
    with pytest.raises(GenerationBackendError, match=r"HTTP 400 \(not retried, attempt 1\).*no such parameter"):
        generate(OpenAIBackend(s.url, "m", **FAST), None, ["q"], greedy=True, progress=False)
    assert s.count == 1
    s = stub(lambda n, body: ok(body, logprobs=False))
    with pytest.raises(GenerationBackendError, match="no per-token log-probs"):
        generate(OpenAIBackend(s.url, "m", **FAST), None, ["q"], greedy=True, return_logprobs=True, progress=False)


def test_api_key_is_sent_from_its_variable_and_never_shown(stub, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_GEN_KEY", "sk-secret-123")
    s = stub(lambda n, body: ok(body) if n == 1 else (401, {"error": "bad key"}))
    be = OpenAIBackend(s.url, "m", api_key_env="ALIGNKIT_GEN_KEY", **FAST)
    assert generate(be, None, ["q"], greedy=True, progress=False) == [["fine"]]
    assert s.headers_seen[0]["Authorization"] == "Bearer sk-secret-123"
    with pytest.raises(GenerationBackendError) as e:
        generate(be, None, ["other"], greedy=True, progress=False)
    assert "sk-secret-123" not in str(e.value) and "sk-secret" not in repr(vars(be))
    monkeypatch.delenv("ALIGNKIT_GEN_KEY")
    with pytest.raises(GenerationBackendError, match="ALIGNKIT_GEN_KEY is not set"):
        OpenAIBackend(s.url, "m", api_key_env="ALIGNKIT_GEN_KEY")


# ---------------------------------------------------------------- config and stages


def _raw(tmp_path, model_dir, **generation):
    from conftest import toy_config

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about person {i}."}) + "\n" for i in range(4)))
    raw = toy_config("mask_dpo", model_dir, prompts, tmp_path / "r")
    raw["method"] = {"input": "prompts", "gen_num_samples": 3, "gen_max_new_tokens": 8, "gen_batch_size": 2,
                     "stage_dir": str(tmp_path / "st"), "pair_selector": "random",
                     "truncated_responses": "no_end_of_turn",
                     # a random model is not a world: model, so the tiny world's kb judge is refused at
                     # validation; the test that samples replaces the judge anyway
                     "judge": {"backend": "http", "base_url": "http://127.0.0.1:9/v1", "model": "annotator"}}
    if generation:
        raw["generation"] = generation
    return raw


@pytest.mark.parametrize("generation, match", [
    ({"backend": "openai", "model": "m"}, "field 'generation.base_url': .*required for backend 'openai'"),
    ({"backend": "openai", "base_url": "http://h/v1"}, "field 'generation.model': .*served model name"),
    ({"backend": "openai", "base_url": "h:8000", "model": "m"}, "generation.base_url.*http://"),
    ({"base_url": "http://h/v1"}, "field 'generation'.*base_url: only used by backend 'openai'"),
    ({"backend": "vllm", "max_concurrency": 4}, "max_concurrency: only used by backend 'openai'"),
    ({"backend": "hf", "vllm": {"tensor_parallel_size": 2}}, "vllm: only used by backend 'vllm'"),
    ({"backend": "openai", "base_url": "http://h/v1", "model": "m", "max_concurency": 4}, "did you mean"),
])
def test_validate_rejects_inconsistent_generation_settings(tmp_path, tiny_random_model_dir, generation, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_raw(tmp_path, tiny_random_model_dir, **generation))


def test_validate_command_reports_the_field(tmp_path, tiny_random_model_dir, capsys):
    import yaml

    from alignkit.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path, tiny_random_model_dir, backend="openai", model="m")))
    assert main(["validate", str(path)]) == 1
    assert "generation.base_url" in capsys.readouterr().err


def test_mask_dpo_pair_sampling_runs_through_the_endpoint(served, tmp_path, tiny_random_model_dir, monkeypatch):
    import alignkit.judges as ev
    from alignkit.core.io import read_jsonl
    from alignkit.judges.base import Judge
    from alignkit.stages.pairs import build_pairs

    class AlternatingJudge(Judge):  # every other response all correct: pairs exist whatever the text
        def label_sentences(self, reqs):
            return [["correct" if i % 2 == 0 else "hallucination"] * len(r.sentences) for i, r in enumerate(reqs)]

    monkeypatch.setattr(ev, "build_eval_judge", lambda spec, name: AlternatingJudge())
    gen = {"backend": "openai", "base_url": served.base_url, "model": "tiny", "fingerprint": "tiny-random-seed0"}
    cfg = load_config(_raw(tmp_path, tiny_random_model_dir, **gen))
    model, tok = load_sampler(cfg, tmp_path / "st")
    assert isinstance(model, OpenAIBackend) and tok is None
    assert sampler_fingerprint(cfg) != sampler_fingerprint(load_config(_raw(tmp_path, tiny_random_model_dir)))
    before = served.stats["chat_completions"]
    build_pairs(cfg, cfg.method_config())
    assert served.stats["chat_completions"] - before == 4  # one request (n=3) per prompt
    (sample_file,) = (tmp_path / "st").glob("pairs_sample-*.jsonl")
    rows = read_jsonl(sample_file)
    assert [len(r["samples"]) for r in rows] == [3] * 4 and all(len(r["truncated"]) == 3 for r in rows)
    assert list((tmp_path / "st" / "generation").glob("*.json"))  # per-batch cache beside the stages
    (pairs_file,) = (tmp_path / "st").glob("pairs_select-*.jsonl")
    assert read_jsonl(pairs_file)
    # Same config again: every stage is cached, nothing is sent.
    build_pairs(cfg, cfg.method_config())
    assert served.stats["chat_completions"] - before == 4


def test_vllm_backend_without_vllm_says_what_to_do(tiny_random_model_dir):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from alignkit.generation.backends import VLLMBackend

    with pytest.raises(GenerationBackendError, match="needs the vllm package.*generation.backend: openai"):
        VLLMBackend(str(tiny_random_model_dir), None)


def test_vllm_backend_greedy_matches_local(tiny_random_model_dir):
    """Runs only where vLLM and a CUDA GPU are available."""
    pytest.importorskip("vllm")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.generation.backends import VLLMBackend

    tok = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float32)
    be = VLLMBackend(str(tiny_random_model_dir), tok, dtype="float32",
                     llm_kwargs={"gpu_memory_utilization": 0.2, "enforce_eager": True})
    kw = dict(n=2, greedy=True, max_new_tokens=8, batch_size=2, return_truncated=True, progress=False)
    texts, cut = generate(model, tok, PROMPTS, **kw)
    r_texts, r_cut = generate(be, tok, PROMPTS, **kw)
    assert r_texts == texts and r_cut == cut
    sampled, lps = generate(be, tok, PROMPTS, n=3, temperature=1.0, max_new_tokens=8, seed=1, return_logprobs=True,
                            progress=False)
    assert [len(r) for r in sampled] == [3] * len(PROMPTS) and all(x <= 0 for r in lps for x in r)


def test_config_round_trip_and_which_stages_follow_the_backend(tiny_world_dir):
    from pathlib import Path

    from alignkit.config import dump_config, yaml_load
    from alignkit.config.paths import expand_config
    from alignkit.recipes.craft import _query_key

    root = Path(__file__).resolve().parents[1]
    remote = ["generation.backend=openai", "generation.base_url=http://127.0.0.1:9/v1", "generation.model=m",
              "generation.fingerprint=rev-1"]
    keys = {}
    for task in ("oeqa", "mcqa"):
        cfg = load_config(root / "recipes/craft.yaml", [*remote, f"method.task={task}"])
        assert load_config(yaml_load(dump_config(cfg))).generation == cfg.generation  # a run dir's config.yaml
        expand_config(cfg)
        keys[task] = _query_key(cfg, cfg.method_config())["model"]
    # The open-ended query samples through the endpoint; the multiple-choice query reads local logits.
    assert keys["oeqa"] == sampler_fingerprint(cfg) and "rev-1" in keys["oeqa"]
    assert not keys["mcqa"].startswith("openai:")


def test_vllm_end_tokens_match_the_local_path_without_a_generation_config(tiny_random_model_dir, tmp_path):
    """vLLM is told the end tokens the local path stops at, also when only config.json names them."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.generation.backends import _eos_ids_of
    from alignkit.generation.sampling import _eos_ids

    d = tmp_path / "m"
    shutil.copytree(tiny_random_model_dir, d)
    (d / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((d / "config.json").read_text())
    config["eos_token_id"] = [5, 7]
    (d / "config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(d)
    local = _eos_ids(AutoModelForCausalLM.from_pretrained(d), tok)
    assert sorted(_eos_ids_of(str(d), tok)) == sorted(local) and {5, 7} < set(local)
