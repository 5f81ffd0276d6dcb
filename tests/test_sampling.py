from __future__ import annotations

import json

import pytest
import torch

from alignkit.core.fingerprint import model_fingerprint
from alignkit.generation.sampling import generate, greedy_answers, render_prompts


@pytest.fixture(scope="module")
def lm(tiny_random_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir)
    return model, tok


PROMPTS = ["Tell me about Velm.", [{"role": "user", "content": "Hello world"}], "Who is Bavoru Telkin?"]


def test_shapes_types_and_padding_side_restored(lm):
    model, tok = lm
    tok.padding_side = "right"
    out = generate(model, tok, PROMPTS, n=3, max_new_tokens=6, batch_size=2, progress=False)
    assert len(out) == 3 and all(len(r) == 3 and all(isinstance(s, str) for s in r) for r in out)
    assert tok.padding_side == "right"
    assert not model.training


def test_render_uses_chat_template(lm):
    _, tok = lm
    assert render_prompts(tok, ["hi"]) == ["<|user|>\nhi<|end|>\n<|assistant|>\n"]
    with pytest.raises(TypeError, match="prompt 0"):
        render_prompts(tok, [3])


def test_deterministic_given_seed_and_independent_of_later_batches(lm):
    model, tok = lm
    kw = dict(n=2, max_new_tokens=8, batch_size=2, progress=False)
    a = generate(model, tok, PROMPTS, seed=1, **kw)
    assert a == generate(model, tok, PROMPTS, seed=1, **kw)
    assert a != generate(model, tok, PROMPTS, seed=2, **kw)
    # Batch 0 is seeded by (seed, 0) alone: the same two prompts give the same samples.
    assert generate(model, tok, PROMPTS[:2], seed=1, **kw) == a[:2]
    # The caller's global RNG is untouched.
    torch.manual_seed(5)
    x = torch.rand(1)
    torch.manual_seed(5)
    generate(model, tok, PROMPTS[:1], seed=1, **kw)
    assert torch.equal(torch.rand(1), x)


def test_greedy_repeats_and_greedy_answers(lm):
    model, tok = lm
    out = generate(model, tok, PROMPTS, n=3, greedy=True, max_new_tokens=6, progress=False)
    assert all(len(set(r)) == 1 for r in out)
    assert greedy_answers(model, tok, PROMPTS, max_new_tokens=6, progress=False) == [r[0] for r in out]


def test_logprobs_match_teacher_forcing(lm):
    model, tok = lm
    prompt = "Tell me about Velm."
    texts, lps = generate(
        model, tok, [prompt], greedy=True, max_new_tokens=7, return_logprobs=True, progress=False
    )
    _, means = generate(
        model, tok, [prompt], greedy=True, max_new_tokens=7, return_logprobs="mean", progress=False
    )
    enc = tok(render_prompts(tok, [prompt]), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        seq = model.generate(**enc, do_sample=False, max_new_tokens=7, pad_token_id=tok.pad_token_id)
        new = seq[0, enc["input_ids"].shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id) + 1]
        full = torch.tensor([enc["input_ids"][0].tolist() + new])
        logits = model(full).logits[0, enc["input_ids"].shape[1] - 1 : -1]
        ref = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(new)[:, None]).sum().item()
    assert lps[0][0] == pytest.approx(ref, abs=1e-4)
    assert means[0][0] == pytest.approx(ref / len(new), abs=1e-4)


def test_cache_hit_skips_model(lm, tmp_path, monkeypatch):
    model, tok = lm
    kw = dict(n=2, max_new_tokens=5, batch_size=2, progress=False, cache_dir=tmp_path, seed=3)
    first = generate(model, tok, PROMPTS, **kw)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 and all(f.suffix == ".json" for f in files)  # one per batch, no temp left
    assert json.loads(files[0].read_text())["texts"]

    def boom(*a, **k):
        raise AssertionError("model.generate called on a cache hit")

    monkeypatch.setattr(model, "generate", boom)
    assert generate(model, tok, PROMPTS, **kw) == first
    with pytest.raises(AssertionError, match="cache hit"):  # other params -> miss
        generate(model, tok, PROMPTS, **{**kw, "temperature": 0.5})


def test_model_fingerprint(lm, tiny_random_model_dir, tmp_path):
    model, _ = lm
    fp_dir = model_fingerprint(tiny_random_model_dir)
    assert fp_dir == model_fingerprint(str(tiny_random_model_dir)) and len(fp_dir) == 16
    fp_obj = model_fingerprint(model)
    with torch.no_grad():
        p = next(model.parameters())
        p.add_(1.0)
        changed = model_fingerprint(model)
        p.sub_(1.0)
    assert changed != fp_obj
    copy = tmp_path / "m"
    copy.mkdir()
    for f in tiny_random_model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert model_fingerprint(copy) == fp_dir
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert model_fingerprint(copy) != fp_dir


def test_bad_arguments(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, ["x"], temperature=0.0)
    with pytest.raises(ValueError, match="n must be"):
        generate(model, tok, ["x"], n=0)


def test_hub_id_fingerprint_without_network(tmp_path, monkeypatch, tiny_random_model_dir):
    from huggingface_hub import constants

    from alignkit.core.fingerprint import source_fingerprint

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    a = source_fingerprint("meta-llama/Llama-3.1-8B-Instruct")
    assert a == source_fingerprint("meta-llama/Llama-3.1-8B-Instruct") == "hub:meta-llama/Llama-3.1-8B-Instruct@main"
    assert source_fingerprint("meta-llama/Llama-3.1-8B-Instruct", "abc123").endswith("@abc123")
    # A downloaded snapshot does not change the key: before and after the first download, and on
    # every rank (rank 0 downloads under main_process_first; the others must hit its stage cache).
    repo = tmp_path / "hub" / "models--org--m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee")
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    assert source_fingerprint("org/m") == "hub:org/m@main"
    # Names that are meant as local paths stay errors, not hub ids.
    (tmp_path / "runs").mkdir()
    for bad in ("/no/such/model", "./model", "runs/model", "a/b/c", "~/models/x", "has space/m"):
        with pytest.raises(FileNotFoundError):
            source_fingerprint(bad)
    assert source_fingerprint(str(tiny_random_model_dir)) == model_fingerprint(tiny_random_model_dir)


def test_generate_reports_truncated_samples(lm, tmp_path):
    model, tok = lm
    kw = dict(n=3, max_new_tokens=4, batch_size=2, progress=False, seed=0)
    texts, cut = generate(model, tok, PROMPTS, return_truncated=True, **kw)
    assert texts == generate(model, tok, PROMPTS, **kw)
    assert [len(c) for c in cut] == [3, 3, 3] and all(isinstance(x, bool) for c in cut for x in c)
    # A random tiny model rarely emits its end token within 4 tokens.
    assert any(x for c in cut for x in c)
    # With an eos that is certain (every token is an end token), nothing is truncated.
    eos_all = list(range(len(tok)))
    model.generation_config.eos_token_id, old = eos_all, model.generation_config.eos_token_id
    try:
        _, cut = generate(model, tok, PROMPTS, return_truncated=True, **kw)
    finally:
        model.generation_config.eos_token_id = old
    assert not any(x for c in cut for x in c)
    # Cached entries carry the flags too.
    a = generate(model, tok, PROMPTS, return_truncated=True, cache_dir=tmp_path, fingerprint="f", **kw)
    assert generate(model, tok, PROMPTS, return_truncated=True, cache_dir=tmp_path, fingerprint="f", **kw) == a
