"""Token-level losses on unsafe responses: the TA-SFT baselines (issue #8).

Both act on a teacher-forced unsafe response ``ỹ`` (the tokens a model should move away
from) and use the shifting convention of :func:`alignkit.losses.token_logps`:
``logits[:, t]`` predicts ``target_ids[:, t + 1]``; ``target_ids`` / ``mask`` are aligned
with ``input_ids`` and per-position outputs have length ``T - 1``.

* :func:`unlikelihood_loss` — Welleck et al. (ICLR 2020) token unlikelihood,
  ``-log(1 - p_θ(ỹ_t | x, ỹ_<t))``: bounded below by 0, reached when the unsafe token's
  probability is 0; it grows without bound only as that probability goes to 1.
* :func:`gradient_ascent_loss` — ``log p_θ(ỹ_t | ...)`` (the negated NLL). Minimising it
  is gradient ascent on the NLL of unsafe text: unbounded below (→ -∞ as p → 0), the
  objective the bounded EMD term of TA-SFT avoids (ta_sft_emd.md §3(a)).

Reductions are those of :func:`alignkit.losses.semantic_emd`: ``none`` → ``[B, T-1]``
(0 at skipped positions), ``sum``, ``token_mean`` (over kept positions), ``seq_mean``
(mean over sequences with ≥ 1 kept position of their per-token mean); empty selections
give 0, never NaN.
"""

from __future__ import annotations

import torch

from alignkit.losses.logps import IGNORE_INDEX, POSITION_REDUCTIONS, reduce_positions, token_logps  # noqa: F401

UNSAFE_REDUCTIONS = POSITION_REDUCTIONS


def _valid(target_ids: torch.Tensor, mask: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    valid = target_ids[:, 1:] != ignore_index
    if mask is not None:
        if mask.shape != target_ids.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != target_ids shape {tuple(target_ids.shape)}")
        valid = valid & (mask[:, 1:] != 0)
    return valid


def _labels(target_ids: torch.Tensor, valid: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # token_logps skips ignore_index only; the mask is folded in here.
    shifted = torch.cat([target_ids[:, :1], target_ids[:, 1:].masked_fill(~valid, ignore_index)], dim=1)
    return shifted


def unlikelihood_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "token_mean",
    eps: float = 1e-6,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Token unlikelihood ``-log(1 - p(ỹ_t))`` per position (Welleck et al. 2020, eq. 4 with
    the negative candidates = the unsafe token itself), reduced over kept positions.

    ``1 - p`` is computed as ``-expm1(log p)`` (exact near p = 1) and clamped at ``eps``
    so a fully memorised unsafe token gives a large finite loss, not inf.
    """
    if logits.dim() != 3 or target_ids.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B, T, V] and target_ids [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(target_ids.shape)}")
    valid = _valid(target_ids, mask, ignore_index)
    logp = token_logps(logits, _labels(target_ids, valid, ignore_index), ignore_index)
    one_minus_p = (-torch.expm1(logp)).clamp(min=eps)
    return reduce_positions(-torch.log(one_minus_p), valid, reduction)


def gradient_ascent_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "token_mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``log p(ỹ_t)`` per position (= -NLL), reduced over kept positions; minimise it to
    ascend the NLL of the unsafe response. Unbounded below."""
    if logits.dim() != 3 or target_ids.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B, T, V] and target_ids [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(target_ids.shape)}")
    valid = _valid(target_ids, mask, ignore_index)
    logp = token_logps(logits, _labels(target_ids, valid, ignore_index), ignore_index)
    return reduce_positions(logp, valid, reduction)
