"""Rendering, tokenisation, span -> token weights, length policy and collators on the tiny tokenizer/model."""

from __future__ import annotations

import pytest
import torch

from alignkit.data import (
    DataError,
    PackedPreferenceCollator,
    PreferenceCollator,
    encode,
    render,
    span_weights,
    split_spans,
    tokenize_rows,
    validate_rows,
)
from alignkit.losses import IGNORE_INDEX, token_logps

END = "<|end|>"


@pytest.fixture(scope="module")
def tok(tiny_random_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_random_model_dir)


@pytest.fixture(scope="module")
def model(tiny_random_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float32)
    return m.eval()


PROMPT = [{"role": "user", "content": "Tell me about Tarnia."}]
TWO = "The capital of Tarnia is Velm. Bavoru Telkin was born in 1921."
TRICKY = 'Dr. Smith paid $3.50 for "café" apples.\nYes, really.'


def _rows(kind, rows):
    return validate_rows(kind, list(enumerate(rows, start=1)), "mem.jsonl")


# ----------------------------------------------------------------------------- render / encode


@pytest.mark.parametrize("completion", [TWO, TRICKY, "Ünïcödé — ok?", "  padded  "])
def test_render_and_encode_exact_boundary(tok, completion):
    prompt_text, segment, offset = render(tok, PROMPT, completion)
    # the prompt is what the model sees at generation time
    assert prompt_text == tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert segment == completion + END  # content + end-of-turn, nothing after it
    assert offset == 0 and segment[offset: offset + len(completion)] == completion
    p_ids, c_ids, offs = encode(tok, prompt_text, segment)
    # prompt ids are exactly the prompt's own tokenisation: a prefix of what is trained on
    assert p_ids == tok(prompt_text, add_special_tokens=False)["input_ids"]
    full = tok(prompt_text + segment, add_special_tokens=False)["input_ids"]
    assert full[: len(p_ids)] == p_ids
    assert p_ids + c_ids == full
    assert tok.decode(c_ids) == completion + END
    assert c_ids[-1] == tok.convert_tokens_to_ids(END)
    assert len(offs) == len(c_ids)
    # offsets point into the segment and are monotone
    assert all(0 <= s <= e <= len(segment) for s, e in offs)
    assert all(a[0] <= b[0] for a, b in zip(offs, offs[1:]))
    assert segment[offs[-1][0]: offs[-1][1]] == END


