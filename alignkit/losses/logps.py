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
    token predicts both completions' first tokens). Forward and backward both work
    ``chunk_size`` rows at a time (:class:`_TargetLogps`): the float32 normaliser and
    softmax of a chunk exist only while that chunk is processed, so neither pass holds a
    float32 ``[K, V]`` tensor for a bf16 model (under plain autograd, ``logsumexp`` would
    keep every chunk's float32 copy for its backward). The gradient is the one ``[K, V]``
    tensor in the logits' dtype that any backward through the logits must produce."""
    return _TargetLogps.apply(logits, rows, ids, max(int(chunk_size), 1))


class _TargetLogps(torch.autograd.Function):
    # d log p(y_n | row k) / d z_k = onehot(y_n) - softmax(z_k); rows shared by targets sum their terms.

    @staticmethod
    def forward(ctx, logits, rows, ids, chunk):
        k = logits.size(0)
        lse = torch.empty(k, dtype=torch.float32, device=logits.device)
        for i in range(0, k, chunk):
            lse[i:i + chunk] = torch.logsumexp(logits[i:i + chunk].float(), dim=-1)
        ctx.save_for_backward(logits, rows, ids, lse)
        ctx.chunk = chunk
        return logits[rows, ids].float() - lse[rows]

    @staticmethod
    def backward(ctx, grad):
        logits, rows, ids, lse = ctx.saved_tensors
        grad = grad.float()
        out = torch.empty_like(logits)
        row_total = torch.zeros(logits.size(0), dtype=torch.float32, device=grad.device).index_add_(0, rows, grad)
        for i in range(0, logits.size(0), ctx.chunk):
            d = torch.exp(logits[i:i + ctx.chunk].float() - lse[i:i + ctx.chunk, None])
            d.mul_(-row_total[i:i + ctx.chunk, None])
            _add_targets(d, rows, ids, grad, i)
            out[i:i + ctx.chunk] = d
        return out, None, None, None


def _add_targets(d: torch.Tensor, rows, ids, grad, start: int) -> None:
    """``d[rows - start, ids] += grad`` for the targets whose row lies in this chunk."""
    sel = (rows >= start) & (rows < start + d.size(0))
    if sel.any():
        d.index_put_((rows[sel] - start, ids[sel]), grad[sel], accumulate=True)


def fused_target_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
                       ids: torch.Tensor, chunk_size: int = 1024, softcap: float | None = None) -> torch.Tensor:
    """:func:`target_logps` of the logits ``softcap(hidden @ weight.T + bias)`` without ever
    forming them: ``hidden`` ``[K, H]`` (the kept positions' final hidden states),
    ``weight`` ``[V, H]`` (the LM head). Each ``chunk_size``-row block of logits is
    projected, normalised and dropped in the forward, and projected again in the backward
    (:class:`_FusedTargetLogps`), so no ``[K, V]`` tensor of any dtype exists; the peak is
    one block. ``softcap``: Gemma-2's ``final_logit_softcapping``,
    ``z = c · tanh(u / c)``."""
    return _FusedTargetLogps.apply(hidden, weight, bias, rows, ids, max(int(chunk_size), 1), softcap)


class _FusedTargetLogps(torch.autograd.Function):

    @staticmethod
    def _logits(h, weight, bias, softcap):
        u = torch.nn.functional.linear(h, weight, bias).float()
        return torch.tanh(u / softcap) * softcap if softcap else u

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, ids, chunk, softcap):
        k = hidden.size(0)
        lse = torch.empty(k, dtype=torch.float32, device=hidden.device)
        picked = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        for i in range(0, k, chunk):
            z = _FusedTargetLogps._logits(hidden[i:i + chunk], weight, bias, softcap)
            lse[i:i + chunk] = torch.logsumexp(z, dim=-1)
            sel = ((rows >= i) & (rows < i + z.size(0))).nonzero().squeeze(-1)
            picked[sel] = z[rows[sel] - i, ids[sel]]
        ctx.save_for_backward(hidden, weight, bias, rows, ids, lse)
        ctx.chunk, ctx.softcap = chunk, softcap
        return picked - lse[rows]

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, rows, ids, lse = ctx.saved_tensors
        chunk, softcap = ctx.chunk, ctx.softcap
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.float()
        row_total = torch.zeros(hidden.size(0), dtype=torch.float32, device=grad.device).index_add_(0, rows, grad)
        gh = torch.empty_like(hidden) if need_h else None
        # Summed over chunks in float32 (one rounding to the weight's dtype at the end).
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for i in range(0, hidden.size(0), chunk):
            h = hidden[i:i + chunk]
            z = _FusedTargetLogps._logits(h, weight, bias, softcap)
            d = torch.exp(z - lse[i:i + chunk, None]).mul_(-row_total[i:i + chunk, None])
            _add_targets(d, rows, ids, grad, i)
            if softcap:  # dz/du = 1 - tanh² = 1 - (z / c)²
                d.mul_(1 - (z / softcap) ** 2)
            del z
            if need_h:
                gh[i:i + chunk] = (d.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                gw.addmm_(d.t(), h.float())
            if need_b:
                gb.add_(d.sum(0))
        return (gh, gw.to(weight.dtype) if need_w else None, gb.to(bias.dtype) if need_b else None,
                None, None, None, None)


def sequence_sums(values: torch.Tensor, seq: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Per-sequence sums ``[num_seqs]`` of per-target ``values`` ``[N]`` (``seq`` = owner)."""
    return values.new_zeros(num_seqs).index_add(0, seq, values)
