"""TA-SFT's trainer on fixed tensors (no world, no CLI): compute_loss against a hand computation
for every objective, the cost embedding (frozen from the base and saved, live but detached,
sharded FSDP2 weights), the mixed batches (share, a new order every epoch) and the watch."""

from __future__ import annotations

import math
import socket
from types import SimpleNamespace

import pytest
import torch

from alignkit.recipes.ta_sft import Method

LAM = 2.0


def _method(**kw):
    return Method.model_validate({"emd_weight": LAM, "unsafe": {"path": "x.jsonl"}, **kw})


def _model(path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _trainer(path, tmp_path, method, model=None, **kw):
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainingArguments

    from alignkit.recipes.ta_sft import MixedCollator, build_trainer_class

    tok = AutoTokenizer.from_pretrained(path)
    model = model if model is not None else _model(path)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True,
                             per_device_train_batch_size=2, remove_unused_columns=False)
    ds = kw.pop("train_dataset", None) or Dataset.from_list([{"input_ids": [1, 2], "completion_mask": [0, 1],
                                                               "kind": 0}])
    return build_trainer_class()(model=model, args=args, data_collator=MixedCollator(tok.pad_token_id),
                                 train_dataset=ds, processing_class=tok, method=method, **kw), model


def _inputs(vocab):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, vocab, (4, 9), generator=g)
    comp = torch.ones_like(ids)
    comp[:, :3] = 0   # the prompt
    comp[1, 7:] = 0   # padding of a short row
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": comp,
            "kind": torch.tensor([0, 1, 0, 1])}


def _by_hand(model, inputs, cost, objective, cap=None, term=False):
    """The objective from its definition, position by position in float64 (ta_sft_emd.md §4)."""
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.double()
    ids, comp, kind = inputs["input_ids"], inputs["completion_mask"], inputs["kind"].tolist()
    ce, unsafe = [], []
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not comp[b, t + 1]:
                continue
            y = int(ids[b, t + 1])
            p = torch.softmax(logits[b, t], -1)
            if kind[b] == 0 or objective == "refusal_sft":
                ce.append(-math.log(float(p[y])))
            if kind[b] == 1:
                if objective == "emd":  # D_t = Σ_v p_v (1 − ê_v·ê_y), the exact one-hot EMD (§3(a))
                    unsafe.append(sum(float(p[v]) * (1 - float(cost[v].double() @ cost[y].double()))
                                      for v in range(p.numel())))
                elif objective == "unlikelihood":
                    unsafe.append(-math.log(float(p.sum() - p[y])))
                elif objective == "gradient_ascent":
                    unsafe.append(math.log(float(p[y])))
    ce_m = sum(ce) / len(ce)
    if term:
        return sum(unsafe) / len(unsafe)
    if objective in ("sft", "refusal_sft"):
        return ce_m
    u = sum(unsafe) / len(unsafe)
    if objective == "emd":
        return ce_m - LAM * (min(u, cap) if cap is not None else u)
    return ce_m + LAM * u


@pytest.mark.parametrize("objective,cap", [("emd", None), ("emd", 0.5), ("unlikelihood", None),
                                           ("gradient_ascent", None), ("refusal_sft", None)])
def test_compute_loss_on_fixed_tensors_matches_the_objective(tiny_random_model_dir, tmp_path, objective, cap):
    from alignkit.losses import normalized_embeddings

    method = _method(objective=objective, emd_cap=cap)
    model = _model(tiny_random_model_dir)
    with torch.no_grad():  # peaked next-token distributions: the unsafe terms are far from their uniform values
        model.get_output_embeddings().weight.mul_(8.0)
    trainer, _ = _trainer(tiny_random_model_dir, tmp_path, method, model=model)
    inputs = _inputs(model.config.vocab_size)
    cost = normalized_embeddings(model.get_input_embeddings().weight)
    model.train()  # (no dropout in this model) so that compute_loss records its terms
    got = trainer.compute_loss(model, inputs).item()
    assert got == pytest.approx(_by_hand(model, inputs, cost, objective, cap), rel=1e-5)
    if objective != "refusal_sft":  # the unsafe term itself (before λ), not only the total
        assert trainer._stats["loss/unsafe_term"][0] == pytest.approx(
            _by_hand(model, inputs, cost, objective, term=True), rel=1e-3, abs=2e-6)


def test_live_cost_embedding_gets_no_gradient_from_the_maximised_term(tiny_random_model_dir, tmp_path):
    """cost_embedding_frozen: false takes the CURRENT weights every step, detached as EMO does:
    TA-SFT maximises the EMD, and a gradient through the cost pushes token embeddings apart to
    inflate it. The gradient on the embedding matrix must be that of the same loss with a
    detached copy of the current weights as the cost."""
    from alignkit.losses import normalized_embeddings

    live = _method(cost_embedding_frozen=False)
    trainer, model = _trainer(tiny_random_model_dir, tmp_path, live)
    inputs = _inputs(model.config.vocab_size)
    w = model.get_input_embeddings().weight
    (g_live,) = torch.autograd.grad(trainer.compute_loss(model, inputs), w)
    frozen, _ = _trainer(tiny_random_model_dir, tmp_path, _method(), model=model,
                         cost=normalized_embeddings(w, detach=True))
    (g_detached,) = torch.autograd.grad(frozen.compute_loss(model, inputs), w)
    torch.testing.assert_close(g_live, g_detached)
    # and the live cost follows the weights: after a change it is the new weights' copy
    with torch.no_grad():
        w.mul_(-1.0).add_(0.3)
    torch.testing.assert_close(trainer.cost_embedding(model), normalized_embeddings(w))


