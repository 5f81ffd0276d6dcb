"""Evaluation: the eval tasks (:mod:`~alignkit.evaluation.tasks`: qa, factuality, safety,
dualuse, jailbreak; each task's options schema lives in :mod:`alignkit.config.tasks`),
running them on a model (:mod:`~alignkit.evaluation.run`) and the report
(:mod:`~alignkit.evaluation.report`). Metrics over the per-prompt records are
:mod:`alignkit.metrics.records`."""

from alignkit.evaluation.run import attach_ths, evaluate_after_training, evaluate_model
from alignkit.evaluation.tasks import TASKS

__all__ = ["TASKS", "attach_ths", "evaluate_after_training", "evaluate_model"]
