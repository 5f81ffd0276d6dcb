"""Token-level losses on unsafe responses: the TA-SFT baselines (issue #8).

Both act on a teacher-forced unsafe response ``ỹ`` (the tokens a model should move away
from) and use the shifting convention of :func:`alignkit.losses.token_logps`:
``logits[:, t]`` predicts ``target_ids[:, t + 1]``; ``target_ids`` / ``mask`` are aligned
with ``input_ids`` and per-position outputs have length ``T - 1``.

* :func:`unlikelihood_loss` — Welleck et al. (ICLR 2020) token unlikelihood,
  ``-log(1 - p_θ(ỹ_t | x, ỹ_<t))``: bounded below by 0, reached when the unsafe token's
  probability is 0; it grows without bound only as that probability goes to 1. ``log(1 - p)``
  is a log-sum-exp over the other tokens (:func:`log_one_minus_p`), exact for memorised tokens.
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


def log_one_minus_p(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log(1 - softmax(logits)[target])`` per position, exactly, in float32 (float64 stays).

    Computed as ``logsumexp`` over the *other* tokens minus ``logsumexp`` over all of them,
    never as ``log(1 - p)``: when the target is memorised (a logit gap of 16 over a few
    tokens gives 1 - p ≈ 3e-7) ``1 - exp(log p)`` rounds to 0 in float32 and any floor on it
    (a clamp) cuts the gradient to exactly 0 — unlikelihood would stop pushing precisely on
    the unsafe tokens the model is most sure of. Here the gradient is ``q_other - p`` (q the
    softmax over the other tokens), finite and non-zero for every p < 1.

    ``logits`` ``[B, N, V]``; ``targets`` ``[B, N]`` in range. One row of float32 logits at a
    time (as :func:`alignkit.losses.token_logps` upcasts bf16), so the extra memory is one
    sequence's ``[N, V]`` copy, not the batch's.
    """
    cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = []
    for row, t in zip(logits, targets):
        z = row.to(cdtype)
        others = z.scatter(-1, t.unsqueeze(-1), float("-inf"))
        out.append(torch.logsumexp(others, dim=-1) - torch.logsumexp(z, dim=-1))
    if not out:
        return logits.new_zeros(targets.shape, dtype=cdtype)
    return torch.stack(out)


def unlikelihood_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "token_mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Token unlikelihood ``-log(1 - p(ỹ_t))`` per position (Welleck et al. 2020, eq. 4 with
    the negative candidates = the unsafe token itself), reduced over kept positions.

    ``log(1 - p)`` comes from :func:`log_one_minus_p` (a log-sum-exp over the other tokens),
    so a memorised unsafe token gives a large, finite loss *with* a gradient; it is +inf only
    when every other token's probability underflows (logit gaps beyond ~100 in float32).
    """
    if logits.dim() != 3 or target_ids.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B, T, V] and target_ids [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(target_ids.shape)}")
    valid = _valid(target_ids, mask, ignore_index)
    safe = target_ids[:, 1:].masked_fill(~valid, 0)
    return reduce_positions(-log_one_minus_p(logits[:, :-1], safe), valid, reduction)


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
