"""alignkit: alignment fine-tuning recipes for causal language models, on TRL.

Losses are importable without any trainer: ``from alignkit.losses import mask_dpo_loss``.
"""

__version__ = "0.1.0"
