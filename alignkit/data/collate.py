"""Preference collators: padded (the plain reference path) and packed (the default fast path).

Both describe a batch of B pairs the same way to the trainer: the model inputs, plus a
flat list of *targets*, one per completion token of each of the 2B sequences (chosen
sequences 0..B-1, then rejected B..2B-1, TRL's order)::

    keep       [R, L] bool   positions whose next-token logits are needed (logits_to_keep)
    tgt_flat   [N]           index of the predicting position among the kept ones (row-major)
    tgt_ids    [N]           the completion token being predicted
    tgt_w      [N]           its loss weight (Mask-DPO masks; 1 for plain DPO)
    tgt_seq    [N]           which of the 2B sequences it belongs to
    seq_tokens, seq_weight [2B]  completion tokens scored per sequence, and their summed weight
    pair_index [B]           the pairs' rows in the dataset (reference log-prob tables)

so per-sequence sums ``Σ_t w_t log p(y_t | ...)`` are one ``index_add`` over targets,
whatever the layout. Only completion positions reach the LM head (``keep``).

Packing (:class:`PackedPreferenceCollator`). Each pair becomes one unit
``[prompt, chosen, rejected]``: the prompt is stored and computed *once*; a 4D mask lets
chosen tokens attend to the prompt and earlier chosen tokens, and rejected tokens to the
prompt and earlier rejected tokens, with ``position_ids`` continuing from the prompt on
both branches — so every completion token sees exactly the context it has in its own
padded row (RoPE depends only on position ids). Units are bin-packed (first-fit
decreasing) into rows as long as the longest unit, which keeps the quadratic attention
cost near ``Σ L_i²`` instead of the ``(Σ L_i)²`` of packing everything into one row.
``shared_prompt=False`` packs ``[prompt, chosen]`` and ``[prompt, rejected]`` as separate
sequences marked only by ``position_ids`` restarting at 0 (transformers turns that into a
block mask, or varlen attention under flash-attention, which takes no 4D mask).

Which layout is cheaper depends on the batch: sdpa/eager attend over whole rows, so a
batch costs about ``R · L · (1 + a · L)`` token-layer units for R rows of length L, where
``a`` is the cost of one (query, key) pair relative to one token's linear layers
(:func:`attention_cost_ratio`). Sharing the prompt saves prompt tokens but makes rows
longer; with ``shared_prompt=None`` each batch takes the layout with the lower estimate
(both are exact). Long fixed-length pairs favour separate sequences, short prompts
with long-tailed completions either.

What each attention kernel and model family needs (:func:`attention_layout`):

* A 4D mask is used *as given* on every layer (transformers' ``_preprocess_mask_arguments``
  returns it untouched), so the tree mask must itself carry each layer type's pattern:
  a sliding window (Mistral, Gemma-2/3, Phi-3, Qwen2 with ``use_sliding_window``:
  ``pos_q - pos_kv < W``) or Llama-4's chunks (``pos_q // C == pos_kv // C``), measured in
  *position ids*, which is what the padded row's indices are. Models that mix layer types
  take a ``{layer type: mask}`` mapping (their ``causal_mask_mapping``). A bidirectional
  model makes the shared layout inexact, so it is never chosen for it; a layer type that is
  not attention (linear attention, convolutions) carries state across packed sequences, so
  such a model gets right-padded rows (:func:`attention_layout`).
* Separate sequences with restarting position ids are exact for sdpa, eager and flex:
  transformers remaps causal, window and chunk masks onto the position ids of packed rows.
* flash-attention takes no 4D mask, and splits a row into sequences from ``position_ids``
  only when the batch is a single row. ``varlen=True`` therefore packs every sequence into
  *one* row and passes ``cu_seq_lens_q/k`` and ``max_length_q/k`` explicitly, so varlen
  attention never depends on that inference (one row also has no padding at all: varlen
  attention costs ``Σ L_i²`` however the row is cut).
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


class _Targets:
    """Accumulates completion-token targets; ``add`` takes the row positions of one sequence."""

    def __init__(self) -> None:
        self.row: list[int] = []
        self.pos: list[int] = []
        self.ids: list[int] = []
        self.w: list[float] = []
        self.seq: list[int] = []

    def add(self, seq: int, row: int, pred_positions: list[int], ids: list[int], weights: list[float]) -> None:
        for p, t, w in zip(pred_positions, ids, weights):
            if p < 0:  # a completion token at sequence position 0 has no context to be predicted from
                continue
            self.row.append(row)
            self.pos.append(p)
            self.ids.append(t)
            self.w.append(float(w))
            self.seq.append(seq)

    def tensors(self, shape: tuple[int, int], num_seqs: int) -> dict[str, torch.Tensor]:
        row, pos = torch.tensor(self.row, dtype=torch.long), torch.tensor(self.pos, dtype=torch.long)
        seq, w = torch.tensor(self.seq, dtype=torch.long), torch.tensor(self.w, dtype=torch.float32)
        keep = torch.zeros(shape, dtype=torch.bool)
        keep[row, pos] = True
        # Rank of each kept position in row-major order = its index in the model's flattened kept logits.
        rank = keep.flatten().long().cumsum(0) - 1
        return {
            "keep": keep,
            "tgt_flat": rank[row * shape[1] + pos],
            "tgt_ids": torch.tensor(self.ids, dtype=torch.long),
            "tgt_w": w,
            "tgt_seq": seq,
            # Per sequence: completion tokens scored, and their summed weight (IPO's length, the kept share).
            "seq_tokens": torch.zeros(num_seqs).index_add(0, seq, torch.ones(len(self.seq))),
            "seq_weight": torch.zeros(num_seqs).index_add(0, seq, w),
        }


def _with_reference(batch: dict, examples: list[dict]) -> dict:
    if "pair_index" in examples[0]:
        batch["pair_index"] = torch.tensor([ex["pair_index"] for ex in examples], dtype=torch.long)
    if "ref_chosen_logps" in examples[0]:  # a dataset that carries its own reference sums (TRL's column names)
        batch["ref_chosen_logps"] = torch.tensor([ex["ref_chosen_logps"] for ex in examples])
        batch["ref_rejected_logps"] = torch.tensor([ex["ref_rejected_logps"] for ex in examples])
    return batch


@dataclass
class PreferenceCollator:
    """Right-padded ``[chosen_1..B; rejected_1..B]`` rows with a 2D attention mask (TRL's layout)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids, comp, weights = [], [], []
        tg = _Targets()
        b = len(examples)
        for s, side in enumerate(("chosen", "rejected")):
            for i, ex in enumerate(examples):
                p, c, w = list(ex["prompt_ids"]), list(ex[f"{side}_ids"]), list(ex[f"{side}_weights"])
                ids.append(p + c)
                comp.append([0] * len(p) + [1] * len(c))
                weights.append([0.0] * len(p) + w)
                tg.add(s * b + i, s * b + i, [len(p) + j - 1 for j in range(len(c))], c, w)
        m = self.pad_to_multiple_of
        batch = {
            "input_ids": _pad(ids, self.pad_token_id, torch.long, m),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0, torch.long, m),
            "completion_mask": _pad(comp, 0, torch.long, m),
            "loss_weights": _pad(weights, 0.0, torch.float32, m),
        }
        batch.update(tg.tensors(tuple(batch["input_ids"].shape), 2 * b))
        return _with_reference(batch, examples)


