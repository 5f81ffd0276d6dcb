"""The preference trainer: packed or padded DPO-family batches, one policy forward per step,
reference log-probs precomputed once (:mod:`alignkit.training.reference`), per-pair metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Trainer

from alignkit.config import RunConfig
from alignkit.core.distributed import is_main_process
from alignkit.core.io import atomic_write_text
from alignkit.training.reference import ReferenceCache, reference_cache_root, reference_model_key
from alignkit.training.rundir import (
    RunLogCallback,
    apply_disable_dropout,
    checkpoint_step,
    finish_run,
    prepare_run_dir,
    training_arguments,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- preference trainer


def pair_stats(pw, pc, seq_tokens, seq_weight, cr, rr) -> dict[str, torch.Tensor]:
    """Per-pair metric vectors ``[B]`` from per-sequence ``[2B]`` sums and per-pair rewards.

    ``pw``/``pc``: weighted / unweighted completion log-prob sums; ``seq_tokens``: completion
    tokens per sequence; ``seq_weight``: their summed weights (the kept share of a Mask-DPO mask)."""
    b = pw.size(0) // 2
    kept = seq_weight / seq_tokens.clamp(min=1)
    return {
        "rewards/chosen": cr, "rewards/rejected": rr,
        "rewards/accuracies": (cr > rr).float(), "rewards/margins": cr - rr,
        "logps/chosen": pc[:b], "logps/rejected": pc[b:],
        "mask/chosen_masked_frac": 1 - kept[:b], "mask/rejected_masked_frac": 1 - kept[b:],
    }


def accumulate_pair_stats(acc: dict[str, tuple[float, int]], stats: dict[str, torch.Tensor], gather) -> None:
    """Add per-pair vectors to running ``(sum, count)`` totals, gathered over ranks first.

    Gathering the per-pair vectors (not per-rank means) lets ``gather_for_metrics`` drop
    exactly the samples the sampler duplicated to even out the last batch, and weights
    every pair once however batches, ranks and accumulation steps split them — so a
    logged value is the mean over all pairs of the logging window.
    """
    for k, v in stats.items():
        g = gather(v.detach().float().reshape(-1))
        total, count = acc.get(k, (0.0, 0))
        acc[k] = (total + g.sum().item(), count + g.numel())


def preference_collator(pad_token_id: int, packed: bool, model_config=None):
    """The default batch layout for a model (:func:`alignkit.data.collate.attention_layout`):
    packed rows; where the attention kernel takes a 4D mask (sdpa, eager, flex) and the tree
    mask can reproduce every layer's pattern (full, sliding window, chunked), each batch shares
    the prompt or not, whichever the FLOP estimate says is cheaper, else separate sequences;
    flash-attention gets one row with explicit ``cu_seq_lens``; an unknown kernel, or
    ``packed`` off, gets right-padded rows."""
    from alignkit.data import PackedPreferenceCollator, PreferenceCollator
    from alignkit.data.collate import attention_cost_ratio, attention_layout

    layout = attention_layout(model_config)
    if not packed or layout.kernel == "padded":
        if packed:
            log.warning("attention kernel %r, layer types %s: no packed layout is known to be exact for them; "
                        "using padded rows", getattr(model_config, "_attn_implementation", None),
                        sorted(set(getattr(model_config, "layer_types", None) or ())) or "-")
        return PreferenceCollator(pad_token_id)
    try:
        cost = attention_cost_ratio(model_config)
    except (AttributeError, TypeError, ZeroDivisionError):  # an unusual config: share the prompt always
        cost = None
    return PackedPreferenceCollator.for_layout(pad_token_id, layout, cost)


# Families whose ``ForCausalLM.forward`` is ``lm_head(hidden[logits_to_keep])`` followed at most by
# ``final_logit_softcapping``: the LM head can be fused with the log-softmax (tests/test_families.py
# checks each against the model's own logits). Others keep the logits path.
FUSED_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"})


class _FusedHeadForward:
    """While active, the LM head's forward is the fused projection + log-softmax of the targets
    (:func:`alignkit.losses.logps.fused_target_logps`): the model returns per-target log-probs
    ``[N]`` as its "logits", and applies no soft-capping of its own (the fused function does).
    It runs *inside* the model's forward, where DDP, ZeRO and FSDP expect their parameters used."""

    def __init__(self, head, config, rows, ids, chunk_size: int):
        self.head, self.config, self.rows, self.ids, self.chunk = head, config, rows, ids, chunk_size

    def __enter__(self):
        from alignkit.losses.logps import fused_target_logps

        softcap = getattr(self.config, "final_logit_softcapping", None)
        self.softcap = softcap
        if softcap is not None:
            self.config.final_logit_softcapping = None
        head = self.head

        def forward(hidden):
            hidden = hidden.reshape(-1, hidden.size(-1))
            return fused_target_logps(hidden, head.weight, head.bias, self.rows, self.ids, self.chunk, softcap)

        self.own_forward = vars(head).get("forward")
        head.forward = forward
        return self

    def __exit__(self, *exc):
        if self.own_forward is None:
            del self.head.forward
        else:
            self.head.forward = self.own_forward
        if self.softcap is not None:
            self.config.final_logit_softcapping = self.softcap
        return False


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _mask_for_kernel(mask, attn: str | None, dtype: torch.dtype):
    """A collator's boolean 4D mask (or ``{layer type: mask}``) in the form the kernel reads it:
    sdpa takes booleans; eager adds the mask to the scores (0 / -inf); flex takes a ``BlockMask``
    (a tensor there would be added to the scores as a ``score_mod``)."""
    if isinstance(mask, dict):
        return {k: _mask_for_kernel(v, attn, dtype) for k, v in mask.items()}
    if mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    if attn == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if attn == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, kv):
            return mask[b, 0, q, kv]

        r, _, n, _ = mask.shape
        return create_block_mask(mask_mod, r, None, n, n, device=mask.device)
    return mask


VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class PreferenceTrainer(Trainer):
    """DPO-family trainer over ``transformers.Trainer`` public hooks.

    Why not ``trl.DPOTrainer``: since TRL v0.29 it re-tokenises the dataset inside
    ``__init__`` (``_prepare_dataset``) with no public opt-out, which would throw away
    the exact character-span token weights Mask-DPO needs. The layout follows TRL's:
    one forward over ``[chosen; rejected]``, reference = adapter-disabled policy under
    LoRA or a frozen copy, reference under ``no_grad``, loss scaled by accumulation steps.

    The forward reads the collator's *targets* (:mod:`alignkit.data.collate`): only
    positions that predict a completion token reach the LM head (``logits_to_keep``),
    and per-sequence sums are one ``index_add`` — identical for padded and packed
    batches. The loss is sigmoid/IPO/hinge DPO on the weighted sums
    (:func:`alignkit.losses.dpo_loss`), which is :func:`alignkit.losses.mask_dpo_loss`
    (mask_dpo.md §2: policy and reference masked identically).

    Reference log-probs: with ``precompute_ref=True`` one no-grad pass before training
    fills a per-pair table (and the on-disk cache, see :class:`ReferenceCache`); no
    reference copy is kept. Otherwise they are computed live next to every policy forward.
    """

    def __init__(self, *args, ref_model=None, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, precompute_ref: bool = False, ref_cache=None,
                 logps_chunk_size: int = 1024, fused_lm_head: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.logps_chunk_size, self.fused_lm_head = logps_chunk_size, fused_lm_head
        # Our loss is a per-pair mean; let Trainer divide by GA steps (trl#2615).
        self.model_accepts_loss_kwargs = False
        self.ref_model = ref_model
        if ref_model is not None:
            if self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                self.ref_model = prepare_deepspeed(ref_model, self.accelerator)
            else:
                self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.precompute_ref, self.ref_cache = precompute_ref, ref_cache
        # split ("train"/"eval") -> [N, 2] float32 (chosen, rejected) weighted reference sums by pair_index.
        self.ref_tables: dict[str, torch.Tensor] = {}
        self.timings: dict[str, float | str] = {}
        self._keeps_logits: dict[type, bool] = {}
        # mode -> metric -> (sum over pairs, number of pairs) since the last log.
        self._stats: dict[str, dict[str, tuple[float, int]]] = {"train": {}, "eval": {}}

    # ---- forward

    def _accepts_logits_to_keep(self, model) -> bool:
        import inspect

        t = type(self._base_model(model))
        if t not in self._keeps_logits:
            self._keeps_logits[t] = "logits_to_keep" in inspect.signature(t.forward).parameters
        return self._keeps_logits[t]

    def _base_model(self, model):
        base = self.accelerator.unwrap_model(model)
        return base.get_base_model() if hasattr(base, "get_base_model") else base

    def _fused_head(self, model):
        """``(lm_head, text config)`` when the LM head can be fused with the log-softmax
        (:func:`alignkit.losses.logps.fused_target_logps`): a known family, a plain full
        ``nn.Linear`` head (not LoRA-wrapped, not partitioned by ZeRO-3, not an FSDP shard), and
        not under ``nn.DataParallel`` (a plain ``train`` on several visible GPUs): its replicas
        would copy the patched forward, which holds the original head and the whole batch's rows."""
        if not self.fused_lm_head or self.is_fsdp_enabled or not self._accepts_logits_to_keep(model):
            return None
        if self.args.n_gpu > 1 or isinstance(model, torch.nn.DataParallel):
            return None
        base = self._base_model(model)
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        if getattr(config, "model_type", None) not in FUSED_HEAD_MODEL_TYPES:
            return None
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if (type(head) is not torch.nn.Linear or hasattr(head, "_hf_hook") or hasattr(head.weight, "ds_id")
                or type(head.weight).__name__ == "DTensor" or head.weight.device.type == "meta"):
            return None
        return head, config

    def model_inputs(self, model, inputs) -> dict:
        """The forward's keyword arguments for a collated batch, in the attention kernel's terms."""
        kw = {"input_ids": inputs["input_ids"], "use_cache": False}
        if "position_ids" in inputs:
            kw["position_ids"] = inputs["position_ids"]
        mask = inputs.get("attention_mask")
        if mask is not None:
            dtype = next(self.accelerator.unwrap_model(model).parameters()).dtype
            kw["attention_mask"] = _mask_for_kernel(mask, _attn_impl(model), dtype)
        for k in VARLEN_KEYS:  # flash-attention: the sequences of the one packed row, given explicitly
            if k in inputs:
                kw[k] = inputs[k]
        return kw

    def sequence_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted and unweighted completion log-prob sums, ``[2B]`` each (chosen then rejected)."""
        from alignkit.losses import sequence_sums, target_logps

        kw = self.model_inputs(model, inputs)
        keep = inputs["keep"]
        fused = self._fused_head(model)
        if fused is not None:
            # The LM head on completion-predicting positions only, fused with the log-softmax:
            # neither pass holds [K, V] logits (the model's "logits" are the targets' log-probs).
            head, config = fused
            with _FusedHeadForward(head, config, inputs["tgt_flat"], inputs["tgt_ids"], self.logps_chunk_size):
                lp = model(**kw, logits_to_keep=keep).logits.reshape(-1)
        else:
            if self._accepts_logits_to_keep(model):
                kw["logits_to_keep"] = keep  # the LM head runs on completion-predicting positions only
                logits = model(**kw).logits
                logits = logits.reshape(-1, logits.size(-1))
            else:
                logits = model(**kw).logits[keep]
            lp = target_logps(logits, inputs["tgt_flat"], inputs["tgt_ids"], self.logps_chunk_size)
        n = inputs["seq_tokens"].numel()
        return (sequence_sums(lp * inputs["tgt_w"].to(lp), inputs["tgt_seq"], n),
                sequence_sums(lp, inputs["tgt_seq"], n))

    @torch.no_grad()
    def live_reference_logps(self, model, inputs) -> torch.Tensor:
        """Weighted reference sums ``[2B]``: the ref model, else the policy with its adapter
        disabled, else (only before the first optimiser step) the policy itself."""
        if self.ref_model is not None:
            return self.sequence_logps(self.ref_model, inputs)[0]
        unwrapped = self.accelerator.unwrap_model(model)
        if hasattr(unwrapped, "disable_adapter"):
            with unwrapped.disable_adapter():
                return self.sequence_logps(model, inputs)[0]
        if self.state.global_step == 0:
            return self.sequence_logps(model, inputs)[0]
        raise RuntimeError("no reference: pass ref_model, use LoRA, or precompute reference log-probs")

    def _reference_logps(self, model, inputs, mode: str) -> torch.Tensor:
        if "ref_chosen_logps" in inputs:  # reference sums carried by the dataset itself
            return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
        table = self.ref_tables.get(mode)
        if table is not None and "pair_index" in inputs:
            t = table.to(inputs["pair_index"].device)[inputs["pair_index"]]
            return torch.cat([t[:, 0], t[:, 1]])
        return self.live_reference_logps(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from alignkit.losses import dpo_loss

        mode = "train" if model.training else "eval"
        pw, pc = self.sequence_logps(model, inputs)
        ref = self._reference_logps(model, inputs, mode).to(pw)
        b = pw.numel() // 2
        pol_c, pol_r, ref_c, ref_r = pw[:b], pw[b:], ref[:b], ref[b:]
        if self.loss_type == "ipo":  # mask_dpo.md §2: average over unmasked tokens
            n = inputs["seq_weight"].to(pw).clamp(min=1)
            pol_c, ref_c, pol_r, ref_r = pol_c / n[:b], ref_c / n[:b], pol_r / n[b:], ref_r / n[b:]
        losses, cr, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=self.beta, label_smoothing=self.label_smoothing,
                                  loss_type=self.loss_type)
        loss = losses.mean()
        with torch.no_grad():
            stats = pair_stats(pw, pc, inputs["seq_tokens"].to(pw), inputs["seq_weight"].to(pw), cr, rr)
            accumulate_pair_stats(self._stats[mode], stats, self._gather_pairs)
        return (loss, {"losses": losses}) if return_outputs else loss

    def _gather_pairs(self, v: torch.Tensor) -> torch.Tensor:
        # Trainer fetches a whole accumulation window before computing it, so accelerate's
        # end-of-dataloader flag is already set on the window's earlier micro-batches and
        # gather_for_metrics would cut real pairs from them. Only the window's last
        # micro-batch (sync step) can be the epoch's last batch, the one holding padding
        # duplicates to trim.
        if self.model.training and not self.accelerator.gradient_state.sync_gradients:
            return self.accelerator.gather(v)
        return self.accelerator.gather_for_metrics(v)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for k, (total, count) in self._stats[mode].items():
            if count:
                logs[prefix + k] = total / count
        self._stats[mode].clear()
        super().log(logs, start_time)

    # ---- reference pass

    def train(self, *args, **kwargs):
        if self.precompute_ref:
            self.prepare_reference()
        return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        if self.precompute_ref and "eval" not in self.ref_tables and self.state.global_step == 0:
            self.prepare_reference(splits=("eval",))
        return super().evaluate(*args, **kwargs)

    def prepare_reference(self, splits=("train", "eval")) -> None:
        """Fill ``ref_tables`` from the on-disk cache, or by one no-grad pass.

        Runs before ``Trainer.train`` loads a checkpoint or takes a step, so the policy
        still *is* the reference when no ref model or adapter is there. The pass uses
        the plain (not yet wrapped) model: under DeepSpeed ZeRO-2/3 and FSDP alignkit
        loads full weights on every rank and the launcher shards them only inside
        ``train()``, which is why this works where TRL's precompute crashes (trl#6403).
        Each rank scores a strided shard and the shards are all-gathered."""
        import time

        t0 = time.perf_counter()
        for split in splits:
            ds = self.train_dataset if split == "train" else self.eval_dataset
            if ds is None or split in self.ref_tables:
                continue
            if "pair_index" not in ds.column_names:  # the table is looked up by row
                ds = ds.add_column("pair_index", list(range(len(ds))))
                setattr(self, f"{split}_dataset", ds)
            if any(hasattr(p, "ds_id") for p in self.model.parameters()):
                raise RuntimeError("precomputed reference log-probs need the full weights before training, but the "
                                   "model was loaded already partitioned by deepspeed.zero.Init (a ZeRO-3 config "
                                   "was active when it loaded); load it before creating TrainingArguments")
            key = self.ref_cache.key(ds) if self.ref_cache is not None else None
            table = self._cached_table(key, len(ds))
            self.timings[f"ref_logps_{split}_cache"] = "hit" if table is not None else ("miss" if key else "off")
            if table is None:
                table = self._reference_pass(ds)
                if key and self.is_world_process_zero():
                    self.ref_cache.save(key, table)
            self.ref_tables[split] = table
        if "train" in self.ref_tables and self.ref_model is not None:
            self.ref_model = None  # the table replaces it: free its memory for training
        self.timings["ref_logps_s"] = round(self.timings.get("ref_logps_s", 0.0) + time.perf_counter() - t0, 3)

    def _cached_table(self, key: str | None, n: int) -> torch.Tensor | None:
        """The cached table, as the main process finds it, on every rank. With a node-local
        cache two nodes can disagree (one hits, one misses); a rank that decided on its own
        would then wait forever in the other ranks' reference pass. So rank 0 reads the cache
        and broadcasts the table (or ``None``: every rank runs the pass)."""
        import torch.distributed as dist

        if key is None:
            return None
        table = self.ref_cache.load(key, n) if self.is_world_process_zero() else None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [table]
            dist.broadcast_object_list(box, src=0)
            table = box[0]
        return table

    def _pass_device(self, model) -> torch.device:
        """Where the reference pass runs: where the model's weights are. Under DeepSpeed and
        FSDP the Trainer leaves the model on the CPU until ``train()`` shards it, while
        ``args.device`` is the rank's GPU; then the full model is moved to that GPU for the
        pass (and back afterwards) — scoring on the CPU would take hours for a real model."""
        here = next(model.parameters()).device
        target = self.args.device
        if here.type == "cpu" and target.type == "cuda":
            try:
                model.to(target)
            except torch.OutOfMemoryError:
                model.to(here)
                torch.cuda.empty_cache()
                raise RuntimeError(
                    f"the reference pass needs the full model on one GPU before training shards it, and it does not "
                    f"fit on {target}; set method.precompute_ref_logps: false (the reference is then computed live, "
                    "sharded like the policy)") from None
            return target
        return here

    @torch.no_grad()
    def _reference_pass(self, dataset) -> torch.Tensor:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        model, bs = self.model, self.args.per_device_eval_batch_size
        home = next(model.parameters()).device
        dev = self._pass_device(model)
        was_training = model.training
        model.eval()
        mine = list(range(rank, len(dataset), world))
        out: list[tuple[int, float, float]] = []
        try:
            for i in range(0, len(mine), bs):
                rows = [dataset[j] for j in mine[i:i + bs]]
                batch = _to_device(self.data_collator(rows), dev)
                sums = self.live_reference_logps(model, batch).float().cpu()
                b = len(rows)
                out += [(int(j), float(c), float(r))
                        for j, c, r in zip(batch["pair_index"].tolist(), sums[:b], sums[b:])]
        finally:
            model.train(was_training)
            if dev != home:  # hand the model back where the launcher expects it
                model.to(home)
                torch.cuda.empty_cache()
        if world > 1:
            parts: list = [None] * world
            dist.all_gather_object(parts, out)
            out = [x for part in parts for x in part]
        table = torch.full((len(dataset), 2), float("nan"))
        for j, c, r in out:
            table[j, 0], table[j, 1] = c, r
        if torch.isnan(table).any():
            raise RuntimeError("reference pass: some pairs got no reference log-probs (pair_index must be 0..N-1)")
        return table


def _model_config(model):
    return getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)


def _attn_impl(model) -> str | None:
    return getattr(_model_config(model), "_attn_implementation", None)


# ---------------------------------------------------------------- shared recipe flows


def train_preference(cfg: RunConfig, method, rows: list[dict], eval_rows: list[dict] | None,
                     weight_fn=None, callbacks=(), evaluate: Callable | None = None) -> Path:
    """Tokenise preference rows (with optional per-token weights) and run PreferenceTrainer.
    ``evaluate(cfg, run_dir, trainer, tokenizer)`` runs after the final model is saved (recipes
    pass :func:`alignkit.evaluation.evaluate_after_training`: evaluation is a later layer)."""
    import time

    from datasets import Dataset
    from transformers import set_seed

    from alignkit.data import tokenize_rows
    from alignkit.models import load_model, load_reference, load_tokenizer

    t0 = time.perf_counter()
    d = cfg.data
    tok = load_tokenizer(cfg.model)
    src = d.train.path
    train_tok, report = tokenize_rows("preference", rows, tok, src, d.max_length, d.length_policy, weight_fn,
                                      d.max_errors)
    eval_tok = None
    if eval_rows:
        eval_tok, _ = tokenize_rows("preference", eval_rows, tok, d.eval.path, d.max_length, d.length_policy,
                                    weight_fn, d.max_errors)
    tokenize_s = time.perf_counter() - t0
    run_dir, resume = prepare_run_dir(cfg)
    if is_main_process():
        atomic_write_text(run_dir / "data_report.json", json.dumps(report.as_dict(), indent=2))
    set_seed(cfg.seed)
    model = load_model(cfg.model)
    # Before the reference copy is taken, so policy and reference forwards are the same function at step 1.
    apply_disable_dropout(cfg, model, default=True)
    # With precomputed reference sums the policy itself (or the adapter-disabled base) is the reference of
    # the one pass before training, so no frozen copy is ever made.
    ref = None if method.precompute_ref_logps else load_reference(cfg.model, model)
    collator = preference_collator(tok.pad_token_id, d.padding_free is not False, _model_config(model))
    args = training_arguments(cfg, run_dir, remove_unused_columns=False)
    resume_step = checkpoint_step(resume)
    cache = (ReferenceCache(reference_cache_root(), reference_model_key(cfg.model, model))
             if method.precompute_ref_logps and method.ref_logps_cache else None)

    def dataset(toks):
        return Dataset.from_list([{**t, "pair_index": i} for i, t in enumerate(toks)])

    trainer = PreferenceTrainer(
        model=model, ref_model=ref, args=args, data_collator=collator,
        train_dataset=dataset(train_tok), eval_dataset=dataset(eval_tok) if eval_tok else None,
        processing_class=tok, callbacks=[RunLogCallback(run_dir, resume_step), *callbacks],
        beta=method.beta, loss_type=method.loss_type, label_smoothing=method.label_smoothing,
        precompute_ref=method.precompute_ref_logps, ref_cache=cache, logps_chunk_size=method.logps_chunk_size,
    )
    trainer.train(resume_from_checkpoint=resume)
    timings = {"tokenize_s": round(tokenize_s, 3), **trainer.timings}
    finish_run(trainer, tok, run_dir, {"data": report.as_dict(), "timings": timings})
    if evaluate is not None:
        evaluate(cfg, run_dir, trainer, tok)
    return run_dir
