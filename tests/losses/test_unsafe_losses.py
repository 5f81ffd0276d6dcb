"""Unlikelihood and gradient-ascent losses (TA-SFT baselines) against naive per-token loops."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import IGNORE_INDEX, UNSAFE_REDUCTIONS, gradient_ascent_loss, unlikelihood_loss


def _batch(seed=0, B=3, T=7, V=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, :3] = IGNORE_INDEX  # a prompt
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # padding
    mask[2, :] = 0  # a row with nothing to train
    return logits, ids, mask


def naive(logits, ids, mask, fn):
    """Per position, with an explicit softmax and Python loops: fn(p_target) or None if skipped."""
    B, T, _ = logits.shape
    rows = []
    for b in range(B):
        vals = []
        for t in range(T - 1):
            y = int(ids[b, t + 1])
            if y == IGNORE_INDEX or not mask[b, t + 1]:
                vals.append(None)
                continue
            p = float(torch.softmax(logits[b, t].double(), -1)[y])
            vals.append(fn(p))
        rows.append(vals)
    return rows


def reduce_naive(rows, reduction):
    flat = [v for r in rows for v in r if v is not None]
    if reduction == "sum":
        return sum(flat)
    if reduction == "token_mean":
        return sum(flat) / max(len(flat), 1)
    seqs = [[v for v in r if v is not None] for r in rows]
    seqs = [s for s in seqs if s]
    return sum(sum(s) / len(s) for s in seqs) / max(len(seqs), 1)


@pytest.mark.parametrize("reduction", [r for r in UNSAFE_REDUCTIONS if r != "none"])
@pytest.mark.parametrize("name", ["ul", "ga"])
def test_losses_match_naive_reference(name, reduction):
    logits, ids, mask = _batch()
    fn, ref = ((unlikelihood_loss, lambda p: -math.log(max(1 - p, 1e-6))) if name == "ul"
               else (gradient_ascent_loss, math.log))
    got = fn(logits, ids, mask, reduction=reduction)
    want = reduce_naive(naive(logits, ids, mask, ref), reduction)
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)  # token_logps computes in float32
    per = fn(logits, ids, mask, reduction="none")
    rows = naive(logits, ids, mask, ref)
    assert per.shape == (3, 6)
    for b in range(3):
        for t in range(6):
            assert float(per[b, t]) == pytest.approx(rows[b][t] or 0.0, rel=1e-5, abs=1e-6)


def test_gradients_finite_and_bounded_vs_unbounded():
    logits, ids, mask = _batch(dtype=torch.float32)
    logits.requires_grad_(True)
    for fn in (unlikelihood_loss, gradient_ascent_loss):
        loss = fn(logits, ids, mask)
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        assert g[2].abs().sum() == 0  # the fully masked row gets no gradient
    # unlikelihood is >= 0 (minimum at p = 0); gradient ascent's objective goes to -inf as p -> 0
    assert unlikelihood_loss(logits, ids, mask).item() >= 0
    far = torch.full_like(logits, -30.0).scatter(2, torch.zeros_like(ids).clamp(min=0).unsqueeze(-1), 30.0)
    ids1 = torch.ones_like(ids)
    assert float(gradient_ascent_loss(far, ids1)) < -50
    assert float(unlikelihood_loss(far, ids1)) < 1e-6


def test_unlikelihood_is_finite_when_the_unsafe_token_is_certain():
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 2] = 200.0  # p(token 2) = 1 in float32
    ids = torch.tensor([[0, 2]])
    v = unlikelihood_loss(logits, ids)
    assert torch.isfinite(v) and float(v) == pytest.approx(-math.log(1e-6), rel=1e-4)


def test_empty_selection_is_zero_not_nan():
    logits, ids, _ = _batch()
    zero = torch.zeros_like(ids)
    for fn in (unlikelihood_loss, gradient_ascent_loss):
        for r in ("sum", "token_mean", "seq_mean"):
            assert float(fn(logits, ids, zero, reduction=r)) == 0.0
    with pytest.raises(ValueError, match="reduction"):
        unlikelihood_loss(logits, ids, reduction="mean")
