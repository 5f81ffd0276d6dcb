"""Shared fixtures. Nothing here touches the network.

``tiny_random_model_dir``: a random 2-layer Llama and a byte-level BPE tokenizer with a
chat template, saved with ``save_pretrained`` — for tests that need *a* model, not a
knowledgeable one. ``tiny_world_dir``: the real tiny-world testbed (built once per
machine and cached under ``ALIGNKIT_CACHE``; every test in a run shares it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep runs reproducible and quiet on 2-core machines.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("ALIGNKIT_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "alignkit"))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_random_tiny_model(path: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Hello world. This is a tiny tokenizer for tests!",
        "Dr. Smith paid $3.50 for 2.5 kg of apples. \"Really?\" she asked.\nYes.",
        "The capital of Tarnia is Velm. Bavoru Telkin was born in 1921.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", chat_template=CHAT_TEMPLATE
    )
    cfg = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_random_model_dir(tmp_path_factory) -> Path:
    return build_random_tiny_model(tmp_path_factory.mktemp("tiny_random") / "model")
