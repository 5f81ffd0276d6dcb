"""What every generation engine shares: the engine interface :func:`alignkit.generation.sampling.generate`
dispatches to, and the per-batch and per-prompt seeds (the same on every engine)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def _batch_seed(seed: int, batch_index: int) -> int:
    # Hash rather than seed + index so (seed=0, batch 1) and (seed=1, batch 0) differ.
    digest = hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


BatchResult = tuple[list[list[str]], list[list[float]] | None, list[list[bool]]]


class GenerationBackendError(RuntimeError):
    """A backend could not generate (after retries); names the endpoint, never its key."""


def prompt_seed(batch_seed: int, index: int) -> int:
    """The seed of prompt ``index`` of a batch seeded ``batch_seed``. 31 bits: some servers
    keep request seeds in 32-bit integers."""
    return _batch_seed(batch_seed, index) & 0x7FFFFFFF


class GenerationBackend:
    """What :func:`alignkit.generation.sampling.generate` needs from an engine other than a local HF model.

    ``fingerprint`` identifies the weights and engine in cache keys; ``cache_dir`` is the
    default per-batch cache. :meth:`generate_batches` gets ``(batch index, prompts, batch
    seed)`` jobs and yields ``(batch index, (texts, logprobs, truncated))`` as each batch
    completes, ``n`` entries per prompt, the same shapes as the local path.
    """

    name = "backend"
    fingerprint: str = ""
    cache_dir: Path | None = None

    def check(self, *, greedy: bool, temperature: float, lp_mode: str | bool, logprob_source: str) -> None:
        # Engines report log-probs under the model's own distribution; the temperature-scaled
        # one is only the same thing at temperature 1 (or for greedy, where it is unused).
        if lp_mode and logprob_source == "sampling" and not greedy and temperature != 1.0:
            raise ValueError(f"generation backend {self.name}: logprob_source='sampling' at temperature "
                             f"{temperature} needs the temperature-scaled distribution, which the engine does not "
                             "report; use logprob_source='model' or generation.backend: hf")

    def prompt_keys(self, prompts: Sequence[Any]) -> list[Any]:
        raise NotImplementedError

    def generate_batches(self, jobs: list[tuple[int, list[Any], int]], **kw: Any) -> Iterator[tuple[int, BatchResult]]:
        raise NotImplementedError
