"""PreferenceTrainer against an independent computation from raw rows, metric aggregation,
and dropout (issue #7 §2).

The other trainer tests (grad accumulation, precomputed reference, padding-free) compare
the trainer with itself; here every number is rebuilt by hand: the chat template text,
one full forward per sequence, log p(x_t | x_<t) in a python loop, Mask-DPO weights from
the sentences' character spans, and -logsigmoid(beta * ((pc - rc) - (pr - rr))).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import build_random_tiny_model, toy_config, write_toy_data

BETA = 0.1
ROWS = [
    {"prompt": "Tell me about Velm.",
     "chosen_sentences": ["Velm is the capital of Tarnia. ", "It was founded in 1921."],
     "chosen_labels": ["correct", "hallucination"],
     "rejected_sentences": ["Velm is in Bavoru. ", "Dr. Smith paid $3.50 for it. ", "Really?"],
     "rejected_labels": ["hallucination", "correct", "nofact"]},
    {"prompt": "Who is Bavoru Telkin?",
     "chosen_sentences": ["Bavoru Telkin was born in 1921. ", "Hello world."],
     "chosen_labels": ["correct", "nofact"],
     "rejected_sentences": ["Bavoru Telkin was born in Velm. ", "This is a tiny tokenizer!"],
     "rejected_labels": ["hallucination", "hallucination"]},
    {"prompt": "Hello",
     "chosen_sentences": ["Hello world. ", "Yes."], "chosen_labels": ["correct", "correct"],
     "rejected_sentences": ["Yes. ", "2.5 kg of apples."], "rejected_labels": ["hallucination", "correct"]},
]
for _r in ROWS:
    _r["chosen"], _r["rejected"] = "".join(_r["chosen_sentences"]), "".join(_r["rejected_sentences"])

# Mask-DPO (mask_dpo.md §2, default nofact policy): weight 0 on the chosen side's
# hallucinated sentences and on the rejected side's correct and nofact sentences.
ZERO = {"chosen": {"hallucination"}, "rejected": {"correct", "nofact"}}


def _naive_side(model, tok, row, side, masked):
    """Summed (weighted) completion log-prob of one sequence, computed from scratch."""
    msgs = [{"role": "user", "content": row["prompt"]}]
    prompt_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": row[side]}], tokenize=False)
    # The template appends content + "<|end|>\n"; the stop token is trained, the newline after it is not.
    segment = row[side] + tok.eos_token
    assert full == prompt_text + segment + "\n"
    p_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    enc = tok(segment, add_special_tokens=False, return_offsets_mapping=True)
    c_ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # Character spans of the sentences inside the content.
    spans, pos = [], 0
    for sent, lab in zip(row[f"{side}_sentences"], row[f"{side}_labels"]):
        spans.append((pos, pos + len(sent), lab))
        pos += len(sent)
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for j, tok_id in enumerate(c_ids):
        t = len(p_ids) + j
        lp = logp[t - 1, tok_id].item()  # log p(x_t | x_<t) from position t-1
        w = 1.0
        if masked:
            s, e = offsets[j]
            first = next((k for k in range(s, e) if not segment[k].isspace()), s)  # " Paris" -> "P"
            for a, b, lab in spans:
                if a <= first < b and lab in ZERO[side]:
                    w = 0.0
        total += w * lp
    return total


def _naive_loss(policy, ref, tok, rows, masked):
    losses = []
    for row in rows:
        pc, pr = (_naive_side(policy, tok, row, s, masked) for s in ("chosen", "rejected"))
        rc, rr = (_naive_side(ref, tok, row, s, masked) for s in ("chosen", "rejected"))
        z = BETA * ((pc - rc) - (pr - rr))
        losses.append(-math.log(1 / (1 + math.exp(-z))))
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def policy_and_ref(tiny_random_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float32)
    ref = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy, ref, tok


@pytest.mark.parametrize("layout", ["padded", "packed_shared_prompt", "packed_sequences"])
@pytest.mark.parametrize("recipe", ["dpo", "mask_dpo"])
def test_compute_loss_matches_naive_reference(policy_and_ref, tmp_path, recipe, layout):
    from transformers import TrainingArguments

    from alignkit.data import PackedPreferenceCollator, PreferenceCollator, tokenize_rows, validate_rows
    from alignkit.recipes.mask_dpo import Method, weights_for
    from alignkit.training.preference import PreferenceTrainer

    policy, ref, tok = policy_and_ref
    masked = recipe == "mask_dpo"
    rows = validate_rows("preference", list(enumerate(ROWS, start=1)), "mem")
    toks, _ = tokenize_rows("preference", rows, tok, "mem", max_length=None,
                            weight_fn=weights_for(Method()) if masked else None)
    collator = (PreferenceCollator(tok.pad_token_id) if layout == "padded"
                else PackedPreferenceCollator(tok.pad_token_id, shared_prompt=layout == "packed_shared_prompt"))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False)
    trainer = PreferenceTrainer(model=policy, ref_model=copy.deepcopy(ref), args=args, data_collator=collator,
                                processing_class=tok, beta=BETA)
    batch = collator([{k: v for k, v in t.items() if k != "_row"} for t in toks])
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch).item()
    want = _naive_loss(policy, ref, tok, ROWS, masked)
    assert got == pytest.approx(want, abs=1e-5)
    # The masks really are in play: the two losses differ.
    assert want != pytest.approx(_naive_loss(policy, ref, tok, ROWS, not masked), abs=1e-4)


# ---------------------------------------------------------------- metric aggregation


def test_accumulate_pair_stats_weights_every_pair_once():
    from alignkit.training.preference import accumulate_pair_stats

    acc = {}
    # Two micro-batches of 3 and 2 pairs (gradient accumulation with a short last batch).
    accumulate_pair_stats(acc, {"m": torch.tensor([1.0, 2.0, 3.0])}, lambda v: v)
    accumulate_pair_stats(acc, {"m": torch.tensor([10.0, 20.0])}, lambda v: v)
    total, count = acc["m"]
    assert count == 5 and total / count == pytest.approx(36 / 5)  # not (2 + 15) / 2

    # Two ranks; the last batch holds 3 real pairs: rank 0 has 2, rank 1 has 1 real + 1
    # duplicate that gather_for_metrics trims. Per-pair gathering keeps rank 1's real pair.
    def gather_last(v, other=torch.tensor([5.0, 99.0]), remainder=3):
        return torch.cat([v, other])[:remainder]

    acc = {}
    accumulate_pair_stats(acc, {"m": torch.tensor([1.0, 3.0])}, gather_last)
    total, count = acc["m"]
    assert (total, count) == (9.0, 3)


def test_logged_metrics_are_means_over_all_pairs_of_the_step(tiny_random_model_dir, tmp_path):
    """GA 2 x batch 3 over 5 pairs: step 1 logs the mean over all 5 pairs, not a mean of means."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.recipes import get_recipe, load_config

    data = write_toy_data(tmp_path / "d", n=5)["pref"]
    raw = toy_config("dpo", tiny_random_model_dir, data, tmp_path / "run", max_steps=1,
                     per_device_train_batch_size=3, gradient_accumulation_steps=2)
    raw["data"]["max_length"] = None  # no truncation: the naive sums see whole sequences
    run = get_recipe("dpo").train(load_config(raw))
    step1 = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    tok = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float32)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    want = sum(_naive_side(model, tok, r, "chosen", masked=False) for r in rows) / len(rows)
    assert step1["logps/chosen"] == pytest.approx(want, abs=1e-4)


