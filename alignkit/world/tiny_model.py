"""The tiny model: a byte-level BPE tokenizer and a few-million-parameter Llama,
pretrained on the world corpus with a plain torch loop (2 CPU cores, about a minute)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from alignkit.world import vocab as V
from alignkit.world.generate import CHAT_TEMPLATE, SPECIAL_TOKENS, World


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a chat turn starts right after "\n", no phantom space
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                 additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
                                 chat_template=CHAT_TEMPLATE, model_max_length=1024)
    hf.padding_side = "right"  # training default; generation code switches to left
    return hf


def tokenizer_texts(world: World) -> list[str]:
    """Everything the model will plausibly read or write, so it tokenizes compactly."""
    texts = list(world.corpus)
    for rows in world.data.values():
        for r in rows:
            texts += [str(v) for k, v in r.items() if k in ("question", "prompt", "completion", "response",
                                                             "refusal_response")]
    texts += V.REFUSAL_PHRASES * 20
    # every attribute value and name as a frequent word, so each becomes one or two tokens
    words = [v for vals in world.values.values() for v in vals] + [e["name"] for e in world.entities]
    texts += [" " + " ".join(words)] * 20
    return texts


def make_model(tokenizer, settings: dict[str, Any], seed: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    h = int(settings["hidden"])
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=h, intermediate_size=h * 8 // 3 // 16 * 16,
        num_hidden_layers=int(settings["layers"]), num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        max_new_tokens=128, do_sample=False,
    )
    return model


def _pack(docs: list[list[int]], block: int, rng: random.Random) -> list[list[int]]:
    """Shuffle documents and pack them whole (never split) into blocks of <= block tokens,
    so every document is seen from its first token, as at inference time."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    blocks, cur = [], []
    for i in order:
        d = docs[i][:block]
        if len(cur) + len(d) > block:
            blocks.append(cur)
            cur = []
        cur = cur + d
    if cur:
        blocks.append(cur)
    return blocks


def pretrain(model, tokenizer, corpus: list[str], settings: dict[str, Any], seed: int, log=print) -> dict[str, Any]:
    """Plain AdamW + warmup/cosine loop over packed corpus blocks; loss on every token."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    docs = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    block, bs, steps = int(settings["block"]), int(settings["batch_size"]), int(settings["steps"])
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=float(settings["lr"]), betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_at(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        p = (s - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    queue: list[list[int]] = []
    t0, n_tok, losses = time.time(), 0, []
    for step in range(steps):
        while len(queue) < bs:
            queue += _pack(docs, block, rng)
        batch, queue = queue[:bs], queue[bs:]
        width = max(len(b) for b in batch)
        ids = torch.full((bs, width), pad, dtype=torch.long)
        mask = torch.zeros((bs, width), dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, : len(b)] = torch.tensor(b)
            mask[i, : len(b)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        n_tok += int(mask.sum())
        losses.append(loss.item())
        if (step + 1) % 200 == 0 or step == steps - 1:
            log(f"[world] step {step + 1}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                f"{n_tok / (time.time() - t0):.0f} tok/s")
    model.eval()
    return {"final_loss": sum(losses[-50:]) / len(losses[-50:]), "tokens": n_tok,
            "corpus_docs": len(docs), "corpus_tokens": sum(len(d) for d in docs)}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, sample: bool = False,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> list[str]:
    """Chat-templated batched generation (left padding), decoded without special tokens."""
    torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in prompts[i: i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            kw: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
                if sample else {"do_sample": False}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **kw)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [o.strip() for o in out]


def save(model, tokenizer, model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
