"""Loss functions against independent naive references and against TRL's own DPO loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from alignkit.losses import IGNORE_INDEX, LOSS_TYPES, dpo_loss, mask_dpo_loss, sequence_logps, token_logps

# ----------------------------------------------------------------------------- naive references


def naive_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Explicit shift, explicit log_softmax per position, Python loops."""
    B, T, _ = logits.shape
    out = torch.zeros(B, T - 1, dtype=torch.float64)
    for b in range(B):
        for t in range(T - 1):
            target = int(labels[b, t + 1])  # logits at t predict the token at t + 1
            if target == IGNORE_INDEX:
                continue
            out[b, t] = torch.log_softmax(logits[b, t].double(), dim=-1)[target]
    return out


def naive_sequence_logps(logits, labels, weights=None) -> torch.Tensor:
    per_tok = naive_token_logps(logits, labels)
    B, T, _ = logits.shape
    out = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        for t in range(T - 1):
            w = 1.0 if weights is None else float(weights[b, t + 1])
            out[b] += w * per_tok[b, t]
    return out


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def naive_dpo(pc, pr, rc, rr, beta, ls=0.0, loss_type="sigmoid"):
    losses, cr, rr_ = [], [], []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        z = (a - c) - (b - d)
        if loss_type == "sigmoid":
            loss = -(1 - ls) * logsig(beta * z) - ls * logsig(-beta * z)
        elif loss_type == "hinge":
            loss = max(0.0, 1 - beta * z)
        elif loss_type == "ipo":
            loss = (z - 1 / (2 * beta)) ** 2
        else:
            raise AssertionError(loss_type)
        losses.append(loss)
        cr.append(beta * (a - c))
        rr_.append(beta * (b - d))
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(cr, dtype=torch.float64), torch.tensor(
        rr_, dtype=torch.float64)


def naive_mask_dpo(pc, pr, rc, rr, cm, rm, beta, ls=0.0, loss_type="sigmoid"):
    """Per-token loops over [B, T] inputs: masked sums (means for ipo), then the naive DPO formula."""
    B, T = pc.shape
    sums = torch.zeros(4, B, dtype=torch.float64)
    for b in range(B):
        nc = nr = 0
        for t in range(T):
            if cm[b, t]:
                sums[0, b] += float(pc[b, t])
                sums[2, b] += float(rc[b, t])
                nc += 1
            if rm[b, t]:
                sums[1, b] += float(pr[b, t])
                sums[3, b] += float(rr[b, t])
                nr += 1
        if loss_type == "ipo":
            sums[0, b] /= max(nc, 1)
            sums[2, b] /= max(nc, 1)
            sums[1, b] /= max(nr, 1)
            sums[3, b] /= max(nr, 1)
    return naive_dpo(sums[0], sums[1], sums[2], sums[3], beta, ls, loss_type)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- log-probs


def _random_logits_labels(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, -2:] = IGNORE_INDEX  # right padding
    labels[2, 4] = IGNORE_INDEX  # a hole in the middle
    weights = torch.rand(B, T, generator=g)
    return logits, labels, weights


def test_token_logps_matches_naive_loop():
    logits, labels, _ = _random_logits_labels()
    out = token_logps(logits, labels)
    assert out.shape == (3, 6)
    assert out.dtype == torch.float32
    _close(out, naive_token_logps(logits, labels))
    # ignored labels give exactly 0
    assert torch.all(out[0, :2] == 0) and torch.all(out[1, -2:] == 0) and out[2, 3] == 0


def test_token_logps_shift_convention():
    """logits[:, t] predict labels[:, t+1]: make position t certain of labels[t+1]."""
    V, T = 9, 6
    labels = torch.tensor([[4, 1, 7, 2, 0, 8]])
    logits = torch.full((1, T, V), -50.0)
    for t in range(T - 1):
        logits[0, t, labels[0, t + 1]] = 50.0
    # the last position's logits are never used: make them garbage
    logits[0, T - 1] = torch.randn(V) * 100
    out = token_logps(logits, labels)
    assert out.shape == (1, T - 1)
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-6)
    # the un-shifted reading (logits[t] -> labels[t]) would be very unlikely
    logits_unshifted = torch.full((1, T, V), -50.0)
    for t in range(T):
        logits_unshifted[0, t, labels[0, t]] = 50.0
    assert (token_logps(logits_unshifted, labels) < -50).all()