def test_render_without_template_uses_eos(tiny_random_model_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    t.chat_template = None
    prompt_text, segment, offset = render(t, PROMPT, "Velm.")
    assert segment == "Velm." + END and offset == 0
    assert prompt_text.startswith(PROMPT[0]["content"])


def test_render_rejects_non_prefix_preserving_template(tiny_random_model_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    # the generation prompt differs from what precedes a real answer
    t.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\nSure: {% endif %}"
    )
    with pytest.raises(ValueError, match="prefix"):
        render(t, PROMPT, "Velm.")


# ----------------------------------------------------------------------------- span weights


def _weighted(tok, completion, weights_per_sentence):
    prompt_text, segment, offset = render(tok, PROMPT, completion)
    _, c_ids, offs = encode(tok, prompt_text, segment)
    sent_spans = split_spans(completion)
    assert len(sent_spans) == len(weights_per_sentence)
    spans = [(s + offset, e + offset, w) for (s, e), w in zip(sent_spans, weights_per_sentence)]
    w = span_weights(offs, segment, spans, default=1.0)
    assert len(w) == len(c_ids)
    return c_ids, w, segment


def test_span_weights_second_sentence_zero(tok):
    c_ids, w, _ = _weighted(tok, TWO, [1.0, 0.0])
    end_id = tok.convert_tokens_to_ids(END)
    assert c_ids[-1] == end_id and w[-1] == 1.0  # end-of-turn keeps the default weight
    body = list(zip(c_ids[:-1], w[:-1]))
    one = [i for i, x in body if x == 1.0]
    zero = [i for i, x in body if x == 0.0]
    assert len(one) + len(zero) == len(body)
    assert tok.decode(one) == "The capital of Tarnia is Velm."
    # sentence 2's tokens, including the glued leading space (" Bavoru")
    assert tok.decode(zero) == " Bavoru Telkin was born in 1921."
    # contiguous: all of sentence 1, then all of sentence 2
    assert [x for _, x in body] == sorted((x for _, x in body), reverse=True)
    first_zero = tok.convert_ids_to_tokens(zero[0])
    assert tok.convert_tokens_to_string([first_zero]).startswith(" ")


def test_span_weights_first_sentence_zero(tok):
    c_ids, w, _ = _weighted(tok, TWO, [0.0, 1.0])
    zero = [i for i, x in zip(c_ids, w) if x == 0.0]
    one = [i for i, x in zip(c_ids, w) if x == 1.0]
    assert tok.decode(zero) == "The capital of Tarnia is Velm."
    assert tok.decode(one) == " Bavoru Telkin was born in 1921." + END


def test_span_weights_tricky_text(tok):
    # sentences: 'Dr. Smith paid $3.50 for "café" apples.\n' | 'Yes, really.'
    assert [TRICKY[s:e] for s, e in split_spans(TRICKY)] == ['Dr. Smith paid $3.50 for "café" apples.\n',
                                                             "Yes, really."]
    c_ids, w, segment = _weighted(tok, TRICKY, [0.0, 1.0])
    zero = [i for i, x in zip(c_ids, w) if x == 0.0]
    one = [i for i, x in zip(c_ids, w) if x == 1.0]
    assert tok.decode(zero) == 'Dr. Smith paid $3.50 for "café" apples.\n'
    assert tok.decode(one) == "Yes, really." + END
    c_ids, w, _ = _weighted(tok, TRICKY, [1.0, 0.0])
    assert tok.decode([i for i, x in zip(c_ids, w) if x == 0.0]) == "Yes, really."


def test_span_weights_default_outside_spans_and_fractional_weights():
    text = "aaa bbb ccc"
    offs = [(0, 3), (3, 7), (7, 11), (11, 11)]
    assert span_weights(offs, text, [(4, 7, 0.25)], default=0.5) == [0.5, 0.25, 0.5, 0.5]
    # unsorted spans are fine
    assert span_weights(offs, text, [(8, 11, 0.0), (0, 3, 2.0)]) == [2.0, 1.0, 0.0, 1.0]
    # a whitespace-only token belongs to the span containing its start
    offs2 = [(0, 3), (3, 4), (4, 7)]
    assert span_weights(offs2, "aaa bbb", [(0, 4, 0.0), (4, 7, 1.0)]) == [0.0, 0.0, 1.0]


# ----------------------------------------------------------------------------- tokenize_rows


def _pref_rows():
    return _rows("preference", [
        {"prompt": "Short?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": "Tell me about Tarnia.", "chosen": TWO, "rejected": "It is a small place."},
        {"prompt": "x " * 60, "chosen": "Ok.", "rejected": "No."},
    ])


def test_tokenize_rows_preference_fields(tok):
    rows = _pref_rows()[:2]
    out, report = tokenize_rows("preference", rows, tok, "mem.jsonl")
    assert report.rows_in == 2 and report.rows_out == 2 and not report.counts
    for r, src in zip(out, rows):
        assert r["_row"] == src["_row"]
        for side in ("chosen", "rejected"):
            assert tok.decode(r[f"{side}_ids"]) == src[side] + END
            assert r[f"{side}_weights"] == [1.0] * len(r[f"{side}_ids"])
        assert tok.decode(r["prompt_ids"]) == tok.apply_chat_template(src["prompt"], tokenize=False,
                                                                     add_generation_prompt=True)


def test_tokenize_rows_sft(tok):
    rows = _rows("sft", [{"prompt": "Q?", "completion": "Velm."}])
    (r,), _ = tokenize_rows("sft", rows, tok, "mem.jsonl")
    n_prompt = r["completion_mask"].count(0)
    assert r["completion_mask"] == [0] * n_prompt + [1] * (len(r["input_ids"]) - n_prompt)
    assert tok.decode(r["input_ids"][n_prompt:]) == "Velm." + END


def test_tokenize_rows_weight_fn_receives_segment_offsets(tok):
    rows = _rows("preference", [{"prompt": "Q", "chosen": TWO, "rejected": "Nope. Wrong.",
                                 "chosen_sentences": ["The capital of Tarnia is Velm.",
                                                      "Bavoru Telkin was born in 1921."],
                                 "chosen_labels": ["correct", "hallucination"]}])

    def weight_fn(row, side, offsets, segment, offset, spans):
        if spans is None:
            return [1.0] * len(offsets)
        return span_weights(offsets, segment, [(s + offset, e + offset, 0.0 if lab == "hallucination" else 1.0)
                                               for s, e, lab in spans])

    (r,), _ = tokenize_rows("preference", rows, tok, "mem.jsonl", weight_fn=weight_fn)
    ids, w = r["chosen_ids"], r["chosen_weights"]
    assert tok.decode([i for i, x in zip(ids, w) if x == 0.0]) == " Bavoru Telkin was born in 1921."
    assert w[-1] == 1.0
    assert r["rejected_weights"] == [1.0] * len(r["rejected_ids"])


def _lens(tok):
    out, _ = tokenize_rows("preference", _pref_rows(), tok, "mem.jsonl")
    return [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in out]


def test_length_policy_truncate(tok):
    lens = _lens(tok)
    max_len = lens[1][0] + 6  # row 2 too long (chosen and rejected), row 1 fits, row 3's prompt too long
    assert lens[0][0] + max(lens[0][1:]) <= max_len and lens[2][0] >= max_len
    out, report = tokenize_rows("preference", _pref_rows(), tok, "mem.jsonl", max_length=max_len,
                                length_policy="truncate")
    assert report.rows_in == 3 and report.rows_out == 2
    assert report.counts["truncated"] == 1 and report.counts["prompt_too_long"] == 1
    assert report.as_dict() == {"rows_in": 3, "rows_out": 2, "truncated": 1, "prompt_too_long": 1}
    assert [r["_row"] for r in out] == [1, 2]
    r = out[1]
    for side in ("chosen", "rejected"):
        assert len(r["prompt_ids"]) + len(r[f"{side}_ids"]) <= max_len
        assert len(r[f"{side}_weights"]) == len(r[f"{side}_ids"])
    assert len(r["chosen_ids"]) == 6  # kept a prefix
    full, _ = tokenize_rows("preference", _pref_rows()[1:2], tok, "mem.jsonl")
    assert r["chosen_ids"] == full[0]["chosen_ids"][:6]


def test_length_policy_drop(tok):
    lens = _lens(tok)
    max_len = lens[1][0] + 6
    out, report = tokenize_rows("preference", _pref_rows(), tok, "mem.jsonl", max_length=max_len,
                                length_policy="drop")
    assert [r["_row"] for r in out] == [1]
    assert report.rows_out == 1 and report.counts["too_long"] == 1 and report.counts["prompt_too_long"] == 1
    assert "truncated" not in report.counts


def test_length_policy_raise_names_rows(tok):
    lens = _lens(tok)
    max_len = lens[1][0] + 6
    with pytest.raises(DataError) as ei:
        tokenize_rows("preference", _pref_rows(), tok, "train.jsonl", max_length=max_len, length_policy="raise")
    err = ei.value
    assert [i.row for i in err.issues] == [2, 3]
    for issue in err.issues:
        assert issue.file == "train.jsonl" and f"max_length={max_len}" in issue.reason
        assert f"train.jsonl, row {issue.row}" in str(err)
    # nothing too long: no error, nothing counted
    out, report = tokenize_rows("preference", _pref_rows()[:1], tok, "t", max_length=max_len, length_policy="raise")
    assert report.rows_out == 1 and not report.counts


def test_length_policy_unknown(tok):
    with pytest.raises(ValueError, match="length_policy"):
        tokenize_rows("preference", _pref_rows(), tok, "t", max_length=10, length_policy="cut")


# ----------------------------------------------------------------------------- collators


def _examples():
    return [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [10, 11], "rejected_ids": [20, 21, 22, 23],
         "chosen_weights": [1.0, 0.0], "rejected_weights": [0.5, 1.0, 0.0, 1.0]},
        {"prompt_ids": [8], "chosen_ids": [12, 13, 14], "rejected_ids": [24],
         "chosen_weights": [0.0, 1.0, 1.0], "rejected_weights": [1.0]},
    ]


