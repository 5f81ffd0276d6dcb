"""Shared pieces of the DPO benchmarks (``bench_dpo.py``, ``bench_scaling.py``).

* Models: random, seeded Llamas built locally (no download) with a word-level tokenizer
  in which every word ``w<i>`` is exactly one token, so a row's token count is what the
  generator intended, for alignkit and TRL alike (both add one EOS per completion; no
  chat template, no BOS).
* Data: fixed preference pairs, long-tailed (:func:`pair_lengths`) or fixed-length
  (:func:`fixed_lengths`), written as jsonl ``prompt``/``chosen``/``rejected`` strings.
* FLOPs: :func:`flop_params` / :func:`train_flops` (formula in their docstrings) and the
  machine's measured fp32 matmul rate (:func:`matmul_gflops`).
* Runs: each measured run is a fresh process (:class:`Zygote`), timed the same way for both
  frameworks (:func:`run_alignkit`, :func:`run_trl`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<|pad|>", "<|end|>", "<|unk|>"]

# (a) the tiny-world model's architecture (alignkit/world: vocab 1500, hidden 128, 4 layers, tied);
# (b) the wider model: 6.3M parameters = vocab 4096, hidden 256, 4 layers, untied, with a
#     4x MLP (intermediate 1024) — the 8/3 rule (688) would give 5.3M, not the 6.3M.
MODELS: dict[str, dict] = {
    "tiny": dict(vocab_size=1500, hidden_size=128, intermediate_size=336, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=1024),
    "wide": dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, tie_word_embeddings=False, max_position_embeddings=2048),
}


# ---------------------------------------------------------------- model + tokenizer


def build_tokenizer(vocab_size: int):
    """Word-level tokenizer: specials + words ``w3 … w<vocab_size-1>``, split on whitespace only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   unk_token="<|unk|>")


