"""Judge backed by a local Hugging Face causal LM (greedy decoding of a templated prompt)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from alignkit.judges.prompts import PromptJudge


class HFJudge(PromptJudge):
    """Ask a local chat model each judge question; parse its reply (see ``prompts.py``).

    ``name_or_path``: what every other model loader in alignkit takes — a model folder, or a name
    alignkit resolves (``smollm2:135m-instruct``, ``world:tiny``); loaded with
    ``AutoModelForCausalLM``, no ``trust_remote_code``. Or an already-loaded model, which then needs
    ``tokenizer``. ``model_or_path`` is the same argument under its former name.
    Decoding is greedy through :func:`alignkit.generation.sampling.generate`, so a judge run is
    reproducible and uses the same chat-template rendering as every other sampler.
    """

    name = "hf"

    def __init__(
        self,
        name_or_path: Any = None,
        tokenizer: Any = None,
        prompt_templates: Mapping[str, str] | None = None,
        *,
        max_new_tokens: int = 16,
        batch_size: int = 8,
        system_prompt: str | None = None,
        parse_fallbacks: Mapping[str, Any] | None = None,
        dtype: str = "auto",
        device: str | None = None,
        model_or_path: Any = None,
    ) -> None:
        super().__init__(prompt_templates, system_prompt=system_prompt, parse_fallbacks=parse_fallbacks)
        if (name_or_path is None) == (model_or_path is None):
            raise ValueError("HFJudge: give the judge model as name_or_path (a folder, smollm2:135m-instruct, or a "
                             "loaded model with tokenizer=)" + ("" if name_or_path is None else
                                                                 ", not both name_or_path and model_or_path"))
        model_or_path = name_or_path if name_or_path is not None else model_or_path
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from alignkit.models import resolve_path

            path = resolve_path(str(model_or_path))
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            if device is not None:
                model = model.to(device)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            model = model_or_path
            if tokenizer is None:
                raise ValueError("HFJudge: pass tokenizer= when name_or_path is a loaded model")
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
