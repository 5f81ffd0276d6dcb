"""Training: run directories and resume (:mod:`~alignkit.training.rundir`), the preference
trainer (:mod:`~alignkit.training.preference`), the reference log-prob cache
(:mod:`~alignkit.training.reference`), plain SFT (:mod:`~alignkit.training.sft`) and callbacks.
Evaluation after training is a later layer: recipes pass it in (``evaluate=``)."""

from alignkit.training.preference import PreferenceTrainer, pair_stats, preference_collator, train_preference
from alignkit.training.reference import ReferenceCache, reference_cache_root, reference_model_key
from alignkit.training.rundir import (
    COMPLETE_MARKER,
    RUN_MARKER,
    RunLogCallback,
    apply_disable_dropout,
    checkpoint_step,
    finish_run,
    latest_complete_checkpoint,
    load_train_rows,
    prepare_run_dir,
    read_metrics,
    resolve_resume,
    training_arguments,
)
from alignkit.training.sft import train_sft_rows

__all__ = [
    "COMPLETE_MARKER", "RUN_MARKER", "PreferenceTrainer", "ReferenceCache", "RunLogCallback", "apply_disable_dropout",
    "checkpoint_step", "finish_run", "latest_complete_checkpoint", "load_train_rows", "pair_stats",
    "preference_collator", "prepare_run_dir", "read_metrics", "reference_cache_root", "reference_model_key",
    "resolve_resume", "train_preference", "train_sft_rows", "training_arguments",
]
