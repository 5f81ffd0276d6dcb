"""``alignkit`` command line.

    alignkit train CONFIG [key=value ...]        run a recipe (also under accelerate launch)
    alignkit attack CONFIG [key=value ...]       jailbreak evaluation (MES / CR / MBR per target x technique)
    alignkit validate CONFIG [CONFIG ...]        check configs (and that data files parse)
    alignkit preview CONFIG [--rows N]           show which tokens carry loss / mask weight
    alignkit prepare CONFIG                      run a recipe's prepare stages only
    alignkit eval RUN_DIR_OR_CONFIG              evaluate a finished run (or a config's base model)
    alignkit demo [--seed S] [--recipes ...]     the tiny-world demo of every recipe
    alignkit world build [--seed S] [--out DIR]  write the tiny world's datasets and model
    alignkit launch --accelerate-config NAME CONFIG [key=value ...]
    alignkit serve MODEL_DIR [--port P] [--model-name N] [--api-key-env VAR] [--max-new-tokens-cap N]
                                                 OpenAI-compatible server for a local model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def _setup_logging() -> None:
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _close_process_group() -> None:
    """Tear a single process's process group down before the interpreter exits (see
    :func:`_exit_launched_rank` for ranks of a multi-process launch)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _finish_experiment_trackers() -> None:
    """Finish the trackers that flush their uploads only from Python's exit handlers (which
    ``os._exit`` skips): wandb (transformers' callback never calls ``finish``) and comet."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    comet = sys.modules.get("comet_ml")
    if comet is not None and hasattr(comet, "get_running_experiment"):
        exp = comet.get_running_experiment()
        if exp is not None:
            exp.end()


def _exit_launched_rank(code: int) -> None:
    """End a rank of a multi-process launch (``WORLD_SIZE`` > 1) whose run has completed with
    ``os._exit``, after flushing what Python holds. Left to the interpreter's normal exit, the
    C++ destructors of gloo's and DeepSpeed's communication threads run while those threads are
    joinable and abort the rank ("terminate called without an active exception", SIGABRT) after
    the run has completed, and the launcher reports the whole run failed. Tearing the group
    down first was not enough: under ZeRO-3 the other ranks leave while rank 0 still evaluates,
    and one aborted in CI. Every output is already written (atomically) when this runs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        _close_process_group()
        return
    _finish_experiment_trackers()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# What each eval task asks its judge, beyond refusals (alignkit.evaluation.tasks).
_TASK_NEEDS = {"factuality": ("label_sentences",), "qa": ("is_correct",), "safety": ("is_harmful",)}


def check_eval_judge(cfg) -> None:
    """``eval.judge`` checked as a judge spec before any model loads (a typo such as
    ``{backend: hf, model: ...}`` used to pass validation and fail after training)."""
    from alignkit.config import ConfigError
    from alignkit.judges.specs import judge_spec_problems

    if not (cfg.eval.enabled and cfg.eval.datasets):
        return
    sets = [v for k, v in cfg.eval.datasets.items() if cfg.eval.run is None or k in cfg.eval.run]
    needs = tuple(sorted({n for v in sets for n in _TASK_NEEDS.get(v.task, ())}))
    spec = {"backend": "kb", **cfg.eval.judge}
    problems = judge_spec_problems(spec, "eval.judge", cfg.model.name_or_path, needs)
    if problems:
        raise ConfigError("\n".join(problems))


def cmd_train(args) -> int:
    from alignkit.recipes import get_recipe, load_config

    cfg = load_config(args.config, args.overrides)
    check_eval_judge(cfg)
    run_dir = get_recipe(cfg.recipe).train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run complete: {run_dir}")
        m = Path(run_dir) / "metrics.json"
        if m.exists():
            print(m.read_text())
    _exit_launched_rank(0)
    return 0


def cmd_attack(args) -> int:
    from alignkit.attacks.pipeline import run_attack
    from alignkit.attacks.targets import AttackTargetError
    from alignkit.config.attack import load_attack_config
    from alignkit.judges.http import HTTPJudgeError

    cfg = load_attack_config(args.config, args.overrides)
    try:
        print(f"attack results: {run_attack(cfg)}")
    except (AttackTargetError, HTTPJudgeError) as e:  # endpoint down, bad key, timeouts after retries
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_validate(args) -> int:
    from alignkit.config import ConfigError
    from alignkit.config.attack import is_attack_config, load_attack_config
    from alignkit.recipes import load_config

    bad = 0
    for path in args.configs:
        try:
            if is_attack_config(path):  # `alignkit attack` configs (kind: attack)
                load_attack_config(path, args.set or [])
                print(f"ok: {path} (attack)")
                continue
            cfg = load_config(path, args.set or [])
            try:
                check_eval_judge(cfg)
            except ConfigError as e:
                raise ConfigError("\n".join(f"{path}: {line}" for line in str(e).splitlines())) from None
            print(f"ok: {path} (recipe {cfg.recipe})")
        except ConfigError as e:
            bad += 1
            print(str(e), file=sys.stderr)
    return 1 if bad else 0


