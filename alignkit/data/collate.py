"""Collators: padded (right padding) and padding-free (packed with position_ids).

Preference batches are laid out as in TRL and torchtune — one forward pass over
2B rows::

    input_ids      [c_1 .. c_B, r_1 .. r_B]   (chosen rows, then rejected rows)
    completion_mask 0 on prompt/padding, 1 on completion tokens
    loss_weights   per-token weights on completion tokens (Mask-DPO masks; else = completion_mask)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _pad(seqs: list[list], value, dtype, multiple: int | None = None) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    if multiple:
        n = -(-n // multiple) * multiple
    out = torch.full((len(seqs), n), value, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=dtype)
    return out


@dataclass
class PreferenceCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids, comp, weights = [], [], []
        for side in ("chosen", "rejected"):
            for ex in examples:
                p, c = list(ex["prompt_ids"]), list(ex[f"{side}_ids"])
                ids.append(p + c)
                comp.append([0] * len(p) + [1] * len(c))
                weights.append([0.0] * len(p) + list(ex[f"{side}_weights"]))
        m = self.pad_to_multiple_of
        batch = {
            "input_ids": _pad(ids, self.pad_token_id, torch.long, m),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0, torch.long, m),
            "completion_mask": _pad(comp, 0, torch.long, m),
            "loss_weights": _pad(weights, 0.0, torch.float32, m),
        }
        if "ref_chosen_logps" in examples[0]:
            batch["ref_chosen_logps"] = torch.tensor([ex["ref_chosen_logps"] for ex in examples])
            batch["ref_rejected_logps"] = torch.tensor([ex["ref_rejected_logps"] for ex in examples])
        return batch


@dataclass
class PaddingFreePreferenceCollator:
    """Packs all 2B sequences into one row; ``position_ids`` restart at 0 per sequence.

    transformers detects packed sequences from ``position_ids`` and builds a
    block-diagonal causal mask (sdpa/eager) or uses varlen kernels (flash-attention),
    so no pad token is ever computed. ``seq_lens`` lets the trainer unpack per-token
    log-probs back into ``[2B, T]``.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids, comp, weights, pos, lens = [], [], [], [], []
        for side in ("chosen", "rejected"):
            for ex in examples:
                p, c = list(ex["prompt_ids"]), list(ex[f"{side}_ids"])
                ids += p + c
                comp += [0] * len(p) + [1] * len(c)
                weights += [0.0] * len(p) + list(ex[f"{side}_weights"])
                pos += list(range(len(p) + len(c)))
                lens.append(len(p) + len(c))
        batch = {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([pos]),
            "completion_mask": torch.tensor([comp]),
            "loss_weights": torch.tensor([weights], dtype=torch.float32),
            "seq_lens": torch.tensor(lens),
        }
        if "ref_chosen_logps" in examples[0]:
            batch["ref_chosen_logps"] = torch.tensor([ex["ref_chosen_logps"] for ex in examples])
            batch["ref_rejected_logps"] = torch.tensor([ex["ref_rejected_logps"] for ex in examples])
        return batch


def unpack(packed: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """``[1, sum(L)]`` -> ``[N, max(L)]`` right-padded with zeros."""
    rows = torch.split(packed[0], seq_lens.tolist())
    out = packed.new_zeros((len(rows), int(seq_lens.max())))
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out