# ---------------------------------------------------------------- dropout


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory):
    path = build_random_tiny_model(tmp_path_factory.mktemp("dropout") / "model")
    cfg = json.loads((path / "config.json").read_text())
    cfg["attention_dropout"] = 0.1
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_disable_dropout_zeroes_attention_and_lora_dropout(dropout_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.models import disable_dropout

    model = AutoModelForCausalLM.from_pretrained(dropout_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    assert disable_dropout(model) > 0
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(v == 0 for m in model.modules() for k, v in vars(m).items()
               if "dropout" in k and isinstance(v, float))
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # deterministic in train mode


def _metrics(run):
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_preference_step1_is_log2_with_dropout_model(dropout_model_dir, toy_data, tmp_path):
    from alignkit.recipes import get_recipe, load_config

    def run(name, model=None, **method):
        raw = toy_config("mask_dpo", dropout_model_dir, toy_data["pref"], tmp_path / name, max_steps=2)
        raw["model"].update(lora={"r": 4, "alpha": 8, "dropout": 0.1}, **(model or {}))
        raw["method"] = method
        return _metrics(get_recipe("mask_dpo").train(load_config(raw)))

    live, pre = run("live"), run("pre", precompute_ref_logps=True)
    # The model really has dropout: kept on, step 1 is noise around log 2.
    noisy = run("noisy", model={"disable_dropout": False})
    assert abs(noisy[0]["loss"] - math.log(2)) > 1e-4
    # Policy == reference at step 1 (LoRA B = 0): loss is exactly log 2, margins 0.
    assert live[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert live[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for a, b in zip(live, pre):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6)
