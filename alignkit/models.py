"""Load a policy (and, for preference recipes, its reference) with tokenizer.

``world:tiny`` resolves to the built-in testbed model (built on first use, cached).
dtype ``auto`` means bf16 on GPUs that support it and fp32 on CPU — a string model id
in TRL loads in fp32 by default (trl#3168), the biggest avoidable memory cost.
LoRA via peft; QLoRA adds bitsandbytes 4-bit nf4 (works on CPU, slowly). Under LoRA
the reference is the same model with the adapter disabled (no second copy); otherwise
a frozen copy of the initial weights.
"""

from __future__ import annotations

import copy
import logging

import torch

from alignkit.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_path(name_or_path: str) -> str:
    if name_or_path.startswith("world:"):
        from alignkit.world import resolve_world_uri

        return str(resolve_world_uri(name_or_path))
    return name_or_path


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_path(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
    )
    if tok.pad_token is None:
        # A distinct pad id would need new embeddings; padding is always masked, so EOS is safe.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(cfg: ModelConfig, for_training: bool = True):
    """The policy: base weights, optional 4-bit quantisation, optional LoRA adapter."""
    from transformers import AutoModelForCausalLM

    path = resolve_path(cfg.name_or_path)
    dtype = resolve_dtype(cfg.dtype)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization is not None:
        from transformers import BitsAndBytesConfig

        q = cfg.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        )
        if torch.cuda.is_available():
            # 4-bit weights cannot be moved after loading: put each rank's copy on its own GPU
            # now (the default would be cuda:0 on every rank under DDP).
            from accelerate import PartialState

            kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.quantization is not None and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.gradient_checkpointing and for_training:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is not None and for_training:
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora
        model = get_peft_model(
            model,
            LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                       task_type="CAUSAL_LM"),
        )
    return model


def load_reference(cfg: ModelConfig, policy):
    """``None`` under LoRA (the trainer disables the adapter); else a frozen copy of ``policy``."""
    if cfg.lora is not None:
        return None
    ref = copy.deepcopy(policy)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def load_for_inference(path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """A trained run's model (full weights or a LoRA adapter dir) for sampling/eval."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_path(path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype),
                                                     trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if torch.cuda.is_available():
        model = model.to(f"cuda:{torch.cuda.current_device()}")
    return model.eval(), tok
