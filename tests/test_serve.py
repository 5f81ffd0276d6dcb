"""`alignkit serve` through the official `openai` Python client, on 127.0.0.1, with the tiny
random model (replies are gibberish; what is checked is the protocol and the numbers)."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
import torch

from alignkit.generation.sampling import generate, render_prompts
from alignkit.generation.serve import serve

MSGS = [{"role": "user", "content": "Tell me about Velm."}]


@pytest.fixture(scope="module")
def served(tiny_random_model_dir):
    server, thread = serve(tiny_random_model_dir, port=0, model_name="tiny", max_new_tokens_cap=64)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=60)


def _stream_chat(client, **kw):
    """Concatenated content, finish reasons, log-probs and usage per choice of a streamed chat."""
    text, finish, lps, usage, objects = {}, {}, {}, None, set()
    for chunk in client.chat.completions.create(model="tiny", stream=True, **kw):
        objects.add(chunk.object)
        usage = chunk.usage or usage
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                assert c.index not in finish  # one final chunk per choice
                finish[c.index] = c.finish_reason
            if c.logprobs and c.logprobs.content:
                lps.setdefault(c.index, []).extend(t.logprob for t in c.logprobs.content)
    assert objects == {"chat.completion.chunk"}
    return text, finish, lps, usage


def test_stream_equals_non_stream_for_greedy(client):
    kw = dict(messages=MSGS, temperature=0, max_tokens=24, n=2, logprobs=True)
    full = client.chat.completions.create(model="tiny", **kw)
    text, finish, lps, usage = _stream_chat(client, stream_options={"include_usage": True}, **kw)
    assert full.object == "chat.completion" and len(full.choices) == 2
    for c in full.choices:
        assert text[c.index] == c.message.content and c.message.content
        assert finish[c.index] == c.finish_reason
        assert lps[c.index] == [t.logprob for t in c.logprobs.content]
    assert usage.completion_tokens == full.usage.completion_tokens and usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_is_server_sent_events_ending_with_done(served):
    body = json.dumps({"model": "tiny", "messages": MSGS, "max_tokens": 5, "stream": True, "seed": 1,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(served.base_url + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        lines = [x for x in r.read().decode().split("\n") if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len({c["id"] for c in chunks}) == 1
    # include_usage: a last chunk with no choices carries the usage; every other chunk has "usage": null.
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])


def test_logprobs_are_the_models_and_usage_counts_tokens(client, served, tiny_random_model_dir):
    model, tok = served.model, served.tokenizer
    r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=12, logprobs=True,
                                       top_logprobs=3)
    c = r.choices[0]
    entries = c.logprobs.content
    prompt_ids = tok.apply_chat_template(MSGS, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(entries) and r.usage.total_tokens == len(prompt_ids) + len(entries)
    # Greedy: the chosen token is the most likely one, and the top list is sorted.
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    # Teacher-forced scoring of the same tokens gives the same log-probs.
    new = tok(render_prompts(tok, [MSGS])[0], add_special_tokens=False)["input_ids"]
    gen = model.generate(torch.tensor([new]), do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    ids = gen[0, len(new):].tolist()
    assert len(ids) == len(entries)
    with torch.no_grad():
        logits = model(gen).logits[0, len(new) - 1 : -1]
    ref = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
    assert sum(e.logprob for e in entries) == pytest.approx(ref.sum().item(), abs=1e-3)
    assert c.finish_reason == ("stop" if tok.eos_token_id in ids else "length")


def test_completions_endpoint_raw_prompt(client, served):
    model, tok = served.model, served.tokenizer
    r = client.completions.create(model="tiny", prompt="The capital of Tarnia is", max_tokens=8, temperature=0,
                                  logprobs=2)
    ids = tok("The capital of Tarnia is", add_special_tokens=True)["input_ids"]  # no chat template
    gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    new = gen[0, len(ids):].tolist()
    c = r.choices[0]
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(ids)
    eos = tok.eos_token_id
    assert c.text == tok.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == r.usage.completion_tokens
    assert all(len(t) == 2 for t in c.logprobs.top_logprobs)
    assert c.logprobs.text_offset[0] == 0
    # A list of prompts: n choices per prompt, indexed prompt-major.
    r = client.completions.create(model="tiny", prompt=["Hello", "world"], n=2, max_tokens=4, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    # Streamed completions join to the same text as a non-streamed greedy one.
    kw = dict(model="tiny", prompt="Hello world", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    parts = [c.text for chunk in client.completions.create(stream=True, **kw) for c in chunk.choices]
    assert "".join(parts) == whole
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="tiny", prompt="x", echo=True, max_tokens=2)


def test_seedless_requests_differ_and_seeded_ones_repeat(client, served):
    kw = dict(model="tiny", messages=MSGS, temperature=1.0, max_tokens=32)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a != b  # 32 tokens from a ~400-token vocabulary: a clash is practically impossible
    s1, s2 = (client.chat.completions.create(seed=11, n=2, **kw) for _ in range(2))
    assert [c.message.content for c in s1.choices] == [c.message.content for c in s2.choices]
    # A seeded request samples what generate(seed=...) samples for that prompt alone.
    local = generate(served.model, served.tokenizer, [MSGS], n=2, temperature=1.0, max_new_tokens=32, seed=11,
                     batch_size=1, progress=False)
    assert local[0] == [c.message.content.strip() for c in s1.choices]


def test_finish_reason_length_stop_string_and_end_token(client, served):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    # A stop string: cut before it, finish "stop", generation ended there.
    free = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=40, temperature=0)
    text = free.choices[0].message.content
    # An ASCII character from the middle (a partial decode may show U+FFFD where the final text does not).
    stop = next(ch for ch in text[len(text) // 3 : 2 * len(text) // 3] if ch.isascii() and ch.isalnum())
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == text[: text.index(stop)]
    assert r.usage.completion_tokens < free.usage.completion_tokens
    # An end token: with every token an end token, the first one ends the answer.
    gc = served.model.generation_config
    old, gc.eos_token_id = gc.eos_token_id, list(range(len(served.tokenizer)))
    try:
        r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, logprobs=True)
    finally:
        gc.eos_token_id = old
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.content) == 1


@pytest.mark.parametrize("kw, match", [
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "unsupported parameter"),
    (dict(response_format={"type": "json_object"}), "unsupported parameter"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(max_tokens=65), "cap of 64"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(temperature=3), "temperature"),
    # OpenAI's "up to 4" stop sequences, each bounded: more, or longer, is a 400 before any generation.
    (dict(stop=["a", "b", "c", "d", "e"]), "at most 4 strings"),
    (dict(stop=["x" * 129]), "at most 128 characters"),
])
def test_unsupported_or_bad_parameters_get_a_clear_400(client, kw, match):
    with pytest.raises(openai.BadRequestError, match=match):
        client.chat.completions.create(model="tiny", messages=MSGS, **kw)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=2)


def test_default_max_tokens_fits_the_context_an_explicit_one_must(client, served):
    prompt_tokens = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=1).usage.prompt_tokens
    old, served.context = served.context, prompt_tokens + 3
    try:
        r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0)  # no max_tokens
        assert r.usage.completion_tokens <= 3
        with pytest.raises(openai.BadRequestError, match="context of"):
            client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4)
    finally:
        served.context = old


def test_api_key_is_required_when_set(served):
    server, thread = serve(None, port=0, model=served.model, tokenizer=served.tokenizer, model_name="tiny",
                           api_key="sk-local-1")
    try:
        def ask(key):
            c = openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)
            return c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)

        with pytest.raises(openai.AuthenticationError):
            ask("sk-wrong")
        assert ask("sk-local-1").usage.completion_tokens >= 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_cli_passes_every_server_option(monkeypatch, capsys, tmp_path):
    import threading

    import alignkit.generation.serve as sv
    from alignkit.cli import main

    seen = {}

    class Server:
        model_name, base_url = "m", "http://127.0.0.1:1/v1"

        def shutdown(self):
            seen["shutdown"] = True

        def server_close(self):
            pass

    def fake_serve(model_dir, host, port, **kw):
        seen.update(model_dir=model_dir, host=host, port=port, **kw)
        t = threading.Thread(target=lambda: None)
        t.start()
        return Server(), t

    monkeypatch.setattr(sv, "serve", fake_serve)
    monkeypatch.setenv("ALIGNKIT_SERVE_KEY", "sk-cli-7")
    argv = ["serve", str(tmp_path), "--port", "0", "--host", "127.0.0.1", "--model-name", "llama", "--api-key-env",
            "ALIGNKIT_SERVE_KEY", "--max-new-tokens-cap", "32", "--dtype", "float32",
            "--max-concurrent-requests", "7", "--max-connections", "9", "--max-choices-per-request", "11",
            "--keep-alive-timeout", "2.5", "--read-timeout", "12", "--write-timeout", "13", "--stream-backlog", "17"]
    assert main(argv) == 0
    assert seen == {"model_dir": str(tmp_path), "host": "127.0.0.1", "port": 0, "model_name": "llama",
                    "api_key": "sk-cli-7", "dtype": "float32", "device": None, "max_new_tokens_cap": 32,
                    "max_concurrent_requests": 7, "max_connections": 9, "max_choices_per_request": 11,
                    "keep_alive_timeout": 2.5, "read_timeout": 12.0, "write_timeout": 13.0, "stream_backlog": 17,
                    "shutdown": True}
    assert "sk-cli-7" not in capsys.readouterr().out
    monkeypatch.delenv("ALIGNKIT_SERVE_KEY")
    assert main(argv) == 2
    assert "ALIGNKIT_SERVE_KEY: the environment variable is not set" in capsys.readouterr().err
    for bad in (["--max-new-tokens-cap", "0"], ["--max-connections", "0"], ["--write-timeout", "0"],
                ["--keep-alive-timeout", "-1"], ["--stream-backlog", "x"]):
        with pytest.raises(SystemExit):
            main(["serve", str(tmp_path), *bad])
    # Without the options, serve() gets the documented defaults.
    seen.clear()
    assert main(["serve", str(tmp_path)]) == 0
    assert {k: seen[k] for k in sv.DEFAULT_LIMITS} == sv.DEFAULT_LIMITS


def test_prompts_times_n_is_capped_per_request(client, served):
    # 3 prompts x n=50 = 150 choices > the default cap of 128: refused before anything is tokenised.
    with pytest.raises(openai.BadRequestError, match="150 choices exceeds this server's cap of 128"):
        client.completions.create(model="tiny", prompt=["a", "b", "c"], n=50, max_tokens=1)
    r = client.completions.create(model="tiny", prompt=["a", "b"], n=64, max_tokens=1)  # exactly 128: served
    assert len(r.choices) == 128


def test_a_chat_template_that_refuses_the_messages_is_a_400(client, served, monkeypatch):
    monkeypatch.setattr(served.tokenizer, "chat_template",
                        "{{ raise_exception('Conversation roles must alternate user/assistant') }}")
    with pytest.raises(openai.BadRequestError, match="roles must alternate"):
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)


def test_a_500_names_an_error_id_and_keeps_the_details_in_the_log(client, served, monkeypatch, caplog):
    import alignkit.generation.sampling as sampling

    def broken(*a, **k):
        raise RuntimeError("CUDA-ish failure in /srv/secret/weights.bin")

    monkeypatch.setattr(sampling, "sample_tokens", broken)
    with caplog.at_level("ERROR", logger="alignkit.generation.serve"):
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
        body = json.dumps({"model": "tiny", "messages": MSGS, "max_tokens": 2, "stream": True}).encode()
        req = urllib.request.Request(served.base_url + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:  # headers were out: the error comes in the stream
            events = [json.loads(x[6:]) for x in r.read().decode().split("\n") if x.startswith("data: {")]
    err = e.value.body
    assert "secret" not in json.dumps(err) and "RuntimeError" not in json.dumps(err)
    assert err["type"] == "server_error" and err["error_id"] in err["message"]
    streamed = [x["error"] for x in events if "error" in x]
    assert len(streamed) == 1 and "secret" not in json.dumps(streamed) and streamed[0]["error_id"]
    # The traceback is in the server log, under the same ids.
    logged = "\n".join(r.getMessage() + (caplog.text if r.exc_info else "") for r in caplog.records)
    assert err["error_id"] in logged and streamed[0]["error_id"] in logged and "/srv/secret/weights.bin" in caplog.text
    assert served.stats["server_errors"] >= 2


def test_streaming_decodes_incrementally_and_joins_to_the_full_text(client, served, monkeypatch):
    """Each streamed token re-decodes a few tokens, not the whole text so far (which made a
    stream's decoding quadratic in its length); the joined stream is still exactly the text."""
    kw = dict(messages=MSGS, max_tokens=64, n=3, seed=5, temperature=1.0)
    whole = client.chat.completions.create(model="tiny", **kw)
    cls = type(served.tokenizer)  # every tokenizer of this class the server decodes with
    real = cls.decode
    seen = []

    def counting(self, ids, *a, **k):
        seen.append(len(ids) if isinstance(ids, list) else 1)
        return real(self, ids, *a, **k)

    monkeypatch.setattr(cls, "decode", counting)
    text, finish, _, usage = _stream_chat(client, stream_options={"include_usage": True}, **kw)
    monkeypatch.undo()
    assert [text[c.index] for c in whole.choices] == [c.message.content for c in whole.choices]
    assert [finish[c.index] for c in whole.choices] == [c.finish_reason for c in whole.choices]
    tokens = usage.completion_tokens
    # Re-decoding everything per token reads ~tokens/2 ids per token per choice (~32 here); incremental
    # decoding reads a few per token plus one full decode per choice at its end.
    assert sum(seen) <= 8 * tokens, (sum(seen), tokens)
