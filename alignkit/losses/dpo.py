"""DPO-family preference losses as pure functions of log-probs.

Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7:
    L = -log σ(β [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards, all ``[B]``.

    ``sigmoid`` with ``label_smoothing`` ε is conservative DPO (cDPO, Mitchell 2023):
    ``-(1-ε) log σ(βz) - ε log σ(-βz)``. ``hinge`` is ``relu(1 - βz)`` (SLiC).
    ``ipo`` is ``(z - 1/(2β))²`` (Azar et al. 2023, Eq. 17); pass length-normalised
    log-probs for it, as IPO's authors and TRL do.
    Rewards are ``β (log π - log π_ref)``, detached.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    z = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def mask_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask-DPO (Gu et al., ICLR 2025): DPO on sentence-masked sequence log-probs.

    Inputs are per-token log-probs ``[B, T]`` and masks ``[B, T]``. In the chosen
    response, tokens of hallucinated sentences have mask 0; in the rejected response,
    tokens of correct sentences have mask 0; prompt and padding are 0 on both sides.
    Policy and reference are masked *identically* (mask_dpo.md §2), so
    ``LP(y, m) = Σ_t m(t) log π(y_t | ...)`` and the sigmoid-DPO logit is
    ``β[(LP_θ - LP_ref)(y_w, m_w) - (LP_θ - LP_ref)(y_l, m_l)]``. A side whose mask is all
    zero contributes 0 (a finite loss, never NaN). With ``ipo`` the sums are divided
    by the number of unmasked tokens (mask_dpo.md §2).
    """
    cm = chosen_mask.to(policy_chosen_logps.dtype)
    rm = rejected_mask.to(policy_rejected_logps.dtype)
    sums = [policy_chosen_logps * cm, policy_rejected_logps * rm, ref_chosen_logps * cm, ref_rejected_logps * rm]
    pc, pr, rc, rr = (s.sum(-1) for s in sums)
    if loss_type == "ipo":
        nc, nr = cm.sum(-1).clamp(min=1), rm.sum(-1).clamp(min=1)
        pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
    return dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