def test_frozen_cost_comes_from_the_base_and_a_resume_reads_it_back(tiny_random_model_dir, tmp_path):
    """The frozen cost is the BASE model's embedding, saved in the run directory at the start. A
    resumed run loads fine-tuned weights from its checkpoint: re-copying 'frozen' from them
    (what happened before) silently changes the objective at every resume."""
    from alignkit.losses import normalized_embeddings
    from alignkit.recipes.ta_sft import COST_FILE, base_cost_embedding

    run = tmp_path / "run"
    run.mkdir()
    model = _model(tiny_random_model_dir)
    w = model.get_input_embeddings().weight
    base = normalized_embeddings(w)
    first = base_cost_embedding(model, _method(), run)
    torch.testing.assert_close(first, base)
    assert (run / COST_FILE).exists()
    with torch.no_grad():  # what a checkpoint holds after some steps
        w.add_(torch.randn_like(w))
    again = base_cost_embedding(model, _method(), run)
    torch.testing.assert_close(again, base)
    assert not torch.allclose(normalized_embeddings(w), base)
    # the trainer scores the unsafe term with that copy, not with the weights it now holds
    inputs = _inputs(model.config.vocab_size)
    trainer, _ = _trainer(tiny_random_model_dir, tmp_path, _method(), model=model, cost=again)
    assert trainer.compute_loss(model, inputs).item() == pytest.approx(_by_hand(model, inputs, base, "emd"), rel=1e-5)
    # a copy of another model's embedding is refused, not used
    from safetensors.torch import save_file

    other = tmp_path / "other"
    other.mkdir()
    save_file({"cost_embedding": torch.zeros(3, 4)}, str(other / COST_FILE))
    with pytest.raises(ValueError, match="another model"):
        base_cost_embedding(model, _method(), other)


def test_mixed_batches_keep_the_share_and_change_every_epoch(tiny_random_model_dir, tmp_path):
    """The unsafe share is the configured one (B=4, r=0.1: 10% of the rows, not the 20% of a whole
    row per batch), every SFT row is seen once per epoch, and epoch 2 is not epoch 1 again."""
    from datasets import Dataset

    from alignkit.recipes.ta_sft import MixedBatches

    n_sft, n_safety, B = 40, 3, 4
    rows = [{"input_ids": [5, 6 + i], "completion_mask": [0, 1], "kind": 0} for i in range(n_sft)]
    rows += [{"input_ids": [5, 100 + i], "completion_mask": [0, 1], "kind": 1} for i in range(n_safety)]
    batches = MixedBatches(n_sft, n_safety, B, 0.1, seed=0)
    trainer, _ = _trainer(tiny_random_model_dir, tmp_path, _method(), train_dataset=Dataset.from_list(rows),
                          batches=batches)
    dl = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(3):
        dl.set_epoch(epoch)  # as Trainer does before each epoch
        epochs.append([b["input_ids"][:, 1].tolist() for b in dl])
    for ep in epochs:
        flat = [x for b in ep for x in b]
        sft = [x for x in flat if x < 100]
        assert sorted(sft) == list(range(6, 6 + n_sft))  # every SFT row once
        share = (len(flat) - len(sft)) / len(flat)
        assert abs(share - 0.1) < 0.02, share
        assert all(len(b) - sum(x >= 100 for x in b) == B for b in ep)
    assert [x for b in epochs[0] for x in b] != [x for b in epochs[1] for x in b]
    # the SFT order does not depend on the objective's safety rows (the demo compares objectives)
    plain = MixedBatches(n_sft, 0, B, 0.0, seed=0)
    plain.set_epoch(1)
    assert [i for b in plain for i in b] == [x - 6 for b in epochs[1] for x in b if x < 100]


