"""CLI behaviour: clear errors before any model loads, earlier runs never clobbered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from alignkit.cli import main
from conftest import toy_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp: Path, cfg: dict, name="c.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_validate_reports_unknown_key_with_suggestion(tmp_path, capsys, tiny_random_model_dir, toy_data):
    cfg = toy_config("dpo", tiny_random_model_dir, toy_data["pref"], tmp_path / "r")
    cfg["train"]["learnin_rate"] = 1e-4
    rc = main(["validate", str(_write(tmp_path, cfg))])
    err = capsys.readouterr().err
    assert rc == 1
    assert "train" in err and "learnin_rate" in err and "did you mean 'learning_rate'" in err


def test_bad_data_fails_before_model_load_and_leaves_no_run_dir(tmp_path, capsys, toy_data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "x", "rejected": "x"}\n{"prompt": "b", "chosen": "y"}\nnot json\n')
    # The model path does not exist: had the model been loaded first, the error would be about it.
    cfg = toy_config("dpo", tmp_path / "no-such-model", bad, tmp_path / "run")
    rc = main(["train", str(_write(tmp_path, cfg))])
    err = capsys.readouterr().err
    assert rc == 2
    assert "row 1" in err and "identical" in err
    assert "row 2" in err and "'rejected'" in err and "missing field" in err
    assert "row 3" in err and "malformed JSON" in err
    assert not (tmp_path / "run").exists()


def test_failed_run_leaves_earlier_run_untouched(tmp_path, capsys, tiny_random_model_dir, toy_data):
    cfg = toy_config("dpo", tiny_random_model_dir, toy_data["pref"], tmp_path / "run", max_steps=1)
    path = _write(tmp_path, cfg)
    assert main(["train", str(path)]) == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    # Same output_dir again: refused, nothing touched.
    assert main(["train", str(path), "train.learning_rate=0.5"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # A run that fails on bad data with overwrite requested: still nothing touched.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "", "rejected": "x"}\n')
    assert main(["train", str(path), f"data.train.path={bad}", "overwrite_output_dir=true"]) == 2
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert before == after


def test_overrides_and_run_dir_contents(tmp_path, tiny_random_model_dir, toy_data):
    cfg = toy_config("mask_dpo", tiny_random_model_dir, toy_data["pref"], tmp_path / "run")
    assert main(["train", str(_write(tmp_path, cfg)), "train.max_steps=3", "method.beta=0.2"]) == 0
    run = tmp_path / "run"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 3 and resolved["method"]["beta"] == 0.2
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert 0 < steps[0]["mask/chosen_masked_frac"] < 1 and 0 < steps[0]["mask/rejected_masked_frac"] < 1
    assert (run / "RUN_COMPLETE").exists() and (run / "model" / "model.safetensors").exists()
    assert json.loads((run / "data_report.json").read_text())["rows_out"] == 16
    assert json.loads((run / "mask_report.json").read_text())["rows_without_usable_annotations"] == 0


def test_preview_marks_masked_tokens(tmp_path, tiny_random_model_dir, toy_data):
    cfg = toy_config("mask_dpo", tiny_random_model_dir, toy_data["pref"], tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "alignkit", "preview", str(_write(tmp_path, cfg)), "--rows", "1",
                        "--no-color"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # Chosen: "They paid $0.50 for it." is a hallucination -> weight 0; rejected: "Really?" is correct -> 0.
    chosen = out.split("--- chosen")[1].split("--- rejected")[0]
    rejected = out.split("--- rejected")[1]
    assert "{{" in chosen and "paid" in chosen.split("{{", 1)[1]
    assert "[[" in chosen and "Velm" in chosen
    assert "{{" in rejected and "Really" in rejected.split("{{", 1)[1]


def test_launch_rejects_unknown_accelerate_config(capsys, tmp_path):
    assert main(["launch", "--accelerate-config", "nope", str(tmp_path / "x.yaml")]) == 2
    assert "single" in capsys.readouterr().err


def test_overwrite_keeps_old_run_until_new_one_completes(tmp_path, tiny_random_model_dir, toy_data):
    from alignkit.recipes import get_recipe, load_config

    cfg = toy_config("dpo", tiny_random_model_dir, toy_data["pref"], tmp_path / "run", max_steps=1)
    get_recipe("dpo").train(load_config(cfg))
    # The overwrite fails after the run dir is set up (tokenizer present, weights missing).
    import shutil

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_random_model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    broken = {**cfg, "model": {"name_or_path": str(no_weights)}, "overwrite_output_dir": True}
    try:
        get_recipe("dpo").train(load_config(broken))
    except Exception:
        pass
    aside = tmp_path / ".run.replaced"
    assert (aside / "RUN_COMPLETE").exists()
    # A successful overwrite removes the set-aside copy.
    get_recipe("dpo").train(load_config({**cfg, "overwrite_output_dir": True}))
    assert (tmp_path / "run" / "RUN_COMPLETE").exists() and not aside.exists()


HEAVY = ("torch", "transformers", "bitsandbytes", "deepspeed", "peft", "trl", "accelerate", "datasets")


def _imports_of(args: list[str]) -> tuple[list[str], str, str]:
    code = ("import sys\nfrom alignkit.cli import main\nrc = main(sys.argv[1:])\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\nsys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return yaml.safe_load(r.stdout.strip().splitlines()[-1]), r.stdout, r.stderr


def test_validate_imports_no_ml_library_and_prints_no_third_party_noise():
    """`alignkit validate` checks every shipped config without torch/transformers/bitsandbytes/DeepSpeed
    (seconds of imports and their warnings); TrainingArguments names come from the source via ast."""
    shipped = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml"))
    heavy, out, err = _imports_of(["validate", *shipped])
    assert heavy == [], f"validate imported {heavy}"
    assert out.count("ok: ") == len(shipped)
    assert err == "", err


def test_training_argument_names_from_source_match_the_import():
    import dataclasses

    from transformers import SchedulerType, TrainingArguments

    from alignkit.core.hf_names import scheduler_names, training_argument_names

    assert training_argument_names() == {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(scheduler_names()) == {x.value for x in SchedulerType}


def test_launch_finds_the_shipped_deepspeed_config_from_any_folder(tmp_path, monkeypatch):
    """The shipped accelerate configs name their DeepSpeed JSON relative to the repository root;
    `alignkit launch --accelerate-config zero3` from a project folder failed on every rank with
    "Expected a string path to an existing deepspeed config"."""
    import os

    import alignkit.cli as cli

    seen = {}
    monkeypatch.setattr(os, "execv", lambda exe, cmd: seen.setdefault("cmd", cmd))
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "--accelerate-config", "zero3", "--num-processes", "2", "x.yaml", "seed=1"]) == 0
    cmd = seen["cmd"]
    ds = cmd[cmd.index("--deepspeed_config_file") + 1]
    assert Path(ds).is_absolute() and Path(ds) == cli.CONFIGS_DIR / "deepspeed" / "zero3.json"
    assert cmd[-5:] == ["-m", "alignkit", "train", "x.yaml", "seed=1"]
    seen.clear()
    main(["launch", "--accelerate-config", "ddp", "x.yaml"])  # no DeepSpeed: nothing added
    assert "--deepspeed_config_file" not in seen["cmd"]


def test_validate_checks_the_eval_judge_spec(tmp_path, capsys, tiny_random_model_dir, toy_data):
    cfg = toy_config("sft", tiny_random_model_dir, toy_data["sft"], tmp_path / "r")
    cfg["eval"] = {"judge": {"backend": "hf", "model": str(tiny_random_model_dir)},
                   "datasets": {"t": {"task": "qa", "path": str(toy_data["sft"])}}}
    rc = main(["validate", str(_write(tmp_path, cfg))])
    err = capsys.readouterr().err
    assert rc == 1 and "field 'eval.judge': judge backend 'hf' takes no ['model']; the model is name_or_path" in err
    cfg["eval"]["judge"] = {"backend": "hf", "name_or_path": str(tiny_random_model_dir)}
    assert main(["validate", str(_write(tmp_path, cfg))]) == 0


def test_a_launched_rank_finishes_its_tracker_before_os_exit(monkeypatch):
    """A completed multi-process run ends with os._exit (no C++ teardown abort), which skips
    Python's exit handlers: a wandb run must be finished first, or its last uploads are lost."""
    import sys
    import types

    import alignkit.cli as cli

    calls = []
    fake = types.SimpleNamespace(run=object(), finish=lambda: calls.append("finish"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli.os, "_exit", lambda code: calls.append(("exit", code)))
    monkeypatch.setattr(cli.logging, "shutdown", lambda: calls.append("logging"))
    cli._exit_launched_rank(0)
    assert calls == ["finish", "logging", ("exit", 0)]
