"""Semantic Earth Mover's Distance between next-token distributions (TA-SFT, issue #8).

Paper: Lu, Sinha, Varakantham, "Semantic Loss Guided Data Efficient Supervised Fine Tuning
for Safe Responses in LLMs", arXiv 2412.06843 (ICLR 2025). The paper's exact loss and its
"novel lower bound" are NOT public. What is here is the alignkit engineering
reconstruction of methods/ta_sft_emd.md:

* :func:`semantic_emd` — the EXACT EMD against a one-hot target (ta_sft_emd.md §3(a)), an
  identity, not an approximation and not the paper's bound.
* :func:`emd_lower_bound` — a Jensen lower bound for general target distributions
  (ta_sft_emd.md §3(b)); a valid bound, NOT known to be the paper's.

Ground cost: ``c(i, j) = 1 - cos(e_i, e_j) = 1 - ê_i·ê_j`` over L2-normalised token
embeddings ``Ê`` (``[V, d]``). For unit vectors ``1 - ê_i·ê_j = ½‖ê_i - ê_j‖²``, so
``0 <= c <= 2`` and both quantities below lie in ``[0, 2]`` (up to float rounding).

Shifting convention (same as :func:`alignkit.losses.token_logps`): ``logits[:, t]`` is the
model's distribution for ``target_ids[:, t + 1]``. ``target_ids`` and ``mask`` are aligned
with ``input_ids`` (length T); per-position outputs have length ``T - 1`` and position
``t`` holds ``EMD(softmax(logits[:, t]), δ_{target_ids[:, t + 1]})``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from alignkit.losses.logps import IGNORE_INDEX, POSITION_REDUCTIONS, reduce_positions

EMD_REDUCTIONS = POSITION_REDUCTIONS


def normalized_embeddings(
    weight: torch.Tensor, detach: bool = True, dtype: torch.dtype | None = torch.float32
) -> torch.Tensor:
    """Row-wise L2-normalised copy of an embedding matrix ``[V, d]`` (the cost embedding Ê).

    Pass ``model.get_input_embeddings().weight`` or ``model.get_output_embeddings().weight``
    (ta_sft_emd.md §10 ``cost_embedding``). ``detach=True`` (default) gives a frozen copy
    that can be cached for the whole run (§6 step 4); ``detach=False`` keeps the graph to
    the live weight (EMO's instruction-tuning setting). All-zero rows stay zero (their cost
    to every token is then 1). Under ZeRO-3 gather the parameter before calling this.
    """
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(
            f"expected a [vocab, dim] embedding matrix, got shape {tuple(weight.shape)}; under ZeRO-3 "
            "gather it first (deepspeed.zero.GatheredParameters) and cache the detached copy"
        )
    w = weight.detach() if detach else weight
    if dtype is not None:
        w = w.to(dtype)
    out = F.normalize(w, p=2.0, dim=-1)
    # F.normalize never aliases its input, so a detached result is an independent frozen copy.
    return out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax and the P·Ê product in float32 (ta_sft_emd.md §6 notes); float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _onehot_emd_block(logits: torch.Tensor, targets: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """``1 - <Êᵀ softmax(logits), ê_y>`` for a block ``[B, c, V]``; ``targets`` ``[B, c]`` in range.

    Holds exactly one ``[B, c, V]`` probability tensor and one ``[B, c, d]`` product.
    """
    # softmax(dtype=...) upcasts inside the op; the result is the only V-sized tensor kept.
    probs = torch.softmax(logits, dim=-1, dtype=emb.dtype)
    mean_emb = probs @ emb  # μ_P = Êᵀ P, ta_sft_emd.md §3
    # ta_sft_emd.md §3(a): the only coupling into a point mass is π_iy = P_i, hence
    # EMD(P, δ_y) = Σ_i P_i (1 - ê_i·ê_y) = 1 - <μ_P, ê_y>. vecdot avoids a [B, c, d] temporary.
    return 1.0 - torch.linalg.vecdot(mean_emb, emb[targets])


def semantic_emd(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    embeddings: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    reduction: str = "none",
    normalize: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Exact per-position EMD between ``softmax(logits)`` and the one-hot next token.

    ``D_t = Σ_i p_i (1 - cos(e_i, e_y)) = 1 - <Êᵀ p, ê_y>`` (ta_sft_emd.md §3(a), §4) with
    ``p = softmax(logits[:, t])`` and ``y = target_ids[:, t + 1]`` (shifted, as in
    :func:`~alignkit.losses.token_logps`).

    Args:
        logits: ``[B, T, V]``, any float dtype; softmax runs in float32 (float64 if given).
        target_ids: ``[B, T]`` token ids aligned with ``input_ids``; ``ignore_index`` skips.
        embeddings: ``[V, d]`` cost embedding. Row-normalised here unless ``normalize=False``
            (pass the output of :func:`normalized_embeddings` with ``normalize=False`` to
            skip the redundant work). Detached input ⇒ no gradient reaches it.
        mask: optional ``[B, T]`` aligned with ``target_ids``; positions where it is 0 are
            skipped (value 0, no gradient), like ``ignore_index``.
        chunk_size: process this many positions of the sequence at a time, recomputing each
            chunk's probabilities in backward (activation checkpointing), so the fp32
            ``[B, T, V]`` probabilities are never all alive. Same values as unchunked.
        reduction: ``"none"`` → ``[B, T-1]`` (0 at skipped positions); ``"sum"`` → scalar
            sum over kept positions; ``"token_mean"`` → that sum / number of kept positions;
            ``"seq_mean"`` → mean over sequences (with ≥1 kept position) of their per-token
            mean. Empty selections give 0, never NaN.

    Returns float32 (float64 for float64 logits). Maximising it is TA-SFT's unsafe-side term
    (ta_sft_emd.md §4, sign handled by the caller); it is bounded in [0, 2].
    """
    if reduction not in EMD_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {EMD_REDUCTIONS}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}")
    if target_ids.shape != logits.shape[:2]:
        raise ValueError(f"target_ids shape {tuple(target_ids.shape)} != logits[:2] {tuple(logits.shape[:2])}")
    if mask is not None and mask.shape != target_ids.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != target_ids shape {tuple(target_ids.shape)}")
    if embeddings.dim() != 2 or embeddings.shape[0] != logits.shape[-1]:
        raise ValueError(
            f"embeddings must be [vocab={logits.shape[-1]}, dim], got {tuple(embeddings.shape)}; use the "
            "input-embedding or lm_head weight of the model that produced the logits"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")

    cdtype = _compute_dtype(logits.dtype)
    emb = embeddings.to(cdtype)
    if normalize:
        emb = F.normalize(emb, p=2.0, dim=-1)

    # Shift: logits[:, t] predicts target_ids[:, t + 1] (alignkit convention, logps.py).
    shifted = logits[:, :-1, :]
    target = target_ids[:, 1:]
    valid = target != ignore_index
    if mask is not None:
        valid = valid & (mask[:, 1:] != 0)
    safe_target = target.masked_fill(~valid, 0)

    n = shifted.shape[1]
    if chunk_size is None or chunk_size >= n:
        per_pos = _onehot_emd_block(shifted, safe_target, emb)
    else:
        needs_graph = torch.is_grad_enabled() and (logits.requires_grad or emb.requires_grad)
        pieces = []
        for start in range(0, n, chunk_size):
            args = (shifted[:, start:start + chunk_size], safe_target[:, start:start + chunk_size], emb)
            if needs_graph:
                # Recompute the chunk's softmax in backward instead of storing it: only the
                # (view of the) logits and the [B, c] output are saved per chunk.
                pieces.append(checkpoint(_onehot_emd_block, *args, use_reentrant=False))
            else:
                pieces.append(_onehot_emd_block(*args))
        per_pos = torch.cat(pieces, dim=1)
    # torch.where inside, not multiply: a non-finite value at a skipped position must not make the output NaN.
    return reduce_positions(per_pos, valid, reduction)


def emd_lower_bound(
    p: torch.Tensor, q: torch.Tensor, embeddings: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """Jensen lower bound ``½‖Êᵀp - Êᵀq‖²`` on ``EMD_{1-cos}(p, q)`` for general p, q.

    ``p``, ``q``: probability distributions over the last dim ``V`` (same shape ``[..., V]``);
    returns ``[...]`` in float32 (float64 if either input is float64). ta_sft_emd.md §3(b);
    a valid, cheap (O(V·d)) bound — NOT known to be the paper's "novel lower bound".

    Why it is a lower bound (unit-norm rows of Ê): for unit vectors
    ``1 - cos(a, b) = 1 - a·b = ½(‖a‖² + ‖b‖²) - a·b = ½‖a - b‖²``. For any coupling π of
    (p, q), ``x ↦ ½‖x‖²`` is convex, so by Jensen
    ``Σ_ij π_ij ½‖ê_i - ê_j‖² ≥ ½‖Σ_ij π_ij (ê_i - ê_j)‖² = ½‖Êᵀp - Êᵀq‖²``
    (the marginals of π are p and q). The right side does not depend on π, so it bounds the
    minimum over π, i.e. the EMD. With q = δ_y it equals ``½‖μ_p‖² - <μ_p, ê_y> + ½``, which
    is ≤ the exact ``1 - <μ_p, ê_y>`` because ‖μ_p‖ ≤ 1 — for one-hot targets use
    :func:`semantic_emd` instead.
    """
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    if embeddings.dim() != 2 or embeddings.shape[0] != p.shape[-1]:
        raise ValueError(f"embeddings must be [vocab={p.shape[-1]}, dim], got {tuple(embeddings.shape)}")
    cdtype = torch.float64 if torch.float64 in (p.dtype, q.dtype) else torch.float32
    emb = embeddings.to(cdtype)
    if normalize:
        emb = F.normalize(emb, p=2.0, dim=-1)
    # Two [.., d] products rather than one [.., V] difference tensor.
    diff = p.to(cdtype) @ emb - q.to(cdtype) @ emb
    return 0.5 * torch.linalg.vecdot(diff, diff)
