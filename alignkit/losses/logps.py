"""Per-token and per-sequence log-probabilities.

Shifting convention (used everywhere in alignkit): ``logits[:, t]`` is the model's
prediction for ``labels[:, t + 1]``. Inputs are aligned with ``input_ids`` (length T);
outputs of :func:`token_logps` have length T - 1 and position ``t`` holds
``log p(labels[t + 1] | labels[:t + 1])``. Per-token ``weights`` are aligned with
``labels`` (the weight of *the token being predicted*), so they are shifted the same way.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token log-probs ``[B, T-1]``; 0 where the label is ``ignore_index``.

    Computed as ``logit[label] - logsumexp(logits)`` in float32, which avoids
    materialising a second ``[B, T, V]`` log-softmax tensor (the dominant memory cost
    in DPO, ANCHORS §3.1).
    """
    logits = logits[:, :-1, :]
    target = labels[:, 1:]
    valid = target != ignore_index
    safe = target.masked_fill(~valid, 0)
    picked = torch.gather(logits, 2, safe.unsqueeze(-1)).squeeze(-1).float()
    if logits.dtype == torch.float32:
        lse = torch.logsumexp(logits, dim=-1)  # no copy needed
    else:
        # Row by row keeps the float32 upcast of bf16/fp16 logits to one sequence at a time.
        lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    return (picked - lse) * valid


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-sequence weighted sum of next-token log-probs, ``[B]``.

    ``sum_t w[t+1] * log p(labels[t+1] | labels[:t+1])`` over positions whose label is
    not ``ignore_index``; ``weights`` (``[B, T]``, aligned with ``labels``) default to 1.
    """
    per_token = token_logps(logits, labels, ignore_index)
    if weights is not None:
        per_token = per_token * weights[:, 1:].to(per_token.dtype)
    return per_token.sum(-1)


# Reductions of a [B, T-1] per-position loss over valid positions, shared by the token losses.
POSITION_REDUCTIONS = ("none", "sum", "token_mean", "seq_mean")


def reduce_positions(per_pos: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a ``[B, T-1]`` per-position loss over the ``valid`` positions.

    ``none``: the tensor, 0 where not valid; ``sum``; ``token_mean``: mean over valid
    positions; ``seq_mean``: mean over sequences (those with a valid position) of each
    sequence's mean. Empty selections give 0, never NaN."""
    if reduction not in POSITION_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {POSITION_REDUCTIONS}")
    per_pos = torch.where(valid, per_pos, torch.zeros((), dtype=per_pos.dtype, device=per_pos.device))
    if reduction == "none":
        return per_pos
    if reduction == "sum":
        return per_pos.sum()
    if reduction == "token_mean":
        return per_pos.sum() / valid.sum().clamp(min=1)
    counts = valid.sum(-1)
    has = counts > 0
    return (per_pos.sum(-1) / counts.clamp(min=1) * has).sum() / has.sum().clamp(min=1)


def target_logps(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """``log p(ids[n] | ·)`` read from ``logits[rows[n]]``, ``[N]`` in float32.

    ``logits`` ``[K, V]`` holds only the positions that predict a completion token (the
    model's ``logits_to_keep``); several targets may share a row (a shared prompt's last
    token predicts both completions' first tokens). The float32 log-normaliser is taken
    ``chunk_size`` rows at a time, so a bf16 model never holds ``[K, V]`` float32 logits
    at once; each row's normaliser is computed once however many targets read it.
    """
    lse = torch.cat([torch.logsumexp(logits[i:i + chunk_size].float(), dim=-1)
                     for i in range(0, logits.size(0), chunk_size)]) if logits.size(0) else logits.new_zeros(0)
    picked = logits[rows, ids].float()
    return picked - lse[rows]


def sequence_sums(values: torch.Tensor, seq: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Per-sequence sums ``[num_seqs]`` of per-target ``values`` ``[N]`` (``seq`` = owner)."""
    return values.new_zeros(num_seqs).index_add(0, seq, values)