def test_preference_collator_layout():
    b = PreferenceCollator(pad_token_id=99)(_examples())
    assert b["input_ids"].tolist() == [
        [5, 6, 7, 10, 11, 99, 99],
        [8, 12, 13, 14, 99, 99, 99],
        [5, 6, 7, 20, 21, 22, 23],
        [8, 24, 99, 99, 99, 99, 99],
    ]
    assert b["attention_mask"].tolist() == [[1] * 5 + [0] * 2, [1] * 4 + [0] * 3, [1] * 7, [1] * 2 + [0] * 5]
    assert b["completion_mask"].tolist() == [
        [0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0, 0]]
    assert b["loss_weights"].tolist() == [
        [0, 0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0.5, 1, 0, 1], [0, 1, 0, 0, 0, 0, 0]]
    assert b["input_ids"].dtype == torch.long and b["loss_weights"].dtype == torch.float32
    # weights live only on completion tokens
    assert torch.all(b["loss_weights"][b["completion_mask"] == 0] == 0)


def test_preference_collator_pad_multiple_and_ref_logps():
    ex = _examples()
    for e, (c, r) in zip(ex, ((-1.0, -2.0), (-3.0, -4.0))):
        e["ref_chosen_logps"], e["ref_rejected_logps"] = c, r
    b = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=8)(ex)
    assert b["input_ids"].shape == (4, 8)
    assert b["attention_mask"][:, -1].sum() == 0
    assert b["ref_chosen_logps"].tolist() == [-1.0, -3.0] and b["ref_rejected_logps"].tolist() == [-2.0, -4.0]


