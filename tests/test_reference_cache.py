"""The reference log-prob cache and pass under real conditions (issue 21, findings 3-6):
the key names the numerics the model was loaded with, rank 0 decides hit or miss for every
rank, a torn or foreign file is a miss that gets replaced, writes are fsynced, and the pass
runs where the model is, whatever ``args.device`` says."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _pairs(n: int = 6, seed: int = 0, vocab: int = 96) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p, c, r = rng.randint(2, 6), rng.randint(2, 8), rng.randint(2, 8)
        rows.append({"pair_index": i, "prompt_ids": [rng.randrange(5, vocab) for _ in range(p)],
                     "chosen_ids": [rng.randrange(5, vocab) for _ in range(c)],
                     "rejected_ids": [rng.randrange(5, vocab) for _ in range(r)],
                     "chosen_weights": [1.0] * c, "rejected_weights": [1.0] * r})
    return rows


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def _trainer(model, cache, out: Path, rows=None):
    from datasets import Dataset
    from transformers import TrainingArguments

    from alignkit.data import PackedPreferenceCollator
    from alignkit.training.preference import PreferenceTrainer

    args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, remove_unused_columns=False,
                             per_device_eval_batch_size=2)
    return PreferenceTrainer(model=model, args=args, data_collator=PackedPreferenceCollator(0),
                             train_dataset=Dataset.from_list(rows or _pairs()), precompute_ref=True, ref_cache=cache)


# ---------------------------------------------------------------- finding 3: the key


def test_key_names_the_loaded_dtype_and_kernel_not_the_configured_strings():
    from alignkit.config.schema import ModelConfig
    from alignkit.training.reference import reference_model_key

    cfg = ModelConfig(name_or_path="org/some-model", dtype="auto")
    fp32 = _tiny_llama()
    bf16 = _tiny_llama().to(torch.bfloat16)
    eager = _tiny_llama()
    eager.set_attn_implementation("eager")
    k32, k16, keager = (json.loads(reference_model_key(cfg, m)) for m in (fp32, bf16, eager))
    assert k32["dtype"] == "float32" and k16["dtype"] == "bfloat16"  # never the literal "auto"
    assert k32["attn"] == "sdpa" and keager["attn"] == "eager"  # never None
    assert len({json.dumps(k, sort_keys=True) for k in (k32, k16, keager)}) == 3


# ---------------------------------------------------------------- finding 6: torn files, fsync, temp files


def test_unreadable_cache_file_is_a_miss_and_is_replaced(tmp_path):
    from alignkit.training.reference import ReferenceCache

    cache = ReferenceCache(tmp_path / "ref", "model-a")
    trainer = _trainer(_tiny_llama(), cache, tmp_path / "out")
    key = cache.key(trainer.train_dataset)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / f"{key}.pt").write_bytes(b"PK\x03\x04 truncated by a crash")
    trainer.prepare_reference(splits=("train",))
    assert trainer.timings["ref_logps_train_cache"] == "miss"
    table = torch.load(tmp_path / "ref" / f"{key}.pt", weights_only=True)
    torch.testing.assert_close(table, trainer.ref_tables["train"])

    # A table of the wrong shape or with NaNs (another dataset, a bad write) is a miss too.
    for bad in (torch.zeros(3, 2), torch.full((6, 2), float("nan"))):
        torch.save(bad, tmp_path / "ref" / f"{key}.pt")
        assert cache.load(key, 6) is None


def test_save_fsyncs_before_the_rename_and_removes_stale_temp_files(tmp_path, monkeypatch):
    from alignkit.training.reference import ReferenceCache

    root = tmp_path / "ref"
    root.mkdir()
    stale, fresh = root / ".abc.123.tmp", root / ".def.456.tmp"
    stale.write_bytes(b"half a table")
    fresh.write_bytes(b"another process, writing right now")
    old = os.stat(stale).st_mtime - 2 * 24 * 3600  # two days old: no live writer takes that long
    os.utime(stale, (old, old))

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    ReferenceCache(root, "m").save("k", torch.ones(4, 2))
    assert events[:2] == ["fsync", "replace"]
    assert not stale.exists() and fresh.exists()
    assert torch.equal(torch.load(root / "k.pt", weights_only=True), torch.ones(4, 2))
    assert sorted(p.name for p in root.iterdir()) == [".def.456.tmp", "k.pt"]


# ---------------------------------------------------------------- finding 5: where the pass runs


def test_reference_pass_runs_where_the_model_is_not_at_args_device(tmp_path, monkeypatch):
    """Under DeepSpeed/FSDP the Trainer leaves the model on the CPU while ``args.device`` is
    the rank's GPU; batches sent to ``args.device`` then meet CPU weights. Here ``args.device``
    reports a device the model is not on (meta), which reproduces that on any machine."""
    from transformers import TrainingArguments

    trainer = _trainer(_tiny_llama(), None, tmp_path)
    monkeypatch.setattr(TrainingArguments, "device", property(lambda self: torch.device("meta")))
    trainer.prepare_reference(splits=("train",))
    table = trainer.ref_tables["train"]
    assert table.shape == (6, 2) and torch.isfinite(table).all() and (table < 0).all()
    assert next(trainer.model.parameters()).device.type == "cpu"


# ---------------------------------------------------------------- finding 4: rank 0 decides


_WORKER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import torch
    from test_reference_cache import _trainer, _tiny_llama
    from alignkit.training.reference import ReferenceCache

    rank = int(os.environ["RANK"])
    out = {out!r}
    cache = ReferenceCache(os.path.join(out, f"cache{{rank}}"), "model-a")
    trainer = _trainer(_tiny_llama(), cache, os.path.join(out, f"run{{rank}}"))
    trainer.prepare_reference(splits=("train",))
    json.dump({{"cache": trainer.timings["ref_logps_train_cache"], "table": trainer.ref_tables["train"].tolist()}},
              open(os.path.join(out, f"rank{{rank}}.json"), "w"))
    torch.distributed.barrier()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("hit_on", [0, 1])
def test_two_ranks_whose_caches_disagree_follow_rank_0(tmp_path, hit_on):
    """Node-local caches: one rank finds a table, the other does not. Every rank must take
    rank 0's decision (and its table), or the missing rank waits forever in the pass's gather."""
    from datasets import Dataset

    from alignkit.training.reference import ReferenceCache

    planted = torch.arange(12, dtype=torch.float32).view(6, 2) - 20.0  # recognisably not a real pass
    cache = ReferenceCache(tmp_path / f"cache{hit_on}", "model-a")
    cache.save(cache.key(Dataset.from_list(_pairs())), planted)

    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(ROOT / "tests"), out=str(tmp_path)))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
        pytest.fail("a rank hung: the ranks decided hit or miss separately")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0]["table"] == got[1]["table"]
    if hit_on == 0:  # rank 0 hit: both use the planted table, nobody ran the pass
        assert [g["cache"] for g in got] == ["hit", "hit"]
        assert got[1]["table"] == planted.tolist()
    else:  # rank 0 missed: both ran the pass (rank 1's planted table is ignored)
        assert [g["cache"] for g in got] == ["miss", "miss"]
        assert got[1]["table"] != planted.tolist()
