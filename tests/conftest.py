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

# The testbed's reproducible numeric mode (alignkit/world/numerics.py): set before torch loads,
# so this process and every CLI subprocess a test starts compute the same bits on every CPU.
from alignkit.world import numerics  # noqa: E402 - standard library only; must precede torch

if numerics.wanted():
    numerics.pin_this_process()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_random_tiny_model(path: Path, seed: int = 0, hidden: int = 32, intermediate: int = 64,
                            kv_heads: int = 2) -> Path:
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
        vocab_size=len(hf_tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
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


@pytest.fixture(scope="session")
def tiny_qlora_model_dir(tmp_path_factory) -> Path:
    """Layer widths real models have (multiples of the 64-element 4-bit block, 32-row groups), so
    bitsandbytes' packed AVX512-BF16 CPU kernel can take every 4-bit layer where the CPU has it."""
    return build_random_tiny_model(tmp_path_factory.mktemp("tiny_qlora") / "model", hidden=128,
                                   intermediate=256, kv_heads=4)


def bnb_cpu_4bit_path() -> str:
    """Which kernel bitsandbytes uses for 4-bit inference on this CPU."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return f"bitsandbytes unavailable ({type(e).__name__})"
    return ("packed AVX512-BF16 kernel (this CPU has avx512_bf16)" if has_avx512bf16()
            else "generic dequantise+matmul kernel (this CPU has no avx512_bf16)")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if "bitsandbytes" in __import__("sys").modules:  # only when a 4-bit test ran
        terminalreporter.write_line(f"bitsandbytes 4-bit CPU inference path exercised: {bnb_cpu_4bit_path()}")


def write_toy_data(d: Path, n: int = 16) -> dict[str, Path]:
    """Tiny preference/SFT files with sentence annotations (for trainer-level tests)."""
    import json

    d.mkdir(parents=True, exist_ok=True)
    pref, sft = [], []
    for i in range(n):
        c1, c2 = f"Person {i} was born in Velm. ", f"They paid ${i}.50 for it."
        r1, r2 = f"Person {i} was born in Tarn. ", "Really?"
        pref.append({"prompt": f"Tell me about person {i}.", "chosen": c1 + c2, "rejected": r1 + r2,
                     "chosen_sentences": [c1, c2], "chosen_labels": ["correct", "hallucination"],
                     "rejected_sentences": [r1, r2], "rejected_labels": ["hallucination", "correct"]})
        sft.append({"prompt": f"Tell me about person {i}.", "completion": c1 + c2})
    paths = {"pref": d / "pref.jsonl", "sft": d / "sft.jsonl"}
    for key, rows in (("pref", pref), ("sft", sft)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    return write_toy_data(tmp_path_factory.mktemp("toy_data"))


def toy_config(recipe: str, model_dir: Path, data: Path, out: Path, **train) -> dict:
    """A minimal config dict for trainer-level tests on the random tiny model."""
    return {
        "recipe": recipe, "output_dir": str(out), "seed": 0,
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": {"path": str(data)}, "max_length": 64},
        "eval": {"enabled": False},
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "report_to": [],
                  "logging_steps": 1, **train},
    }


@pytest.fixture(scope="session")
def tiny_world_dir() -> Path:
    """The real tiny world (seed 0, or ``$ALIGNKIT_WORLD_SEED`` under ``make margins``), built once
    per machine and shared by every test."""
    from alignkit.world import ensure_tiny

    return ensure_tiny(seed=int(os.environ.get("ALIGNKIT_WORLD_SEED", "0")))


def assert_effect(name: str, value: float, bound: float, above: bool = True) -> None:
    """Assert a learned effect (``value > bound``, or ``< bound`` with ``above=False``) and, under
    ``make margins``, record it: that target runs the learned-effect tests on world seeds 0, 1
    and 2 and prints each effect's value beside its bound, so a bound with no margin shows
    before a machine of another kind fails on it."""
    import json

    out = os.environ.get("ALIGNKIT_MARGINS_OUT")
    if out:
        rec = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "effect": name,
               "value": float(value), "bound": float(bound), "above": above,
               "world_seed": int(os.environ.get("ALIGNKIT_WORLD_SEED", "0"))}
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
    ok = value > bound if above else value < bound
    assert ok, f"learned effect '{name}': {value} is not {'>' if above else '<'} {bound}"


def edited_source(obj):
    """The source of a module or function as inspect (hence code_digest) sees it, with one more
    comment: a code change, without touching the file."""
    import contextlib
    import inspect
    import linecache
    import os

    @contextlib.contextmanager
    def ctx():
        f = inspect.getsourcefile(obj)
        linecache.checkcache(f)
        lines = list(linecache.getlines(f))
        if inspect.ismodule(obj):
            lines.append("# edited\n")
        else:
            i = obj.__code__.co_firstlineno - 1
            lines[i] = lines[i].rstrip("\n") + "  # edited\n"
        st = os.stat(f)
        linecache.cache[f] = (st.st_size, st.st_mtime, lines, f)
        try:
            yield
        finally:
            linecache.cache.pop(f, None)

    return ctx()