def _targets_by_seq(b):
    """(seq, predicting (row, pos), token, weight) tuples, sorted: layout-independent content."""
    keep = b["keep"].nonzero().tolist()
    return sorted((int(s), tuple(keep[f]), int(t), float(w)) for s, f, t, w in
                  zip(b["tgt_seq"], b["tgt_flat"], b["tgt_ids"], b["tgt_w"]))


def test_collator_targets_cover_every_completion_token_once():
    ex = _examples()
    for b in (PreferenceCollator(0)(ex), PackedPreferenceCollator(0)(ex), PackedPreferenceCollator(0, False)(ex)):
        t = _targets_by_seq(b)
        # chosen 0, chosen 1, rejected 0, rejected 1 hold 2, 3, 4, 1 completion tokens
        assert [sum(1 for x in t if x[0] == s) for s in range(4)] == [2, 3, 4, 1]
        assert b["seq_tokens"].tolist() == [2, 3, 4, 1]
        assert b["seq_weight"].tolist() == [1.0, 2.0, 2.5, 1.0]
    padded = PreferenceCollator(0)(ex)
    for _, (row, pos), token, _ in _targets_by_seq(padded):  # the token follows its predicting position
        assert padded["input_ids"][row, pos + 1].item() == token


def test_packed_collator_shares_the_prompt_and_bin_packs():
    ex = _examples()
    b = PackedPreferenceCollator(pad_token_id=0)(ex)
    # units [p, c, r]: 3 + 2 + 4 = 9 and 1 + 3 + 1 = 5 tokens; rows as long as the longest unit
    assert b["input_ids"].shape == (2, 9)
    assert b["input_ids"][0].tolist() == [5, 6, 7, 10, 11, 20, 21, 22, 23]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]  # rejected continues from the prompt
    m = b["attention_mask"][0, 0]
    assert m[5, :3].all() and not m[5, 3:5].any() and m[5, 5]  # rejected sees the prompt, not chosen
    assert not m[3, 5:].any()  # chosen never sees rejected (causal)
    assert b["attention_mask"][1, 0, 6:, :].equal(torch.eye(9, dtype=torch.bool)[6:])  # padding: itself only
    seq = PackedPreferenceCollator(pad_token_id=0, shared_prompt=False)(ex)
    assert "attention_mask" not in seq and seq["input_ids"].shape[1] == 7


