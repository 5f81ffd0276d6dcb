"""The testbed's reproducible numeric mode: the same float results on every x86-64 CPU.

PyTorch's CPU build picks its float kernels by what the processor offers: ATen's
vectorised kernels (softmax, exp, reductions, the optimiser) by the widest instruction set
it finds (AVX512 on an Intel Xeon, AVX2 on most AMD machines here), MKL's sgemm by its own
dispatch, oneDNN likewise, and every parallel reduction splits by the thread count. So the
tiny world's pretrained model, and every run trained from it, differs in its low bits
between an Intel machine with AVX512-BF16 and an AMD one without, and an assertion about a
learned behaviour can pass on one and fail on the other.

The mode pins each of those choices to what every x86-64 machine here has (AVX2) and to
one thread:

* ``ATEN_CPU_CAPABILITY=avx2``: ATen dispatches its AVX2 kernels (read on first dispatch);
* ``MKL_CBWR=AVX2,STRICT``: MKL's conditional numerical reproducibility, AVX2 code path,
  strict (bitwise) mode (read when MKL initialises);
* ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN (bf16 and some fp32 paths) at most AVX2;
* ``OMP_NUM_THREADS=2``: a fixed thread count (every machine here has two cores), never one
  read off the machine, so no reduction depends on how many cores split it. MKL follows it
  (``torch.set_num_threads`` sets both); ``MKL_NUM_THREADS`` is left unset, since a process
  that lowers its OpenMP threads (a DDP rank, a demo worker) must take MKL's down with them:
  two DDP ranks with two MKL threads each on two cores ran CRaFT's rehearsal stage in 4 min
  instead of 13 s.
  ``alignkit demo --jobs N`` gives each worker ``THREADS // N``, again a constant.

Measured on an Intel Xeon with AVX512-BF16 (seed-0 world build, README "The testbed"): the
mode gives the same weights in repeated builds and at 1 or 2 threads, native kernels give
other weights at each thread count, and the build takes 105 s against 83 s native.

It is for the testbed only: the world build always runs in it (a subprocess with this
environment, :func:`alignkit.world.cache.ensure_tiny`), and ``make test``, ``make demo``
and the test suite set it for everything they run. Users' own runs keep PyTorch's native
kernels. Set ``ALIGNKIT_NUMERICS=native`` to run the tests or the demo without it (their
numbers may then differ from the README's).
"""

from __future__ import annotations

import os
import sys

TESTBED_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "2",
}
THREADS = 2


def build_tag() -> str:
    """Part of a world's cache key: a world built in the mode and one built natively (the
    user opted out) are different worlds."""
    return f"numerics-avx2-t{THREADS}" if wanted() else "native"


def wanted() -> bool:
    """False when the user asked for native kernels (``ALIGNKIT_NUMERICS=native``)."""
    return os.environ.get("ALIGNKIT_NUMERICS", "testbed").lower() != "native"


def pinned_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the testbed mode set."""
    env = dict(os.environ if base is None else base)
    env.update(TESTBED_ENV)
    return env


def is_pinned() -> bool:
    return all(os.environ.get(k) == v for k, v in TESTBED_ENV.items())


def pin_this_process() -> None:
    """Set the mode's variables here. Effective only before torch is imported (MKL reads
    ``MKL_CBWR`` when it initialises, torch the thread count at import), so callers that
    may run after an import re-execute themselves instead (``alignkit demo``)."""
    if "torch" in sys.modules and not is_pinned():
        raise RuntimeError("the testbed numeric mode must be set before torch is imported")
    os.environ.update(TESTBED_ENV)


def describe() -> dict[str, object]:
    """What this process computes with: the mode's variables as set, the kernel level ATen
    actually dispatches to, and the versions that decide the float results."""
    import platform

    import torch

    out: dict[str, object] = {k: os.environ.get(k) for k in TESTBED_ENV}
    out.update({
        "pinned": is_pinned(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_has_avx512_bf16": _cpu_flag("avx512_bf16"),
        "cpu_has_avx2": _cpu_flag("avx2"),
    })
    try:
        import tokenizers
        import transformers

        out.update(transformers=transformers.__version__, tokenizers=tokenizers.__version__)
    except ImportError:  # pragma: no cover - both are hard dependencies
        pass
    return out


def _cpu_flag(flag: str) -> bool | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return flag in line.split()
    except OSError:
        return None
    return None


def weights_digest(model_dir) -> str:
    """sha256 over every tensor of a saved model (name, dtype, shape, bytes, in name order):
    independent of the safetensors header's layout, so only the numbers count."""
    import hashlib
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    tensors = {name: t for f in files for name, t in load_file(str(f)).items()}
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
