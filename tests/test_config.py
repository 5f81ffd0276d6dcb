"""Strict configs: unknown keys, wrong types and impossible combinations fail with the field path and a fix."""

from __future__ import annotations

import copy

import pytest
import yaml

from alignkit.config import ConfigError, RunConfig, dump_config, parse_overrides
from alignkit.recipes import load_config

BASE = {"recipe": "dpo", "data": {"train": {"path": "train.jsonl"}}}


def cfg(**sections) -> dict:
    """BASE with ``section={...}`` merged one level deep (``recipe="x"`` replaces)."""
    d = copy.deepcopy(BASE)
    for sec, val in sections.items():
        if isinstance(val, dict) and isinstance(d.get(sec), dict):
            d[sec].update(val)
        else:
            d[sec] = val
    return d


def config_error(raw, overrides=None) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(raw, overrides)
    return str(ei.value)


# ----------------------------------------------------------------------------- valid configs


def test_minimal_config_defaults():
    c = load_config(BASE)
    assert isinstance(c, RunConfig)
    assert c.recipe == "dpo" and c.model.name_or_path == "world:tiny"
    assert c.data.train.path == "train.jsonl" and c.data.train.format == "auto"
    assert c.method == {}
    m = c.method_config()
    assert m.beta == 0.1 and m.loss_type == "sigmoid"


def test_load_from_yaml_file_and_round_trip(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(cfg(method={"beta": 0.2}, train={"learning_rate": 1e-5, "max_steps": 3})))
    c = load_config(p)
    assert c.method == {"beta": 0.2} and c.train.learning_rate == 1e-5 and c.train.max_steps == 3
    q = tmp_path / "dumped.yaml"
    q.write_text(dump_config(c))
    assert load_config(q) == c