def _bin_pack(examples: list[dict], shared: bool) -> tuple[list[list[tuple[int, tuple[str, ...]]]], int]:
    """Units first-fit decreasing into rows as long as the longest unit: ``(rows, row length)``."""
    if shared:
        units = [(i, ("chosen", "rejected")) for i in range(len(examples))]
    else:
        units = [(i, (side,)) for side in ("chosen", "rejected") for i in range(len(examples))]

    def length(u):
        ex = examples[u[0]]
        return len(ex["prompt_ids"]) + sum(len(ex[f"{s}_ids"]) for s in u[1])

    cap = max(length(u) for u in units)
    rows: list[list[tuple[int, tuple[str, ...]]]] = []
    free: list[int] = []
    for u in sorted(units, key=length, reverse=True):
        n = length(u)
        slot = next((r for r, f in enumerate(free) if f >= n), None)
        if slot is None:
            rows.append([])
            free.append(cap)
            slot = len(rows) - 1
        rows[slot].append(u)
        free[slot] -= n
    return rows, cap


def attention_cost_ratio(config) -> float:
    """FLOPs of one (query, key) pair over one token's linear layers, per decoder layer, from a
    transformers config: ``4·H_attn / 2·(q, k, v, o and MLP weights)``."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(config, "intermediate_size", None) or 4 * h
    linear = 2 * (h * heads * head_dim * 2 + 2 * h * kv + 3 * h * inter)
    return 4 * heads * head_dim / linear


# Kernels that take a 4D boolean mask (flex gets it as a BlockMask, built by the trainer on its device).
MASK_KERNELS = ("sdpa", "eager", "flex_attention")


@dataclass(frozen=True)
class AttentionLayout:
    """How a model's attention can be fed a packed batch (:func:`attention_layout`).

    ``kernel``: ``"mask"`` (sdpa, eager, flex: 4D masks), ``"varlen"`` (flash-attention:
    one row and explicit ``cu_seq_lens``) or ``"padded"`` (an unknown kernel: only the
    right-padded layout with a 2D mask is known to be exact). ``layers``: per layer type,
    ``("full", None)``, ``("sliding", W)`` or ``("chunked", C)``; ``None`` when some layer's
    pattern is unknown, which rules out the shared-prompt tree mask. ``mapping``: the model
    mixes layer types and takes one mask per type."""

    kernel: str
    layers: dict[str, tuple[str, int | None]] | None
    mapping: bool = False

    @property
    def can_share_prompt(self) -> bool:
        return self.kernel == "mask" and self.layers is not None


def _layer_pattern(config, layer_type: str | None) -> tuple[str, int | None] | None:
    if layer_type in (None, "full_attention"):
        # Models without ``layer_types`` (Mistral, Phi-3) apply ``sliding_window`` to every layer.
        w = getattr(config, "sliding_window", None) if layer_type is None else None
        return ("sliding", int(w)) if w else ("full", None)
    if layer_type == "sliding_attention":
        w = getattr(config, "sliding_window", None)
        return ("sliding", int(w)) if w else None
    if layer_type == "chunked_attention":
        c = getattr(config, "attention_chunk_size", None)
        return ("chunked", int(c)) if c else None
    return None  # linear attention, convolutions, ...: no 4D mask describes them


def attention_layout(config) -> AttentionLayout:
    """What packing is exact for a transformers ``config`` (its ``_attn_implementation``,
    ``layer_types``, ``sliding_window``, ``attention_chunk_size``); see the module docstring."""
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    if attn in MASK_KERNELS:
        kernel = "mask"
    elif "flash" in attn:  # flash_attention_2/3 and the hub's flash kernels: varlen, position ids or cu_seq_lens
        kernel = "varlen"
    else:
        return AttentionLayout("padded", None)
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        return AttentionLayout(kernel, None)
    types = getattr(config, "layer_types", None)
    if not types:
        pattern = _layer_pattern(config, None)
        return AttentionLayout(kernel, {"full_attention": pattern})
    patterns = {t: _layer_pattern(config, t) for t in dict.fromkeys(types)}
    if any(p is None for p in patterns.values()):
        # A layer no attention mask describes (linear attention, convolutions: Qwen3-Next, LFM2,
        # Falcon-H1) carries its state from one packed sequence into the next, and a layer whose
        # window is unknown cannot be reproduced: only right-padded rows are known to be exact.
        return AttentionLayout("padded", None)
    return AttentionLayout(kernel, patterns, mapping=len(patterns) > 1)


@dataclass
class PackedPreferenceCollator:
    """Padding-free rows (see the module docstring). ``shared_prompt``: True (needs a kernel
    that takes a 4D mask: sdpa, eager, flex), False, or None = per batch, the cheaper by
    ``attention_cost`` (:func:`attention_cost_ratio` of the model). ``layers`` / ``mapping``:
    the model's attention pattern per layer type (:class:`AttentionLayout`), which the tree
    mask reproduces; the default is full causal attention on every layer. ``varlen``:
    flash-attention, one row of separate sequences with explicit ``cu_seq_lens``."""

    pad_token_id: int
    shared_prompt: bool | None = True
    attention_cost: float = 0.0
    layers: dict[str, tuple[str, int | None]] | None = None
    mapping: bool = False
    varlen: bool = False

    def __post_init__(self) -> None:
        if self.varlen and self.shared_prompt is not False:
            raise ValueError("varlen (flash-attention) batches take no 4D mask: use shared_prompt=False")

    @classmethod
    def for_layout(cls, pad_token_id: int, layout: AttentionLayout, attention_cost: float | None):
        """The default packing for a model: the cheaper of shared prompt and separate
        sequences per batch where both are exact, separate sequences otherwise."""
        if layout.kernel == "varlen":
            return cls(pad_token_id, shared_prompt=False, varlen=True)
        if layout.kernel != "mask":
            raise ValueError(f"no exact packed layout for attention kernel kind {layout.kernel!r}")
        if not layout.can_share_prompt:
            return cls(pad_token_id, shared_prompt=False)
        shared = True if attention_cost is None else None  # an unusual config: share the prompt always
        return cls(pad_token_id, shared_prompt=shared, attention_cost=attention_cost or 0.0, layers=layout.layers,
                   mapping=layout.mapping)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        b = len(examples)
        if self.varlen:
            shared, rows = False, [[(i, (side,)) for side in ("chosen", "rejected") for i in range(b)]]
            cap = sum(len(examples[i]["prompt_ids"]) + len(examples[i][f"{s[0]}_ids"]) for i, s in rows[0])
        elif self.shared_prompt is None:
            options = [(shared, *_bin_pack(examples, shared)) for shared in (True, False)]
            shared, rows, cap = min(options, key=lambda o: len(o[1]) * o[2] * (1 + self.attention_cost * o[2]))
        else:
            shared = self.shared_prompt
            rows, cap = _bin_pack(examples, shared)

        shape = (len(rows), cap)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        # Per token: the unit it belongs to and its branch (0 prompt, 1 chosen, 2 rejected), for the 4D mask.
        group = torch.full(shape, -1, dtype=torch.long)
        branch = torch.zeros(shape, dtype=torch.long)
        tg = _Targets()
        gid = 0
        seq_starts: list[int] = []  # varlen: where each sequence starts in the flattened batch
        for r, row in enumerate(rows):
            at = 0
            for i, sides in row:
                ex = examples[i]
                p = list(ex["prompt_ids"])
                seq_starts.append(r * cap + at)
                input_ids[r, at:at + len(p)] = torch.tensor(p, dtype=torch.long)
                position_ids[r, at:at + len(p)] = torch.arange(len(p))
                group[r, at:at + len(p)] = gid
                last_prompt = at + len(p) - 1
                at += len(p)
                for side in sides:
                    c, w = list(ex[f"{side}_ids"]), list(ex[f"{side}_weights"])
                    s = 0 if side == "chosen" else 1
                    input_ids[r, at:at + len(c)] = torch.tensor(c, dtype=torch.long)
                    position_ids[r, at:at + len(c)] = torch.arange(len(p), len(p) + len(c))
                    group[r, at:at + len(c)] = gid
                    branch[r, at:at + len(c)] = 1 + s
                    # Token j is predicted from the token before it on its own branch: the last prompt
                    # token for j = 0 (shared by both branches), else the previous completion token.
                    pred = [last_prompt if j == 0 else at + j - 1 for j in range(len(c))]
                    if not p:
                        pred[0] = -1
                    tg.add(s * b + i, r, pred, c, w)
                    at += len(c)
                gid += 1
            # Row tail: padding, each token its own sequence (restarting position ids).
            position_ids[r, at:] = 0
        batch = {"input_ids": input_ids, "position_ids": position_ids}
        if shared:
            batch["attention_mask"] = self._tree_masks(group, branch, position_ids)
        if self.varlen:
            # flash-attention's varlen kwargs (transformers' FlashAttentionKwargs): int32 offsets of every
            # sequence in the flattened [1, L] batch, and the longest sequence as a Python int.
            cu = torch.tensor(seq_starts + [cap], dtype=torch.int32)
            longest = int((cu[1:] - cu[:-1]).max())
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=longest, max_length_k=longest)
        batch.update(tg.tensors(shape, 2 * b))
        return _with_reference(batch, examples)

    def _tree_masks(self, group, branch, position_ids):
        layers = self.layers or {"full_attention": ("full", None)}
        masks = {t: tree_attention_mask(group, branch, position_ids, *pattern) for t, pattern in layers.items()}
        return masks if self.mapping else next(iter(masks.values()))


def tree_attention_mask(group: torch.Tensor, branch: torch.Tensor, position_ids: torch.Tensor | None = None,
                        kind: str = "full", size: int | None = None) -> torch.Tensor:
    """``[R, 1, L, L]`` bool, True = may attend: causal, within a unit, and never across
    branches (chosen <-> rejected); prompt tokens are visible to both. Padding (group -1)
    attends only to itself, so no softmax row is empty.

    ``kind`` = ``"sliding"`` keeps keys less than ``size`` positions back
    (transformers' ``sliding_window_overlay``: ``kv > q - W``), ``"chunked"`` keeps keys in the
    query's ``size``-token chunk (``chunked_overlay``); both count in ``position_ids``, because a
    rejected token sits after the chosen branch in the row but right after the prompt in its
    own sequence."""
    r, n = group.shape
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same_unit = group[:, :, None] == group[:, None, :]
    branch_ok = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    allowed = same_unit & branch_ok & causal
    if kind != "full":
        if position_ids is None or not size:
            raise ValueError(f"a {kind} tree mask needs position ids and a size")
        q, k = position_ids[:, :, None], position_ids[:, None, :]
        allowed &= (k > q - size) if kind == "sliding" else (torch.div(q, size, rounding_mode="floor")
                                                             == torch.div(k, size, rounding_mode="floor"))
    pad = (group < 0)[:, :, None]
    eye = torch.eye(n, dtype=torch.bool)
    return torch.where(pad, eye, allowed).unsqueeze(1)