def cmd_preview(args) -> int:
    from alignkit.config.paths import expand_config
    from alignkit.data import load_rows, tokenize_rows
    from alignkit.models import load_tokenizer
    from alignkit.recipes import get_recipe, load_config

    cfg = load_config(args.config, args.overrides)
    recipe = get_recipe(cfg.recipe)
    expand_config(cfg)
    method = recipe.Method.model_validate(cfg.method)
    weight_fn = None
    if hasattr(method, "gen_num_samples"):  # recipes that build their own pairs from prompts
        from alignkit.stages.pairs import resolve_train_pairs

        resolve_train_pairs(cfg, method)
    if hasattr(recipe, "weights_for"):
        weight_fn = recipe.weights_for(method)
    rows = load_rows(cfg.data.train, recipe.DATA_KIND, cfg.data.max_errors, cfg.data.system_prompt)[: args.rows]
    tok = load_tokenizer(cfg.model)
    toks, _ = tokenize_rows(recipe.DATA_KIND, rows, tok, cfg.data.train.path, cfg.data.max_length,
                            cfg.data.length_policy, weight_fn)
    color = sys.stdout.isatty() and not args.no_color
    print("legend: plain = prompt (no loss)   [[x]] = trained token   {{x}} = completion token with weight 0")
    for t in toks:
        print(f"\n=== row {t['_row']} ===")
        if "input_ids" in t:
            print(render_tokens(tok, t["input_ids"], [None if m == 0 else 1.0 for m in t["completion_mask"]], color))
        else:
            for side in ("chosen", "rejected"):
                w = t[f"{side}_weights"]
                kept = sum(1 for x in w if x > 0)
                print(f"--- {side}: {kept}/{len(w)} completion tokens weighted")
                print(render_tokens(tok, t["prompt_ids"] + t[f"{side}_ids"], [None] * len(t["prompt_ids"]) + w, color))
    return 0


def render_tokens(tok, ids: list[int], weights: list, color: bool) -> str:
    out = []
    for i, w in zip(ids, weights):
        s = tok.decode([i])
        if w is None:
            out.append(s)
        elif w > 0:
            out.append(f"\033[42m{s}\033[0m" if color else f"[[{s}]]")
        else:
            out.append(f"\033[41m{s}\033[0m" if color else f"{{{{{s}}}}}")
    return "".join(out)