def test_token_logps_bf16_input_computed_in_float32():
    logits, labels, _ = _random_logits_labels(seed=3)
    lb = logits.to(torch.bfloat16)
    out = token_logps(lb, labels)
    assert out.dtype == torch.float32
    _close(out, naive_token_logps(lb.float(), labels), tol=1e-5)


def test_token_logps_gradient_matches_naive():
    logits, labels, _ = _random_logits_labels(seed=4)
    a = logits.clone().double().requires_grad_(True)
    b = logits.clone().double().requires_grad_(True)
    token_logps(a, labels).sum().backward()
    naive = torch.zeros((), dtype=torch.float64)
    for bi in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[bi, t + 1] != IGNORE_INDEX:
                naive = naive + torch.log_softmax(b[bi, t], -1)[labels[bi, t + 1]]
    naive.backward()
    _close(a.grad, b.grad)
    assert torch.all(a.grad[:, -1] == 0)  # the last position predicts nothing


@pytest.mark.parametrize("use_weights", [False, True])
def test_sequence_logps_matches_naive(use_weights):
    logits, labels, weights = _random_logits_labels(seed=1)
    w = weights if use_weights else None
    out = sequence_logps(logits, labels, w)
    assert out.shape == (3,)
    _close(out, naive_sequence_logps(logits, labels, w))


def test_sequence_logps_weights_are_aligned_with_labels():
    """The weight of position t+1 (the predicted token) scales log p(labels[t+1])."""
    logits, labels, _ = _random_logits_labels(seed=2)
    labels = labels.clamp(min=0)
    per_tok = naive_token_logps(logits, labels)
    T = labels.shape[1]
    for k in range(1, T):
        w = torch.zeros_like(labels, dtype=torch.float32)
        w[:, k] = 1.0
        _close(sequence_logps(logits, labels, w), per_tok[:, k - 1])
    # weight on position 0 (never predicted) contributes nothing
    w0 = torch.zeros_like(labels, dtype=torch.float32)
    w0[:, 0] = 1.0
    assert torch.all(sequence_logps(logits, labels, w0) == 0)


# ----------------------------------------------------------------------------- dpo_loss


def _random_logps(seed=0, B=6):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(B, generator=g, dtype=torch.float64) * 40 + 1) for _ in range(4)]


@pytest.mark.parametrize(
    "loss_type,ls,beta",
    [("sigmoid", 0.0, 0.1), ("sigmoid", 0.2, 0.1), ("sigmoid", 0.0, 0.5), ("hinge", 0.0, 0.1),
     ("hinge", 0.0, 1.0), ("ipo", 0.0, 0.1), ("ipo", 0.0, 2.0)],
)
def test_dpo_loss_matches_naive(loss_type, ls, beta):
    pc, pr, rc, rr = _random_logps(seed=hash((loss_type, ls, beta)) % 1000)
    losses, crew, rrew = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls, loss_type=loss_type)
    nl, ncr, nrr = naive_dpo(pc, pr, rc, rr, beta, ls, loss_type)
    assert losses.shape == (6,)
    _close(losses, nl, 1e-8)
    _close(crew, ncr, 1e-10)
    _close(rrew, nrr, 1e-10)


def test_dpo_loss_known_values_and_detached_rewards():
    z0 = torch.zeros(2, requires_grad=True)
    losses, cr, rr = dpo_loss(z0, z0, z0.detach(), z0.detach(), beta=0.1)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    assert not cr.requires_grad and not rr.requires_grad
    # hinge at z=0 is 1; ipo at z=0 is 1/(4 beta^2)
    assert torch.allclose(dpo_loss(z0, z0, z0, z0, beta=0.1, loss_type="hinge")[0], torch.ones(2))
    assert torch.allclose(dpo_loss(z0, z0, z0, z0, beta=0.1, loss_type="ipo")[0], torch.full((2,), 25.0))


def test_dpo_loss_unknown_type():
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(t, t, t, t, loss_type="kto")
    assert set(LOSS_TYPES) >= {"sigmoid", "hinge", "ipo"}


