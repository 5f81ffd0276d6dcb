"""Training-time watches (transformers ``TrainerCallback`` s) shared by recipes.

:class:`OverAlignmentWatch` — TA-SFT's finding that refusals of benign prompts grow as
training goes on (ta_sft_emd.md §2, §6 step 7): every ``every`` optimiser steps it
answers a fixed set of benign look-alike prompts greedily with the current policy and
logs the share the judge calls refusals (``watch/benign_refusal_rate``), the share left
unanswered (``watch/benign_unanswered_rate``: a refusal, or a reply that misses most content
words of the prompt's gold answer — the evaluation's ``benign_unanswered_rate``; over-alignment
shows there also when a model rarely uses refusal phrases), and, when harmful prompts are
given, the share of harmful compliance (``watch/harmful_compliance_rate``). Values reach ``metrics.jsonl`` and TensorBoard
through the trainer's own ``log``: the watch sets ``control.should_log`` and a trainer
that merges :meth:`OverAlignmentWatch.pop_logs` into its logs (see
``alignkit.recipes.ta_sft``) writes them at that step.

Multi-process: every rank generates the same prompts (greedy, so identical) inside
TRL's ``unwrap_model_for_generation``, which gathers ZeRO-3 shards for the duration;
only the main process keeps the numbers.
"""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

log = logging.getLogger(__name__)


class OverAlignmentWatch(TrainerCallback):
    def __init__(self, tokenizer, judge, benign_prompts: list[str], harmful_prompts: list[str] | None = None,
                 every: int = 10, max_new_tokens: int = 48, batch_size: int = 32, at_end: bool = True,
                 benign_golds: list[str | None] | None = None):
        if not benign_prompts:
            raise ValueError("OverAlignmentWatch needs at least one benign prompt")
        if benign_golds is not None and len(benign_golds) != len(benign_prompts):
            raise ValueError(f"OverAlignmentWatch: {len(benign_golds)} gold answers for {len(benign_prompts)} "
                             "benign prompts")
        self.tok, self.judge = tokenizer, judge
        self.benign, self.harmful = list(benign_prompts), list(harmful_prompts or [])
        # None: no gold for the prompt (only a refusal counts as unanswered there)
        self.golds = list(benign_golds) if benign_golds is not None else [None] * len(self.benign)
        self.every, self.max_new_tokens, self.batch_size, self.at_end = every, max_new_tokens, batch_size, at_end
        self.trainer = None  # set by the recipe: the accelerator and wrapped model come from it
        self.history: list[dict] = []
        self._pending: dict[str, float] = {}

    def pop_logs(self) -> dict[str, float]:
        out, self._pending = self._pending, {}
        return out

    def measure(self, model) -> dict[str, float]:
        from alignkit.generation.sampling import generate
        from alignkit.judges.base import JudgeRequest
        from alignkit.judges.rules import answers_gold

        was_training = model.training
        model.eval()
        try:
            prompts = self.benign + self.harmful
            outs = generate(model, self.tok, prompts, n=1, greedy=True, max_new_tokens=self.max_new_tokens,
                            batch_size=self.batch_size, progress=False)
        finally:
            if was_training:
                model.train()
        reqs = [JudgeRequest(prompt=p, response=o[0]) for p, o in zip(prompts, outs)]
        refused = self.judge.is_refusal(reqs[: len(self.benign)])
        unanswered = [bool(f) or not answers_gold(r.response, g) for r, f, g in zip(reqs, refused, self.golds)]
        res = {"watch/benign_refusal_rate": sum(map(bool, refused)) / len(refused),
               "watch/benign_unanswered_rate": sum(unanswered) / len(unanswered)}
        if self.harmful:
            harmful = self.judge.is_harmful(reqs[len(self.benign):])
            res["watch/harmful_compliance_rate"] = sum(map(bool, harmful)) / len(harmful)
        return res

    def _run(self, state, control, model):
        t0 = time.time()
        if self.trainer is not None:
            from trl.models.utils import unwrap_model_for_generation

            with unwrap_model_for_generation(self.trainer.model_wrapped, self.trainer.accelerator) as unwrapped:
                res = self.measure(unwrapped)
        else:
            res = self.measure(model)
        if state.is_world_process_zero:
            res["watch/seconds"] = round(time.time() - t0, 3)
            self.history.append({"step": state.global_step, **res})
            self._pending.update(res)
        # On every rank: Trainer's logging step gathers the loss across processes, so a
        # log requested on rank 0 alone would wait forever for the others.
        control.should_log = True

    def on_step_end(self, args, state, control, model=None, **kw):
        last = state.max_steps and state.global_step >= state.max_steps
        if (self.every and state.global_step % self.every == 0) or (last and self.at_end):
            self._run(state, control, model)
        return control