def cmd_prepare(args) -> int:
    from alignkit.config.paths import expand_config
    from alignkit.recipes import get_recipe, load_config
    from alignkit.stages.pairs import PairsConfig, build_pairs

    cfg = load_config(args.config, args.overrides)
    method = get_recipe(cfg.recipe).Method.model_validate(cfg.method)
    if not isinstance(method, PairsConfig):
        print(f"recipe {cfg.recipe!r} has no prepare stages", file=sys.stderr)
        return 1
    expand_config(cfg)
    print(build_pairs(cfg, method))
    return 0


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """``alignkit eval RUN_DIR``: load the run's final model and config, evaluate. A recipe
    config instead of a run: its (untrained) model, into ``<output_dir>/base_eval/`` (beside,
    never over, a run's results)."""
    from alignkit.config.paths import expand_config
    from alignkit.evaluation import evaluate_model
    from alignkit.judges import build_eval_judge
    from alignkit.models import load_for_inference
    from alignkit.recipes import load_config

    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").exists():
        cfg = load_config(run_dir / "config.yaml", overrides)
        model_path = str(run_dir / "model") if (run_dir / "model").exists() else cfg.model.name_or_path
        out_dir = run_dir
    else:
        cfg = load_config(run_dir, overrides)
        model_path, out_dir = cfg.model.name_or_path, Path(cfg.output_dir) / "base_eval"
    check_eval_judge(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    expand_config(cfg)
    model, tok = load_for_inference(model_path, cfg.model.dtype)
    judge = build_eval_judge(cfg.eval.judge, cfg.model.name_or_path)
    return evaluate_model(model, tok, cfg.eval, judge, out_dir, seed=cfg.seed)


def cmd_eval(args) -> int:
    print(json.dumps(evaluate_run(args.target, args.overrides), indent=2))
    return 0


def cmd_demo(args) -> int:
    from alignkit.world import numerics

    if numerics.wanted() and not numerics.is_pinned():
        # The demo is the testbed's: it runs in the reproducible numeric mode (README, "The
        # testbed"), which must be in the environment before torch loads, so re-execute.
        os.execve(sys.executable, [sys.executable, "-m", "alignkit", *args.argv], numerics.pinned_env())
    from alignkit.demo import run_demo

    run_demo(seed=args.seed, recipes=args.recipes, out=args.out, seeds=args.seeds, jobs=args.jobs,
             smoke=args.smoke)
    return 0


def cmd_world(args) -> int:
    from alignkit.world import build_command

    print(build_command(args.seed, args.out))
    return 0


def cmd_launch(args) -> int:
    cfg = Path(args.accelerate_config)
    if not cfg.exists():
        cfg = CONFIGS_DIR / "accelerate" / f"{args.accelerate_config}.yaml"
    if not cfg.exists():
        names = sorted(p.stem for p in (CONFIGS_DIR / "accelerate").glob("*.yaml"))
        print(f"unknown accelerate config {args.accelerate_config!r}; shipped: {names}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg)]
    ds_file = _deepspeed_config_file(cfg)
    if ds_file is not None:
        cmd += ["--deepspeed_config_file", ds_file]
    if args.num_processes:
        cmd += ["--num_processes", str(args.num_processes)]
    cmd += ["-m", "alignkit", "train", args.config, *args.overrides]
    print("exec:", " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)
    return 0  # unreachable


def _deepspeed_config_file(accelerate_config: Path) -> str | None:
    """The DeepSpeed JSON a shipped accelerate config names, as an absolute path. Those configs
    name it relative to the repository root (``configs/deepspeed/zero3.json``), which accelerate
    resolves against the working directory: launched from anywhere else (a project folder
    with its own data/), every rank failed with "Expected a string path to an existing
    deepspeed config". An explicit ``--deepspeed_config_file`` overrides the config's entry."""
    import yaml

    try:
        conf = yaml.safe_load(accelerate_config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None  # accelerate reports an unreadable config itself
    name = (conf.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if not isinstance(name, str) or Path(name).is_absolute() or Path(name).exists():
        return None
    shipped = CONFIGS_DIR.parent / name
    return str(shipped) if shipped.is_file() else None


def cmd_serve(args) -> int:
    from alignkit.generation.serve import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit", description="Alignment fine-tuning recipes on TRL.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("train", help="run a recipe")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("attack", help="jailbreak evaluation: techniques x targets -> MES / CR / MBR")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    s.set_defaults(fn=cmd_attack)

    s = sub.add_parser("validate", help="validate recipe configs")
    s.add_argument("configs", nargs="+")
    s.add_argument("--set", action="append", help="key=value override applied to every config")
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("preview", help="show tokens carrying loss / mask weight")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--rows", type=int, default=2)
    s.add_argument("--no-color", action="store_true")
    s.set_defaults(fn=cmd_preview)

    s = sub.add_parser("prepare", help="run a recipe's prepare stages only")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("eval", help="evaluate a run dir (or a config's model)")
    s.add_argument("target")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("demo", help="tiny-world demo of every recipe")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seeds", type=int, nargs="*", default=None, help="extra world seeds for the robustness table")
    s.add_argument("--recipes", nargs="*", default=None)
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--jobs", type=int, default=1,
                   help="worker processes (each part: a world build or one recipe section on one seed)")
    s.add_argument("--smoke", action="store_true",
                   help="every section and row on one seed with small budgets and a cold stage cache (a test)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("world", help="the tiny-world testbed")
    ws = s.add_subparsers(dest="world_cmd", required=True)
    b = ws.add_parser("build")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default=None)
    b.set_defaults(fn=cmd_world)

    s = sub.add_parser("launch", help="exec accelerate launch with a shipped config")
    s.add_argument("--accelerate-config", required=True, help="single|ddp|zero2|zero3|fsdp or a path")
    s.add_argument("--num-processes", type=int, default=None)
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_launch)

    from alignkit.generation.serve import (
        add_arguments as serve_arguments,  # standard library only: cheap to import
    )

    s = sub.add_parser("serve", help="OpenAI-compatible server for a local model",
                       description="Serve a local model over /v1/chat/completions, /v1/completions and /v1/models "
                                   "(streaming, logprobs, usage; see README 'Generation backends').")
    serve_arguments(s)
    s.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from alignkit.config import ConfigError
    from alignkit.data import DataError

    _setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.fn(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