# ----------------------------------------------------------------------------- mask_dpo_loss


def _random_masked(seed=0, B=5, T=9):
    g = torch.Generator().manual_seed(seed)
    t = [-(torch.rand(B, T, generator=g, dtype=torch.float64) * 5) for _ in range(4)]
    cm = (torch.rand(B, T, generator=g) > 0.4).long()
    rm = (torch.rand(B, T, generator=g) > 0.4).long()
    cm[1] = 0  # chosen side fully masked
    rm[2] = 0  # rejected side fully masked
    cm[3] = 0
    rm[3] = 0  # both sides fully masked
    cm[4, 0] = rm[4, 0] = 1  # at least one unmasked token
    return t, cm, rm


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0)])
def test_mask_dpo_loss_matches_naive(loss_type, ls):
    (pc, pr, rc, rr), cm, rm = _random_masked(seed=7)
    beta = 0.3
    losses, crew, rrew = mask_dpo_loss(pc, pr, rc, rr, cm, rm, beta=beta, label_smoothing=ls, loss_type=loss_type)
    nl, ncr, nrr = naive_mask_dpo(pc, pr, rc, rr, cm, rm, beta, ls, loss_type)
    assert torch.isfinite(losses).all()
    _close(losses, nl, 1e-8)
    _close(crew, ncr, 1e-8)
    _close(rrew, nrr, 1e-8)
    # a side with an all-zero mask contributes exactly 0 to its reward
    assert crew[1] == 0 and rrew[2] == 0 and crew[3] == 0 and rrew[3] == 0