def test_file_problems(tmp_path):
    assert "file not found" in config_error(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: dpo\n  model: [unclosed\n")
    assert "invalid YAML" in config_error(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    assert "mapping" in config_error(lst)


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "raw,path,suggestion",
    [
        (cfg(tarin={}), "tarin", "train"),
        (cfg(modle={}), "modle", "model"),
        (cfg(model={"nme_or_path": "x"}), "model.nme_or_path", "name_or_path"),
        (cfg(model={"lora": {"rank": 8, "alpha": 16}}), "model.lora.rank", None),
        (cfg(model={"lora": {"alpah": 16}}), "model.lora.alpah", "alpha"),
        (cfg(data={"max_lenght": 128}), "data.max_lenght", "max_length"),
        (cfg(data={"train": {"path": "x", "colums": {}}}), "data.train.colums", "columns"),
        (cfg(eval={"max_new_token": 3}), "eval.max_new_token", "max_new_tokens"),
        (cfg(method={"bta": 0.1}), "method.bta", "beta"),
        (cfg(recipe="mask_dpo", method={"on_mask_mismatc": "drop"}), "method.on_mask_mismatc", "on_mask_mismatch"),
    ],
)
def test_unknown_key_names_path_and_suggests(raw, path, suggestion):
    msg = config_error(raw)
    assert f"'{path}'" in msg
    assert "unknown" in msg
    if suggestion:
        assert f"did you mean '{suggestion}'" in msg


def test_unknown_train_key_names_path_and_suggests():
    msg = config_error(cfg(train={"learnin_rate": 1e-5}))
    assert "did you mean 'learning_rate'" in msg
    assert "learnin_rate" in msg
    assert "'train.learnin_rate'" in msg  # the full field path, like every other section


def test_every_unknown_train_key_is_reported():
    msg = config_error(cfg(train={"foo_bar": 1, "learnin_rate": 1e-5}))
    assert "foo_bar" in msg
    assert "learnin_rate" in msg and "did you mean 'learning_rate'" in msg


def test_unknown_key_inside_eval_dataset_suggests():
    msg = config_error(cfg(eval={"datasets": {"kb": {"task": "qa", "pth": "x.jsonl"}}}))
    assert "eval.datasets.kb.pth" in msg
    assert "did you mean 'path'" in msg


def test_training_arguments_field_passes_through():
    c = load_config(cfg(train={"optim": "adamw_torch", "adam_beta2": 0.95, "lr_scheduler_kwargs": {"a": 1}}))
    assert c.train.model_extra == {"optim": "adamw_torch", "adam_beta2": 0.95, "lr_scheduler_kwargs": {"a": 1}}
    assert c.train.optim == "adamw_torch"


# ----------------------------------------------------------------------------- types and combinations


@pytest.mark.parametrize(
    "raw,path",
    [
        (cfg(train={"learning_rate": "fast"}), "train.learning_rate"),
        (cfg(train={"per_device_train_batch_size": 2.5}), "train.per_device_train_batch_size"),
        (cfg(train={"learning_rate": -1.0}), "train.learning_rate"),
        (cfg(data={"max_length": "long"}), "data.max_length"),
        (cfg(data={"length_policy": "cut"}), "data.length_policy"),
        (cfg(model={"dtype": "fp32"}), "model.dtype"),
        (cfg(model={"lora": {"r": 0}}), "model.lora.r"),
        (cfg(seed="zero"), "seed"),
        (cfg(method={"beta": "high"}), "method.beta"),
        (cfg(method={"loss_type": "kto"}), "method.loss_type"),
    ],
)
def test_wrong_type_names_the_field(raw, path):
    msg = config_error(raw)
    assert f"field '{path}'" in msg


def test_qlora_without_lora_fails():
    msg = config_error(cfg(model={"quantization": {"load_in_4bit": True}}))
    assert "model" in msg and "LoRA" in msg and "model.lora" in msg
    c = load_config(cfg(model={"quantization": {}, "lora": {}}))
    assert c.model.lora.r == 16 and c.model.quantization.quant_type == "nf4"


def test_bf16_and_fp16_together_fail():
    msg = config_error(cfg(train={"bf16": True, "fp16": True}))
    assert "bf16" in msg and "fp16" in msg and "train" in msg
    assert load_config(cfg(train={"bf16": True})).train.bf16


def test_unknown_recipe_suggests():
    msg = config_error(cfg(recipe="mask_dop"))
    assert "field 'recipe'" in msg and "did you mean 'mask_dpo'" in msg
    assert "available" in msg


def test_missing_recipe():
    assert "recipe" in config_error({"data": {"train": {"path": "x"}}})


def test_training_needs_data_train():
    assert "data.train" in config_error({"recipe": "dpo"})


def test_method_validated_by_recipe_schema():
    assert "field 'method.beta'" in config_error(cfg(method={"beta": -1}))
    assert "field 'method.beta'" in config_error(cfg(method={"beta": 0}))
    assert "method.label_smoothing" in config_error(cfg(method={"label_smoothing": 0.5}))
    # a key of another recipe's schema is unknown here
    msg = config_error(cfg(method={"on_mask_mismatch": "drop"}))
    assert "method.on_mask_mismatch" in msg and "unknown" in msg
    assert load_config(cfg(recipe="mask_dpo", method={"on_mask_mismatch": "drop"})).method_config().on_mask_mismatch \
        == "drop"


@pytest.mark.parametrize("recipe", ["dpo", "mask_dpo"])
def test_label_smoothing_with_ipo_fails(recipe):
    msg = config_error(cfg(recipe=recipe, method={"label_smoothing": 0.1, "loss_type": "ipo"}))
    assert "method.label_smoothing" in msg and "sigmoid" in msg
    assert load_config(cfg(recipe=recipe, method={"label_smoothing": 0.1})).method["label_smoothing"] == 0.1


def test_mask_dpo_unknown_sentence_splitter():
    msg = config_error(cfg(recipe="mask_dpo", method={"sentence_splitter": "nltk_punkt"}))
    assert "method.sentence_splitter" in msg and "regex" in msg


def test_all_errors_of_one_config_reported_together():
    raw = cfg(
        model={"nme_or_path": "x"},
        data={"max_length": "long"},
        eval={"temperature": -1},
        train={"learnin_rate": 1e-5},
        method={"bta": 0.1},
    )
    msg = config_error(raw)
    for part in ("model.nme_or_path", "data.max_length", "eval.temperature", "learnin_rate", "method.bta"):
        assert part in msg, part


def test_structural_errors_reported_together():
    """Without the method section involved, pydantic's own errors all come back at once."""
    msg = config_error(cfg(model={"nme_or_path": "x", "dtype": "fp8"}, data={"max_length": "long"}, tarin={}))
    for part in ("model.nme_or_path", "model.dtype", "data.max_length", "'tarin'"):
        assert part in msg, part
    assert len(msg.splitlines()) >= 4


# ----------------------------------------------------------------------------- overrides


def test_overrides_nested_and_typed():
    c = load_config(BASE, [
        "train.learning_rate=2.5e-5",
        "train.max_steps=7",
        "train.bf16=true",
        "train.report_to=[]",
        "model.name_or_path=/models/llama",
        "model.lora.r=8",
        "model.lora.target_modules=[q_proj, v_proj]",
        "data.padding_free=yes",
        "data.max_length=null",
        "method.beta=0.5",
        "method.loss_type=hinge",
        "eval.datasets.kb.task=qa",
        "eval.datasets.kb.path=kb.jsonl",
        "eval.judge={backend: rules}",  # not the tiny world's kb: the model is not a world model
        "seed=3",
    ])
    assert c.train.learning_rate == 2.5e-5 and c.train.max_steps == 7 and c.train.bf16 is True
    assert c.train.report_to == []
    assert c.model.name_or_path == "/models/llama"
    assert c.model.lora.r == 8 and c.model.lora.target_modules == ["q_proj", "v_proj"]
    assert c.data.padding_free is True and c.data.max_length is None
    assert c.data.train.path == "train.jsonl"  # sibling keys kept
    assert c.method == {"beta": 0.5, "loss_type": "hinge"}
    assert c.eval.datasets["kb"].path == "kb.jsonl" and c.seed == 3


def test_override_replaces_file_value(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(cfg(train={"learning_rate": 1e-5, "max_steps": 3})))
    c = load_config(p, ["train.max_steps=10"])
    assert c.train.max_steps == 10 and c.train.learning_rate == 1e-5


def test_override_value_with_equals_sign_and_strings():
    ((k, v),) = parse_overrides(["data.system_prompt=a=b"])
    assert (k, v) == ("data.system_prompt", "a=b")
    assert load_config(BASE, ["data.system_prompt=Be brief."]).data.system_prompt == "Be brief."
    # YAML typing: a value with ": " needs quotes, as in a YAML file
    assert load_config(BASE, ["data.system_prompt='Be brief: yes'"]).data.system_prompt == "Be brief: yes"


def test_override_errors_name_the_field():
    assert "field 'train.learning_rate'" in config_error(BASE, ["train.learning_rate=fast"])
    assert "did you mean 'max_length'" in config_error(BASE, ["data.max_lenght=10"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(BASE, ["train.learning_rate"])


def test_scientific_notation_is_a_number_for_passthrough_fields(tmp_path):
    """``1e-8`` is a float, also for TrainingArguments fields alignkit does not type itself."""
    c = load_config(BASE, ["train.adam_epsilon=1e-8"])
    assert c.train.model_extra["adam_epsilon"] == pytest.approx(1e-8)
    assert isinstance(c.train.model_extra["adam_epsilon"], float)
    p = tmp_path / "r.yaml"
    p.write_text("recipe: dpo\ndata:\n  train:\n    path: x.jsonl\ntrain:\n  adam_epsilon: 1e-8\n")
    assert isinstance(load_config(p).train.model_extra["adam_epsilon"], float)


def test_train_keys_alignkit_sets_are_rejected_with_where_to_set_them():
    from alignkit.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(BASE, ["train.seed=3", "train.save_strategy=epoch", "train.output_dir=x"])
    msg = str(e.value)
    for key, hint in (("seed", "top-level seed"), ("save_strategy", "save_steps"), ("output_dir", "top-level output_dir")):
        assert f"field 'train.{key}': not settable here" in msg and hint in msg


def test_unknown_scheduler_name_fails_at_validation():
    from alignkit.config import ConfigError

    with pytest.raises(ConfigError, match="lr_scheduler_type.*did you mean 'cosine"):
        load_config(BASE, ["train.lr_scheduler_type=cosin"])


# ----------------------------------------------------------------------------- world-only defaults


REAL = "smollm2:135m-instruct"


def test_world_data_paths_and_kb_judge_are_errors_for_a_real_model():
    # ${world} and the kb eval judge used to fall back to the seed-0 tiny world without a word
    err = config_error("recipes/sft.yaml", [f"model.name_or_path={REAL}"])
    assert "field 'data.train.path': ${world} is the tiny world's folder" in err
    assert "field 'eval.datasets.qa_test.path': ${world}" in err
    assert "field 'eval.judge': backend 'kb' is the tiny world's knowledge base" in err
    # the default judge (no eval.judge written) is named as such
    err = config_error(cfg(model={"name_or_path": "/models/llama"},
                           eval={"datasets": {"t": {"task": "qa", "path": "qa.jsonl"}}}))
    assert "field 'eval.judge': the default judge 'kb'" in err and "{backend: rules}" in err


def test_kb_judge_is_fine_where_it_cannot_mislead():
    # a world model; an explicit world_dir; no evaluation
    load_config(cfg(eval={"datasets": {"t": {"task": "qa", "path": "qa.jsonl"}}}))
    load_config(cfg(model={"name_or_path": REAL}, eval={"judge": {"backend": "kb", "world_dir": "/w"},
                                                        "datasets": {"t": {"task": "qa", "path": "qa.jsonl"}}}))
    load_config(cfg(model={"name_or_path": REAL}, eval={"enabled": False,
                                                        "datasets": {"t": {"task": "qa", "path": "q.jsonl"}}}))


def test_rules_eval_judge_without_keywords_cannot_run_a_safety_set():
    raw = cfg(eval={"judge": {"backend": "rules"}, "datasets": {"h": {"task": "safety", "path": "s.jsonl"},
                                                                "q": {"task": "qa", "path": "q.jsonl"}}})
    err = config_error(raw)
    assert "field 'eval.judge': the rules judge detects harmful compliance only with harmful_keywords" in err
    assert "eval.datasets: h)" in err
    raw["eval"]["judge"]["harmful_keywords"] = ["step 1"]
    load_config(raw)
    raw["eval"]["judge"] = {"backend": "rules"}
    raw["eval"]["run"] = ["q"]  # the safety set is defined but not evaluated
    load_config(raw)


def test_real_model_names_are_checked():
    assert load_config(cfg(model={"name_or_path": REAL}, eval={"enabled": False})).model.name_or_path == REAL
    err = config_error(cfg(model={"name_or_path": "smollm2:1.7b"}))
    assert "field 'model.name_or_path'" in err and "available: smollm2:135m-instruct" in err