def build_model(name: str, out: Path, seed: int = 0) -> Path:
    """Save a random, seeded Llama of architecture ``MODELS[name]`` and its tokenizer to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = MODELS[name]
    tok = build_tokenizer(spec["vocab_size"])
    torch.manual_seed(seed)
    cfg = LlamaConfig(**spec, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      rms_norm_eps=1e-6, attention_dropout=0.0)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- data


def pair_lengths(n: int, seed: int = 0, p50: float = 47, p90: float = 118, cap: int = 262,
                 min_len: int = 6) -> list[tuple[int, int, int]]:
    """``(prompt, chosen, rejected)`` token counts of ``n`` long-tailed pairs; completions include EOS.

    prompt+chosen follows a lognormal with the given median and 90th percentile, capped at
    ``cap``, taken at evenly spaced quantiles ``i / (n - 1)`` (not random draws), so the
    percentiles land on target for any ``n``; the longest is ``cap`` (the issue's data has a
    row at its maximum). The order is shuffled by ``seed``. The prompt is 15-45% of the
    sequence; prompt+rejected has the same distribution, paired at random.
    """
    nd = statistics.NormalDist()
    sigma = math.log(p90 / p50) / nd.inv_cdf(0.9)
    edge = 0.5 / n  # the two end quantiles would be 0 and 1 (infinite z)
    qs = [min(max(i / max(n - 1, 1), edge), 1 - edge) for i in range(n)]
    totals = [min(cap, max(min_len, round(p50 * math.exp(sigma * nd.inv_cdf(q))))) for q in qs]
    totals[-1] = cap
    rng = random.Random(seed)
    chosen_totals, rejected_totals = totals[:], totals[:]
    rng.shuffle(chosen_totals)
    rng.shuffle(rejected_totals)
    out = []
    for lc, lr in zip(chosen_totals, rejected_totals):
        p = max(2, min(lc - 2, round(lc * rng.uniform(0.15, 0.45))))
        out.append((p, lc - p, max(2, lr - p)))
    return out


def fixed_lengths(n: int, seq_len: int) -> list[tuple[int, int, int]]:
    """``n`` pairs whose prompt+chosen and prompt+rejected are both exactly ``seq_len`` tokens."""
    p = seq_len // 4
    return [(p, seq_len - p, seq_len - p)] * n


def make_rows(lengths: list[tuple[int, int, int]], vocab_size: int, seed: int = 0) -> list[dict]:
    """Preference rows of random words with exactly the given token counts.

    The completions carry one word fewer than their count: the trainers append EOS. They
    start with a space because TRL tokenises ``prompt + chosen`` as one string.
    """
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(len(SPECIALS), vocab_size)}" for _ in range(k))

    rows = []
    for p, c, r in lengths:
        prompt, chosen, rejected = words(p), words(c - 1), words(r - 1)
        while rejected == chosen:
            rejected = words(r - 1)
        rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def real_tokens(lengths: list[tuple[int, int, int]]) -> int:
    """Non-pad tokens the policy processes for these pairs: (prompt+chosen) + (prompt+rejected)."""
    return sum(2 * p + c + r for p, c, r in lengths)


def percentiles(values: list[float], qs=(50, 90, 100)) -> dict[str, float]:
    """Linear-interpolation percentiles (numpy's default), as ``{"p50": …}``."""
    s = sorted(values)
    out = {}
    for q in qs:
        k = (len(s) - 1) * q / 100
        lo, hi = math.floor(k), math.ceil(k)
        out[f"p{q}"] = s[lo] + (s[hi] - s[lo]) * (k - lo)
    return out


# ---------------------------------------------------------------- FLOPs and the machine


def flop_params(model) -> int:
    """Parameters that cost 2 FLOPs per token in a forward: every parameter except the input
    embedding (a lookup, no FLOPs), plus the LM head (V x d) even when it is tied to the
    embedding (its matmul runs either way; a tied model lists the shared weight once). The norm
    weights are in (elementwise, not matmuls: 0.05% of the wide model's count)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
    return total - emb.numel() + (head.numel() if head is emb else 0)


def train_flops(n_flop_params: int, tokens: int) -> int:
    """Model FLOPs of policy training: ``6 * N * T`` (forward 2NT + backward 4NT) on the real
    (non-pad) tokens. Not counted: the reference forward (2NT when not precomputed, work a
    cached reference avoids), attention score/value products (:func:`attention_flops`),
    padding, norms' and softmax's elementwise work."""
    return 6 * n_flop_params * tokens


def attention_flops(config, seq_lens: list[int]) -> int:
    """Forward+backward FLOPs of the attention products (QK^T and AV) for these sequences:
    3 x 2 products x 2 FLOPs x layers x heads*head_dim x s^2 (full, not causal-halved)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    return 12 * config.num_hidden_layers * width * sum(s * s for s in seq_lens)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> list[float]:
    """fp32 GFLOP/s of ``repeats`` ``n x n`` matmuls (one sample each) at torch's current thread
    count, which is what training uses; callers take the median."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def noise_warning(walls: dict[str, list[float]], limit: float = 1.5) -> str | None:
    """A warning when an arm's repeats disagree by more than ``limit`` x (slowest / fastest wall
    time): the machine's speed changed during the benchmark (other load, or the host throttling
    this VM), and the medians may mix fast and slow runs."""
    bad = [f"{k} {min(v):.1f}-{max(v):.1f} s" for k, v in walls.items() if v and max(v) > limit * min(v)]
    if not bad:
        return None
    return (f"WARNING: repeats disagree by > {limit}x ({'; '.join(bad)}): the machine's speed changed during "
            "the benchmark (other load or host throttling); re-run for trustworthy medians")


def machine_info() -> dict:
    import torch

    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "platform": platform.platform(), "python": platform.python_version(),
            "cuda": torch.cuda.is_available()}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "alignkit"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        out["alignkit_git"] = rev + ("+dirty(alignkit/)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        out["alignkit_git"] = None
    return out


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vm_hwm_mib() -> float:
    """Peak resident set size of this process so far (``VmHWM``), MiB."""
    return _status_mib("VmHWM")


def _threads() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


# ---------------------------------------------------------------- the measured runs
#
# The timed section is the same for both frameworks: from just before the data file, tokenizer
# and model are read (alignkit: its recipe train entry, which does all three) to the end of
# Trainer.train() (a callback's on_train_end). It therefore contains tokenisation, model
# loading, the reference copy or reference pass (TRL precomputes inside DPOTrainer.__init__)
# and the training loop; it excludes imports, process start-up, alignkit's final save and
# eval (eval is off).


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin = self.end = self.cpu_end = self.hwm_end = None
            self.steps: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            self.end, self.cpu_end = time.perf_counter(), _cpu_s()
            self.hwm_end = vm_hwm_mib()

    return Clock()


def _result(t0: float, cpu0: float, clock, losses: list[float], extra: dict) -> dict:
    steps = clock.steps
    wall = clock.end - t0
    # CPU seconds per wall second of the timed section: ~torch threads when the run had the cores to
    # itself; much lower means something else was running.
    return {"wall_s": wall, "setup_s": clock.begin - t0, "loop_s": clock.end - clock.begin,
            "step_s": [b - a for a, b in zip([clock.begin, *steps], steps)], "peak_rss_mib": clock.hwm_end,
            "cpu_cores_used": (clock.cpu_end - cpu0) / wall, "losses": losses, **extra}


def alignkit_config(job: dict) -> dict:
    """The recipe YAML: ``dpo`` at its defaults; only what a benchmark must set is set."""
    train = {"per_device_train_batch_size": job["batch"], "num_train_epochs": 1, "logging_steps": 1,
             "report_to": []}
    if job.get("max_steps"):
        train["max_steps"] = job["max_steps"]
    return {"recipe": "dpo", "seed": 0, "output_dir": str(Path(job["workdir"]) / "run"),
            "model": {"name_or_path": job["model_dir"]}, "data": {"train": {"path": job["data"]}},
            "train": train, "eval": {"enabled": False}}


def run_alignkit(job: dict) -> dict:
    import yaml

    from alignkit.recipes import get_recipe, load_config

    cfg_path = Path(job["workdir"]) / "dpo.yaml"
    cfg_path.write_text(yaml.safe_dump(alignkit_config(job), sort_keys=False), encoding="utf-8")
    clock = _clock()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    cfg = load_config(str(cfg_path))
    run_dir = Path(get_recipe(cfg.recipe).train(cfg, callbacks=[clock]))
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    results_file = run_dir / "train_results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    losses = [m["loss"] for m in metrics if "loss" in m]
    runtime = next((m["train_runtime"] for m in metrics if "train_runtime" in m), None)
    return _result(t0, cpu0, clock, losses, {"train_runtime": runtime, "timings": results.get("timings"),
                                       "global_step": results.get("global_step")})


# fastest: reference log-probs precomputed in __init__ (no reference model kept), no gradient
# checkpointing, fp32. default: DPOConfig's defaults (gradient checkpointing on, a live reference
# model) except bf16: DPOConfig's bf16=True refuses to start on a CPU-only machine ("Your setup
# doesn't support bf16/gpu"), so it is set to False — fp32 like every other run here.
TRL_VARIANTS = {"fastest": {"precompute_ref_log_probs": True, "gradient_checkpointing": False, "bf16": False},
                "default": {"bf16": False}}


def run_trl(job: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    clock = _clock()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    rows = [json.loads(x) for x in Path(job["data"]).read_text(encoding="utf-8").splitlines() if x]
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    extra = {"max_steps": job["max_steps"]} if job.get("max_steps") else {}
    args = DPOConfig(output_dir=str(Path(job["workdir"]) / "trl"), per_device_train_batch_size=job["batch"],
                     learning_rate=job["learning_rate"], num_train_epochs=1, seed=0, logging_steps=1,
                     report_to="none", save_strategy="no", disable_tqdm=True, **extra,
                     **TRL_VARIANTS[job["variant"]])
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[clock])
    trainer.train()
    hist = trainer.state.log_history
    losses = [h["loss"] for h in hist if "loss" in h]
    runtime = next((h["train_runtime"] for h in hist if "train_runtime" in h), None)
    return _result(t0, cpu0, clock, losses, {"train_runtime": runtime, "global_step": trainer.state.global_step,
                                       "bf16": bool(args.bf16),
                                       "gradient_checkpointing": bool(args.gradient_checkpointing),
                                       "precompute_ref_log_probs": bool(args.precompute_ref_log_probs)})


def run_matmul(job: dict) -> dict:
    """A forked run's fp32 matmul rate and thread count: checks that fork left torch's thread pool intact."""
    import torch

    return {"gflops": statistics.median(matmul_gflops()), "threads": torch.get_num_threads()}


RUNNERS = {"alignkit": run_alignkit, "trl": run_trl, "matmul": run_matmul}
# arm -> (framework, TRL variant)
ARMS = {"alignkit": ("alignkit", None), "trl_fastest": ("trl", "fastest"), "trl_default": ("trl", "default")}


def make_job(arm: str, model_dir: Path, data: Path, work: Path, batch: int, lr: float, cache: Path | None = None,
             max_steps: int | None = None) -> dict:
    """A run of ``arm``; every run gets fresh caches (``ALIGNKIT_CACHE`` unless ``cache`` is given)."""
    framework, variant = ARMS[arm]
    return {"framework": framework, "variant": variant, "model_dir": str(model_dir), "data": str(data),
            "batch": batch, "learning_rate": lr, "max_steps": max_steps, "workdir": str(work),
            "result": str(work / "result.json"),
            "env": {"ALIGNKIT_CACHE": str(cache or work / "alignkit_cache"), "HF_DATASETS_CACHE": str(work / "hf_datasets")}}


PRELOAD = {
    # alignkit's entry points only (its internals are changing); the warm-up run teaches the rest.
    "alignkit": ["torch", "transformers", "datasets", "yaml", "alignkit.config", "alignkit.recipes"],
    "trl": ["torch", "transformers", "datasets", "trl", "trl.trainer.dpo_trainer", "trl.trainer.dpo_config"],
}


def _child(job: dict) -> int:
    """One measured run, in a process forked from the zygote: fresh caches, result to a file."""
    work = Path(job["workdir"])
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    log = os.open(work / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)  # the zygote's stdout is the reply channel: keep the trainers' prints off it
    os.dup2(log, 2)
    import tempfile

    tempfile.tempdir = str(work / "tmp")  # datasets' in-memory cache files land here, not in /tmp
    os.environ.update(job.get("env", {}))
    if "HF_DATASETS_CACHE" in os.environ and "datasets" in sys.modules:
        # datasets read the variable when the zygote imported it
        sys.modules["datasets"].config.HF_DATASETS_CACHE = Path(os.environ["HF_DATASETS_CACHE"])
    rss_start = _status_mib("VmRSS")
    before = set(sys.modules)
    try:
        res = RUNNERS[job["framework"]](job)
        res["new_modules"] = sorted(set(sys.modules) - before - {"__main__"})
        code = 0
    except BaseException:  # noqa: BLE001 — reported to the parent, which fails loudly
        res, code = {"error": traceback.format_exc()}, 1
    res["rss_start_mib"], res["peak_rss_exit_mib"] = rss_start, vm_hwm_mib()
    tmp = Path(job["result"]).with_suffix(".part")
    tmp.write_text(json.dumps(res), encoding="utf-8")
    tmp.rename(job["result"])
    return code


_REPLY = "@@zygote "  # marks the zygote's replies among anything else an import may print


def zygote_main(framework: str) -> None:
    """Import ``framework``'s modules once, then fork one child per job read from stdin.

    Importing torch/transformers/TRL/alignkit costs ~12 s of CPU here; each run still gets its
    own process (own heap; its peak RSS starts at the imported footprint, as a fresh process's
    does). The zygote runs no torch op, so fork finds no OpenMP pool to break (the parent checks
    a forked child's matmul rate). Modules a child imported lazily are imported here before the
    next fork, so no measured run pays import time (the parent makes warm-up runs first).
    """
    import importlib
    import warnings

    for m in PRELOAD[framework]:
        importlib.import_module(m)
    print(_REPLY + json.dumps({"ready": True, "threads": _threads()}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        threads = _threads()
        pid = os.fork()
        if pid == 0:
            sys.stdin.close()
            os._exit(_child(job))
        _, status = os.waitpid(pid, 0)
        if Path(job["result"]).exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for m in json.loads(Path(job["result"]).read_text()).get("new_modules", []):
                    try:
                        importlib.import_module(m)
                    except Exception:  # noqa: BLE001 — not importable on its own: the child pays it
                        pass
        print(_REPLY + json.dumps({"rc": os.waitstatus_to_exitcode(status), "threads_at_fork": threads}), flush=True)


class Zygote:
    """Parent-side handle of a :func:`zygote_main` process: ``start`` (non-blocking), then
    ``submit``/``wait`` or ``run`` jobs one at a time."""

    def __init__(self, framework: str, log: Path):
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TQDM_DISABLE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONPATH": str(REPO)}
        self.framework, self.log = framework, Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        code = (f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import dpo_common; "
                f"dpo_common.zygote_main({framework!r})")
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, env=env, cwd=REPO)
        self.fork_threads: list[int] = []
        self._ready = False
        self._job: dict | None = None

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        raise RuntimeError(f"{self.framework} zygote exited (rc {self.proc.wait()}); its log {self.log}:\n{tail}")

    def ready(self) -> Zygote:
        if not self._ready:
            self.fork_threads.append(self._reply()["threads"])
            self._ready = True
        return self

    def submit(self, job: dict) -> None:
        self.ready()
        Path(job["workdir"]).mkdir(parents=True, exist_ok=True)
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        self._job = job

    def wait(self) -> dict:
        job, self._job = self._job, None
        reply = self._reply()
        self.fork_threads.append(reply.get("threads_at_fork", -1))
        path = Path(job["result"])
        res = json.loads(path.read_text()) if path.exists() else {"error": f"no result (reply {reply})"}
        if reply.get("rc") != 0 or "error" in res:
            log = Path(job["workdir"]) / "log.txt"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{self.framework} run failed:\n{res.get('error', reply)}\nlog tail:\n{tail}")
        res.pop("new_modules", None)
        return res

    def run(self, job: dict) -> dict:
        self.submit(job)
        return self.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_zygotes(root: Path, arms: list[str], warm_model: Path, warm_data: Path, batch: int, lr: float,
                  parent_gflops: float) -> tuple[dict[str, Zygote], dict[str, float]]:
    """Start one zygote per framework of ``arms`` (importing at once: unmeasured), check that a
    forked child multiplies as fast as this process, and make one short unrecorded run per arm
    (two at a time: unmeasured) so the zygotes learn the lazy imports. Returns the zygotes and
    the forked children's GFLOP/s."""
    zygotes = {fw: Zygote(fw, root / f"zygote_{fw}.log") for fw in dict.fromkeys(ARMS[a][0] for a in arms)}
    try:
        for z in zygotes.values():
            z.ready()
        forked = {fw: z.run({"framework": "matmul", "workdir": str(root / f"probe_{fw}"),
                             "result": str(root / f"probe_{fw}" / "result.json")})["gflops"]
                  for fw, z in zygotes.items()}
        if min(forked.values()) < 0.7 * parent_gflops:
            print(f"WARNING: forked runs multiply slower ({forked} GFLOP/s) than this process "
                  f"({parent_gflops:.0f}): fork may have broken torch's thread pool; timings are suspect")
        pending = list(arms)
        while pending:
            group, seen = [], set()
            for arm in pending:
                if ARMS[arm][0] not in seen:
                    group.append(arm)
                    seen.add(ARMS[arm][0])
            for arm in group:
                zygotes[ARMS[arm][0]].submit(make_job(arm, warm_model, warm_data, root / "warmup" / arm, batch, lr,
                                                      max_steps=2))
            for arm in group:
                zygotes[ARMS[arm][0]].wait()
                pending.remove(arm)
    except BaseException:
        for z in zygotes.values():
            z.close()
        raise
    return zygotes, forked


def write_json(obj, path: Path) -> Path:
    """Write JSON atomically (temp file + rename): an interrupted benchmark leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