def test_mask_dpo_ipo_divides_by_unmasked_counts():
    pc = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    pr = torch.tensor([[-5.0, -6.0, -7.0, -8.0]])
    rc = torch.zeros(1, 4)
    rr = torch.zeros(1, 4)
    cm = torch.tensor([[1, 1, 0, 0]])  # mean -1.5
    rm = torch.tensor([[0, 1, 1, 1]])  # mean -7
    beta = 0.5
    losses, crew, rrew = mask_dpo_loss(pc, pr, rc, rr, cm, rm, beta=beta, loss_type="ipo")
    z = -1.5 - (-7.0)
    assert losses.item() == pytest.approx((z - 1 / (2 * beta)) ** 2)
    assert crew.item() == pytest.approx(beta * -1.5)
    assert rrew.item() == pytest.approx(beta * -7.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_mask_dpo_all_zero_masks_finite_with_finite_grads(loss_type):
    (pc, pr, rc, rr), cm, rm = _random_masked(seed=11)
    pc = pc.clone().requires_grad_(True)
    pr = pr.clone().requires_grad_(True)
    losses, _, _ = mask_dpo_loss(pc, pr, rc, rr, cm, rm, beta=0.1, loss_type=loss_type)
    assert torch.isfinite(losses).all()
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    # row 3 has both sides masked: z = 0 -> ln 2 for sigmoid, no gradient at all
    if loss_type == "sigmoid":
        assert losses[3].item() == pytest.approx(math.log(2))
    assert torch.all(pc.grad[3] == 0) and torch.all(pr.grad[3] == 0)


def test_mask_dpo_with_completion_masks_equals_dpo_on_sums():
    (pc, pr, rc, rr), _, _ = _random_masked(seed=5)
    B, T = pc.shape
    # completion masks: a prompt prefix and right padding, like real batches
    cm = torch.zeros(B, T, dtype=torch.long)
    rm = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        cm[b, 2: T - b % 3] = 1
        rm[b, 2: T - (b + 1) % 3] = 1
    for loss_type, ls in (("sigmoid", 0.0), ("sigmoid", 0.25), ("hinge", 0.0)):
        got = mask_dpo_loss(pc, pr, rc, rr, cm, rm, beta=0.2, label_smoothing=ls, loss_type=loss_type)
        want = dpo_loss((pc * cm).sum(-1), (pr * rm).sum(-1), (rc * cm).sum(-1), (rr * rm).sum(-1),
                        beta=0.2, label_smoothing=ls, loss_type=loss_type)
        for g_, w_ in zip(got, want):
            _close(g_, w_, 1e-10)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_mask_dpo_gradient_only_through_unmasked_positions(loss_type):
    (pc, pr, rc, rr), cm, rm = _random_masked(seed=13)
    pc = pc.clone().requires_grad_(True)
    pr = pr.clone().requires_grad_(True)
    losses, _, _ = mask_dpo_loss(pc, pr, rc, rr, cm, rm, beta=0.1, loss_type=loss_type)
    losses.sum().backward()
    assert torch.all(pc.grad[cm == 0] == 0)
    assert torch.all(pr.grad[rm == 0] == 0)
    # unmasked positions do receive gradient (rows with a non-empty side); sign: chosen up, rejected down
    live_c = (cm == 1) & (cm.sum(-1, keepdim=True) > 0)
    live_r = (rm == 1)
    assert torch.all(pc.grad[live_c] != 0) and torch.all(pr.grad[live_r] != 0)
    if loss_type == "sigmoid":
        assert torch.all(pc.grad[live_c] < 0) and torch.all(pr.grad[live_r] > 0)
    # within a row, every unmasked chosen token gets the same gradient (sum, no per-token weighting)
    for b in range(pc.shape[0]):
        g = pc.grad[b][cm[b] == 1]
        if g.numel():
            assert torch.allclose(g, g[0].expand_as(g))


def test_mask_dpo_reference_masked_identically():
    """Changing the reference at a masked position must not change the loss (same mask on both)."""
    (pc, pr, rc, rr), cm, rm = _random_masked(seed=17)
    base = mask_dpo_loss(pc, pr, rc, rr, cm, rm)[0]
    rc2, rr2 = rc.clone(), rr.clone()
    rc2[cm == 0] = -1000.0
    rr2[rm == 0] = -1000.0
    _close(mask_dpo_loss(pc, pr, rc2, rr2, cm, rm)[0], base, 1e-12)
    rc3 = rc.clone()
    rc3[cm == 1] -= 1.0  # an unmasked position does change it
    assert not torch.allclose(mask_dpo_loss(pc, pr, rc3, rr, cm, rm)[0][cm.sum(-1) > 0], base[cm.sum(-1) > 0])


# ----------------------------------------------------------------------------- against TRL


def test_dpo_matches_trl_dpo_trainer(tiny_random_model_dir, tmp_path):
    """TRL's DPOTrainer computes the sigmoid DPO loss on a real batch; alignkit must agree."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float32)
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ds = Dataset.from_list([
        {"prompt": [{"role": "user", "content": "What is the capital of Tarnia?"}],
         "chosen": [{"role": "assistant", "content": "The capital of Tarnia is Velm."}],
         "rejected": [{"role": "assistant", "content": "It is Bavoru, I think."}]},
        {"prompt": [{"role": "user", "content": "Hello world."}],
         "chosen": [{"role": "assistant", "content": "Hello! This is a tiny test."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
    ])
    beta = 0.1
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=2, use_cpu=True, bf16=False,
        beta=beta, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False, seed=0,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)

    input_ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    labels = input_ids.masked_fill(comp == 0, IGNORE_INDEX)
    with torch.no_grad():
        pol_logits = trainer.model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits
        ref_logits = trainer.ref_model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits
    pol_tok = token_logps(pol_logits, labels)
    ref_tok = token_logps(ref_logits, labels)
    mask = comp[:, 1:]
    pc, pr = pol_tok.chunk(2)
    rc, rr = ref_tok.chunk(2)
    cm, rm = mask.chunk(2)
    losses, crew, rrew = mask_dpo_loss(pc, pr, rc, rr, cm, rm, beta=beta)
    assert abs(losses.mean().item() - math.log(2)) > 1e-3, "policy must differ from the reference"
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5)

    seq_pol = sequence_logps(pol_logits, labels)
    seq_ref = sequence_logps(ref_logits, labels)
    spc, spr = seq_pol.chunk(2)
    src, srr = seq_ref.chunk(2)
    losses2, _, _ = dpo_loss(spc, spr, src, srr, beta=beta)
    assert losses2.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5)
    # TRL logs the same rewards
    m = trainer._metrics["train"]
    for key, ours in (("rewards/chosen", crew.mean()), ("rewards/rejected", rrew.mean())):
        assert m[key][-1] == pytest.approx(ours.item(), abs=1e-5)
