"""Importable loss functions: pure torch, no Trainer imports.

    from alignkit.losses import mask_dpo_loss, dpo_loss, sequence_logps, semantic_emd
    from alignkit.losses import unlikelihood_loss, gradient_ascent_loss
"""

from alignkit.losses.dpo import LOSS_TYPES, dpo_loss, mask_dpo_loss
from alignkit.losses.emd import EMD_REDUCTIONS, emd_lower_bound, normalized_embeddings, semantic_emd
from alignkit.losses.logps import IGNORE_INDEX, sequence_logps, sequence_sums, target_logps, token_logps
from alignkit.losses.unsafe import UNSAFE_REDUCTIONS, gradient_ascent_loss, unlikelihood_loss

__all__ = [
    "EMD_REDUCTIONS",
    "IGNORE_INDEX",
    "LOSS_TYPES",
    "dpo_loss",
    "emd_lower_bound",
    "mask_dpo_loss",
    "normalized_embeddings",
    "semantic_emd",
    "sequence_logps",
    "sequence_sums",
    "target_logps",
    "token_logps",
    "UNSAFE_REDUCTIONS",
    "gradient_ascent_loss",
    "unlikelihood_loss",
]