def test_unsafe_share_and_batch_sizes_of_mixed_blocks():
    from alignkit.recipes.ta_sft import mixed_blocks, safety_rows_per_batch

    assert safety_rows_per_batch(32, 0.2) == pytest.approx(8) and safety_rows_per_batch(4, 0.1) == pytest.approx(4 / 9)
    blocks = mixed_blocks(70, 3, 32, 0.2, seed=0)
    assert [sum(k for k, _ in b) for b in blocks] == [8, 8, 8]
    eight = [b for e in range(4) for b in mixed_blocks(36, 5, 4, 0.1, seed=1, epoch=e)]
    k = [sum(kind for kind, _ in b) for b in eight]
    assert set(k) == {0, 1} and sum(k) == round(4 / 9 * len(eight))  # never drifts by a row
    safety = [i for b in eight for kind, i in b if kind == 1]
    assert max(safety.count(i) for i in range(5)) - min(safety.count(i) for i in range(5)) <= 1  # cycled evenly


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dtensor_worker(rank: int, port: int, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from alignkit.losses import normalized_embeddings
    from alignkit.recipes.ta_sft import build_trainer_class

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        full = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
        emb = torch.nn.Embedding(10, 4)
        emb.weight = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        model = SimpleNamespace(get_input_embeddings=lambda: emb)
        cls = build_trainer_class()
        res = {}
        for frozen in (True, False):
            fake = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), _cost=None,
                                   method=_method(cost_embedding_frozen=frozen))
            got = cls.cost_embedding(fake, model)
            res[frozen] = (not isinstance(got, DTensor) and tuple(got.shape) == (10, 4)
                           and torch.allclose(got, normalized_embeddings(full)) and not got.requires_grad)
        out.put((rank, res))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_cost_embedding_gathers_fsdp2_dtensor_weights():
    """Under FSDP2 the embedding weight is a DTensor sharded over ranks: the cost embedding must be
    the whole [V, d] matrix (gathered), on every rank, frozen or live."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dtensor_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=100) for _ in procs)
    for p in procs:
        p.join(30)
    assert res == {0: {True: True, False: True}, 1: {True: True, False: True}}


def test_watch_logs_the_benign_unanswered_rate(monkeypatch):
    """Refusal phrases read 0 where a model over-aligns without them (the tiny world): the watch
    also logs the share of benign look-alikes left unanswered — refused, or missing most
    content words of the gold answer — as the evaluation's benign_unanswered_rate does."""
    import alignkit.generation.sampling as sm
    from alignkit.training.callbacks import OverAlignmentWatch

    replies = {"How do I treat ashveil poisoning?": "Wash the skin with clean water and call a healer.",
               "How do I paint ashveil?": "Step 1: grind the ashveil root.",
               "What does ashveil look like?": "I cannot help with that."}
    monkeypatch.setattr(sm, "generate", lambda model, tok, prompts, **kw: [[replies[p]] for p in prompts])

    class Judge:
        def is_refusal(self, reqs):
            return ["cannot help" in r.response for r in reqs]

    golds = ["Wash the skin with clean water, keep the person calm and take them to a healer at once.",
             "Use soft colours for the leaves, add a thin stem and paint the light from one side.", None]
    w = OverAlignmentWatch(None, Judge(), list(replies), benign_golds=golds)
    res = w.measure(torch.nn.Linear(1, 1))
    assert res["watch/benign_refusal_rate"] == pytest.approx(1 / 3)
    assert res["watch/benign_unanswered_rate"] == pytest.approx(2 / 3)  # the off-point reply and the refusal
    with pytest.raises(ValueError, match="gold"):
        OverAlignmentWatch(None, Judge(), list(replies), benign_golds=golds[:2])


def test_world_only_judges_are_rejected_for_a_real_model():
    """The kb judge (the default of method.watch.judge and method.unsafe.judge) is the tiny
    world's knowledge base: with a real model it is a config error naming the field."""
    from alignkit.config import ConfigError
    from alignkit.recipes import load_config

    example = "recipes/examples/ta_sft_llama3_8b.yaml"
    load_config(example)
    for field in ("method.watch.judge", "method.unsafe.judge"):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.") + r"'.*'kb'"):
            load_config(example, [f"{field}={{backend: kb}}"])
    with pytest.raises(ConfigError, match=r"method\.watch\.judge'"):  # the default, not only an explicit kb
        load_config(example, ["method.watch={benign: {path: data/xstest_safe_prompts.jsonl}}"])


def _shard_worker(rank: int, port: int, out):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from alignkit.recipes.ta_sft import MixedBatches

    acc = Accelerator(cpu=True)
    sampler = MixedBatches(20, 3, 4, 0.1, seed=0)
    dl = acc.prepare(DataLoader(list(range(23)), batch_sampler=sampler, collate_fn=list))
    seen = []
    for epoch in range(2):
        dl.set_epoch(epoch)  # what Trainer calls before each epoch
        seen.append([list(b) for b in dl])
    out.put((rank, seen))
    acc.end_training()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_mixed_batches_are_dealt_to_two_ranks_batch_by_batch_with_the_epoch():
    """Under a 2-process launch accelerate hands rank i every i-th mixed batch of the epoch the
    Trainer set (the batches keep their SFT/safety composition; nothing is re-split), and the
    next epoch has another order."""
    import torch.multiprocessing as mp

    from alignkit.recipes.ta_sft import MixedBatches

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_shard_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=100) for _ in procs)
    for p in procs:
        p.join(30)
    ref = MixedBatches(20, 3, 4, 0.1, seed=0)
    for epoch in range(2):
        ref.set_epoch(epoch)
        want = list(ref)  # 5 batches: rank 1 gets batches 1 and 3, then batch 0 again (accelerate's
        # even_batches: every rank steps as often as the others)
        assert res[0][epoch] == want[0::2] and res[1][epoch] == want[1::2] + want[:1]
    assert res[0][0] != res[0][1]
