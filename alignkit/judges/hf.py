"""Judge backed by a local Hugging Face causal LM (greedy decoding of a templated prompt)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from alignkit.judges.prompts import PromptJudge


class HFJudge(PromptJudge):
    """Ask a local chat model each judge question; parse its reply (see ``prompts.py``).

    ``model_or_path``: a model directory (loaded with ``AutoModelForCausalLM``, no
    ``trust_remote_code``) or an already-loaded model, which then needs ``tokenizer``.
    Decoding is greedy through :func:`alignkit.generation.sampling.generate`, so a judge run is
    reproducible and uses the same chat-template rendering as every other sampler.
    """

    name = "hf"

    def __init__(
        self,
        model_or_path: Any,
        tokenizer: Any = None,
        prompt_templates: Mapping[str, str] | None = None,
        *,
        max_new_tokens: int = 16,
        batch_size: int = 8,
        system_prompt: str | None = None,
        parse_fallbacks: Mapping[str, Any] | None = None,
        dtype: str = "auto",
        device: str | None = None,
    ) -> None:
        super().__init__(prompt_templates, system_prompt=system_prompt, parse_fallbacks=parse_fallbacks)
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=dtype)
            if device is not None:
                model = model.to(device)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model_or_path)
        else:
            model = model_or_path
            if tokenizer is None:
                raise ValueError("HFJudge: pass tokenizer= when model_or_path is a loaded model")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def complete(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        from alignkit.generation.sampling import generate

        out = generate(
            self.model,
            self.tokenizer,
            conversations,
            n=1,
            greedy=True,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            progress=False,
        )
        return [r[0] for r in out]
