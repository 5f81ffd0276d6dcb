"""Mask-DPO (Gu et al., ICLR 2025, arXiv 2503.02846): sentence-level factuality masks in DPO.

``data.train`` is either prompts — then :mod:`alignkit.stages.pairs` samples K responses from
the policy, labels their sentences with the judge and pairs best vs worst — or
``preference`` rows that already carry sentence labels (``chosen_sentences`` /
``chosen_labels``, or ANAH's ``chosen_item``).

The loss is DPO where the chosen response's hallucinated sentences and the rejected
response's correct sentences get token weight 0, the same mask for policy and
reference (mask_dpo.md §2). Masks come from character spans through the tokenizer's
offset mapping, so they are exact — unlike the official code's per-sentence
re-encoding, which can shift by a token per sentence and silently falls back to plain
DPO on overrun (§9.1). Here a sentence that cannot be located is a data error, or is
dropped / trained unmasked *and counted* (``on_mask_mismatch``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from alignkit.config import PreferenceOptions, RunConfig, preference_checks
from alignkit.stages.pairs import PairsConfig, check_pairs_config, resolve_train_pairs

log = logging.getLogger(__name__)
NAME = "mask_dpo"
DATA_KIND = "preference"


# The paper's claim at toy scale: ANAH test 49.19 (base) -> 68.44 (DPO) -> 77.53 (Mask-DPO).
# Each step of the ordering is judged by a paired bootstrap over the same held-out people.
DEMO = {
    "title": "Mask-DPO: factuality of biographies of held-out people (bio_test, bio_val)",
    "note": "Factuality score = correct / (correct + hallucinated) sentences, judged by the world's knowledge "
            "base (ANAH-v2 score; nofact excluded). DPO and Mask-DPO train on the same self-sampled pairs "
            "(bio_train people). 4 biographies per person at temperature 0.8; the bootstrap resamples people.",
    "evals": ["bio_test", "bio_val"],
    "metrics": {"bio_test:score": "factuality", "bio_test:correct_per_response": "#correct/response",
                "bio_test:hallucination_per_response": "#hallucinated/response",
                "bio_test:sentences_per_response": "sentences/response",
                "bio_val:score": "factuality (bio_val)"},
    "columns": {
        "bio_test:score": "correct / (correct + hallucinated) sentences in biographies of bio_test people — "
                          "held out: never in pretraining bios, never in DPO pairs, never used for any choice.",
        "bio_test:correct_per_response": "correct sentences per biography (bio_test): informativeness. A policy "
                                         "that states fewer facts can raise factuality while this falls.",
        "bio_test:hallucination_per_response": "hallucinated sentences per biography (bio_test).",
        "bio_test:sentences_per_response": "all sentences per biography, nofact fillers included (bio_test).",
        "bio_val:score": "factuality on bio_val people (held out like bio_test, disjoint from it): the split "
                         "for choosing hyperparameters; shown so choices can be checked against it.",
    },
    "rows": [("base", None), ("DPO", "dpo"), ("Mask-DPO", "mask_dpo")],
    "claims": [("Mask-DPO", "DPO", "bio_test:score"), ("DPO", "base", "bio_test:score")],
    "expect_text": "Mask-DPO > DPO > base on bio_test factuality",
    # not expectations: does Mask-DPO's factuality come with fewer correct statements?
    "checks": [("Mask-DPO", "base", "bio_test:correct_per_response"),
               ("Mask-DPO", "DPO", "bio_test:correct_per_response")],
    # `alignkit demo --smoke` (make test): every stage of every row, on small budgets
    "smoke": ["data.train.limit=6", "method.gen_num_samples=4", "method.pairs_per_prompt=1", "train.max_steps=2",
              "eval.limit=4", "eval.num_samples=1"],
}


class Method(PairsConfig, PreferenceOptions):
    # Open in the paper (mask_dpo.md §11): config options, defaults from the spec.
    nofact_policy: Literal["no_hallucination", "mask_both"] = "no_hallucination"
    on_mask_mismatch: Literal["raise", "drop", "fallback_unmasked"] = "raise"


def check_config(cfg: RunConfig, method: Method) -> list[str]:
    problems = preference_checks(cfg, method) + check_pairs_config(cfg, method)
    from alignkit.data import get_splitter

    try:
        get_splitter(method.sentence_splitter)
    except ValueError as e:
        problems.append(f"field 'method.sentence_splitter': {e}")
    return problems


def weights_for(method: Method):
    """``weight_fn`` for the tokeniser: labelled character spans -> per-token 0/1 (§2)."""
    from alignkit.data import span_weights

    # m_w(t) = 0 on hallucinated sentences; m_l(t) = 0 on correct ones. "nofact" counts as
    # no_hallucination by default (masked on the rejected side only), or on both sides.
    zero = {"chosen": {"hallucination"}, "rejected": {"correct", "nofact"}}
    if method.nofact_policy == "mask_both":
        zero = {"chosen": {"hallucination", "nofact"}, "rejected": {"correct", "nofact"}}

    def fn(row, side, offsets, segment, content_offset, spans):
        if spans is None:
            return [1.0] * len(offsets)  # fallback_unmasked rows (counted in mask_report.json)
        seg_spans = [(s + content_offset, e + content_offset, 0.0 if lab in zero[side] else 1.0)
                     for s, e, lab in spans]
        return span_weights(offsets, segment, seg_spans, default=1.0)

    return fn


def train(cfg: RunConfig, callbacks=()) -> Path:
    from alignkit.config.paths import expand_config
    from alignkit.core.distributed import is_main_process
    from alignkit.core.io import atomic_write_text
    from alignkit.data import DataError, RowIssue, load_rows
    from alignkit.evaluation import evaluate_after_training
    from alignkit.training.preference import train_preference

    method = Method.model_validate(cfg.method)
    expand_config(cfg)
    resolve_train_pairs(cfg, method)
    d = cfg.data
    span_policy = "raise" if method.on_mask_mismatch == "raise" else "keep"
    rows = load_rows(d.train, DATA_KIND, d.max_errors, d.system_prompt, span_policy)
    bad = [r for r in rows if r.get("chosen_spans") is None or r.get("rejected_spans") is None]
    if bad and method.on_mask_mismatch == "raise":
        raise DataError([RowIssue(d.train.path, r["_row"], "chosen_sentences",
                                  "no sentence annotations; Mask-DPO needs them (method.on_mask_mismatch: drop or "
                                  "fallback_unmasked proceeds and counts them)") for r in bad[: d.max_errors]],
                        len(bad))
    if method.on_mask_mismatch == "drop":
        rows = [r for r in rows if r.get("chosen_spans") is not None and r.get("rejected_spans") is not None]
    else:  # fallback_unmasked: the whole pair trains as plain DPO (spec §9.1), never half-masked
        for r in bad:
            r["chosen_spans"] = r["rejected_spans"] = None
    eval_rows = load_rows(d.eval, DATA_KIND, d.max_errors, d.system_prompt, span_policy) if d.eval else None
    run_dir = train_preference(cfg, method, rows, eval_rows, weights_for(method), callbacks,
                               evaluate=evaluate_after_training)
    if is_main_process():
        report = {"rows_trained": len(rows), "rows_without_usable_annotations": len(bad),
                  "on_mask_mismatch": method.on_mask_mismatch, "pairs_file": d.train.path,
                  "examples": [r.get("_span_error") for r in bad[:5]]}
        atomic_write_text(run_dir / "mask_report.json", json.dumps(report, indent=2))
    return run_dir
