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
    """Per position, with Python loops: fn(logits row as floats, target) or None if skipped."""
    B, T, _ = logits.shape
    rows = []
    for b in range(B):
        vals = []
        for t in range(T - 1):
            y = int(ids[b, t + 1])
            if y == IGNORE_INDEX or not mask[b, t + 1]:
                vals.append(None)
                continue
            vals.append(fn([float(z) for z in logits[b, t]], y))
        rows.append(vals)
    return rows


def naive_ul(z, y):
    """-log(1 - p_y) = log Σ_v e^{z_v} - log Σ_{v≠y} e^{z_v}, in Python floats (shifted by the max)."""
    m = max(z)
    return math.log(sum(math.exp(v - m) for v in z)) - math.log(sum(math.exp(v - m) for i, v in enumerate(z) if i != y))


def naive_ga(z, y):
    m = max(z)
    return z[y] - m - math.log(sum(math.exp(v - m) for v in z))


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
    fn, ref = (unlikelihood_loss, naive_ul) if name == "ul" else (gradient_ascent_loss, naive_ga)
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
    logits[0, 0, 2] = 80.0  # p(token 2) = 1 in float32: 1 - p underflows
    ids = torch.tensor([[0, 2]])
    v = unlikelihood_loss(logits, ids)
    # exact: log(e^80 + 3) - log 3, not a floor at -log(eps)
    assert torch.isfinite(v) and float(v) == pytest.approx(80.0 - math.log(3.0), rel=1e-6)


@pytest.mark.parametrize("gap", [8.0, 16.0, 30.0])
def test_unlikelihood_keeps_pushing_on_memorised_unsafe_tokens(gap):
    """A memorised unsafe token (logit gap 16: 1 - p ≈ 3e-7) is where unlikelihood must push
    hardest; a floor on 1 - p (the old clamp at 1e-6) cut its gradient to exactly 0. The
    gradient must match the float64 one: d/dz_y = p_y, d/dz_v = -(q_v - p_v) for v ≠ y."""
    z64 = torch.zeros(1, 2, 4, dtype=torch.float64)
    z64[0, 0, 1] = gap
    ids = torch.tensor([[0, 1]])
    z = z64.float().requires_grad_(True)
    (g,) = torch.autograd.grad(unlikelihood_loss(z, ids), z)
    p = torch.softmax(z64[0, 0], -1)
    q = torch.softmax(z64[0, 0].masked_fill(torch.arange(4) == 1, float("-inf")), -1)
    want = -(q - p)
    assert float(g[0, 0, 1]) == pytest.approx(float(p[1]), rel=1e-5)  # ≈ 1: push the unsafe logit down
    torch.testing.assert_close(g[0, 0].double(), want, rtol=1e-5, atol=1e-7)
    # -log(1 - p) = log(e^gap + 3) - log 3 exactly (three other tokens at logit 0)
    assert float(unlikelihood_loss(z, ids)) == pytest.approx(gap + math.log1p(3 * math.exp(-gap)) - math.log(3),
                                                             rel=1e-6)


def test_empty_selection_is_zero_not_nan():
    logits, ids, _ = _batch()
    zero = torch.zeros_like(ids)
    for fn in (unlikelihood_loss, gradient_ascent_loss):
        for r in ("sum", "token_mean", "seq_mean"):
            assert float(fn(logits, ids, zero, reduction=r)) == 0.0
    with pytest.raises(ValueError, match="reduction"):
        unlikelihood_loss(logits, ids, reduction="mean")
