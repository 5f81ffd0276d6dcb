"""Importable loss functions: pure torch, no Trainer imports.

    from alignkit.losses import mask_dpo_loss, dpo_loss, sequence_logps
"""

from alignkit.losses.dpo import LOSS_TYPES, dpo_loss, mask_dpo_loss
from alignkit.losses.logps import IGNORE_INDEX, sequence_logps, token_logps

__all__ = ["IGNORE_INDEX", "LOSS_TYPES", "dpo_loss", "mask_dpo_loss", "sequence_logps", "token_logps"]
