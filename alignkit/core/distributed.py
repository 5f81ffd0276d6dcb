"""Process-group helpers shared by stages, training and evaluation (no torch import until used)."""

from __future__ import annotations

import os
from collections.abc import Callable


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def rank0_first(fn: Callable, timeout_s: float = 1800):
    """``fn()`` on rank 0 first, then on the other ranks, which find its stages cached (under
    a multi-process launch; a plain call otherwise). Stages are single-process loops with no
    collectives, so only the barrier's timeout (``train.ddp_timeout``) bounds rank 0's work.
    Caveat: with accelerate's MULTI_GPU config on a CPU-only machine, ``PartialState`` reports
    no distributed setup before the Trainer starts, so the barrier is a no-op and every rank
    computes the stage itself; outputs are identical and written atomically (provenance
    first, see :func:`run_stage`), so this costs time, not correctness."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from datetime import timedelta

        from accelerate import PartialState

        with PartialState(timeout=timedelta(seconds=timeout_s)).main_process_first():
            return fn()
    return fn()