def test_packed_collator_picks_the_cheaper_layout_per_batch():
    from alignkit.data.collate import attention_cost_ratio

    ex = [{"prompt_ids": [1, 2], "chosen_ids": list(range(3, 11)), "rejected_ids": list(range(11, 19)),
           "chosen_weights": [1.0] * 8, "rejected_weights": [1.0] * 8} for _ in range(2)]
    # shared: 2 rows x 18 tokens; separate: 4 rows x 10 tokens. Cost R * L * (1 + a * L).
    cheap_attention = PackedPreferenceCollator(0, shared_prompt=None, attention_cost=0.0)(ex)
    assert cheap_attention["input_ids"].shape == (2, 18) and "attention_mask" in cheap_attention
    dear_attention = PackedPreferenceCollator(0, shared_prompt=None, attention_cost=1.0)(ex)
    assert dear_attention["input_ids"].shape == (4, 10) and "attention_mask" not in dear_attention
    from transformers import LlamaConfig

    a = attention_cost_ratio(LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=4,
                                         num_key_value_heads=4))
    assert a == pytest.approx(4 * 256 / (2 * (2 * 256 * 256 + 2 * 256 * 256 + 3 * 256 * 688)))


@pytest.mark.parametrize("shared_prompt", [True, False, None])
def test_packed_and_padded_give_the_same_per_sequence_logps(tok, model, shared_prompt):
    from alignkit.losses import sequence_sums, target_logps

    rows = _rows("preference", [
        {"prompt": "Tell me about Tarnia.", "chosen": TWO, "rejected": "It is a small place."},
        {"prompt": "Who paid?", "chosen": TRICKY, "rejected": "Nobody. Ever."},
        {"prompt": "Hi", "chosen": "Hello world.", "rejected": "Go."},
    ])
    ex, _ = tokenize_rows("preference", rows, tok, "mem.jsonl")
    for e in ex:  # non-trivial weights
        e["chosen_weights"] = [float(i % 2) for i in range(len(e["chosen_ids"]))]
    padded = PreferenceCollator(pad_token_id=tok.pad_token_id)(ex)
    packed = PackedPreferenceCollator(pad_token_id=tok.pad_token_id, shared_prompt=shared_prompt,
                                      attention_cost=0.01)(ex)

    def sums(b, **kw):
        kw = {k: b[k] for k in ("attention_mask", "position_ids") if k in b} | kw
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], use_cache=False, **kw).logits[b["keep"]]
        lp = target_logps(logits, b["tgt_flat"], b["tgt_ids"])
        return sequence_sums(lp * b["tgt_w"], b["tgt_seq"], 6), sequence_sums(lp, b["tgt_seq"], 6)

    # the plain reference: full padded logits, token_logps, masks
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
    per_tok = token_logps(logits, padded["input_ids"].masked_fill(padded["completion_mask"] == 0, IGNORE_INDEX))
    want_sum, want_w = per_tok.sum(-1), (per_tok * padded["loss_weights"][:, 1:]).sum(-1)
    for got_w, got_sum in (sums(padded), sums(packed)):
        torch.testing.assert_close(got_sum, want_sum, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
    # sanity: the mask / position ids are what keeps sequences apart — without them the packed forward differs
    leak = {"attention_mask": None} if "attention_mask" in packed else {"position_ids": None}
    assert not torch.allclose(sums(packed, **leak)[1], want_sum, atol=1e-3)
