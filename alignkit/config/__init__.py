"""Configs: YAML -> strict, typed schemas, checked before any model loads.

* :mod:`~alignkit.config.base` — YAML reading, dotted ``key=value`` overrides, the strict base
  model and field-path error messages;
* :mod:`~alignkit.config.schema` — recipe configs (``RunConfig``: model, data, train, eval,
  generation; the ``method`` section is the recipe's own schema, bound by
  :func:`alignkit.recipes.load_config`);
* :mod:`~alignkit.config.tasks` — each eval task's ``options`` schema;
* :mod:`~alignkit.config.attack` — ``alignkit attack`` configs and the jailbreak task's options;
* :mod:`~alignkit.config.paths` — ``${world}`` in data paths.
"""

from alignkit.config.base import ConfigError, Strict, parse_overrides, read_raw_config, set_dotted, yaml_load
from alignkit.config.schema import (
    DataConfig,
    DataSource,
    EvalConfig,
    EvalSet,
    GenerationConfig,
    LoraConfig,
    ModelConfig,
    PreferenceOptions,
    QuantizationConfig,
    RunConfig,
    TrainConfig,
    common_checks,
    dump_config,
    load_run_config,
    preference_checks,
    unknown_train_keys,
)
from alignkit.config.tasks import TASK_OPTIONS, dualuse_options, qa_options

__all__ = [
    "TASK_OPTIONS", "ConfigError", "DataConfig", "DataSource", "EvalConfig", "EvalSet", "GenerationConfig",
    "LoraConfig", "ModelConfig", "PreferenceOptions", "QuantizationConfig", "RunConfig", "Strict", "TrainConfig",
    "common_checks", "dualuse_options", "dump_config", "load_run_config", "parse_overrides", "preference_checks",
    "qa_options", "read_raw_config", "set_dotted", "unknown_train_keys", "yaml_load",
]
