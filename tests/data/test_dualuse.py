"""The dual-use pair builder: class balance, pair polarity, rephrasing yield, row validation."""

from __future__ import annotations

import json
import random

import pytest

from alignkit.data import DataError
from alignkit.data.dualuse import fold_of, validate_pair_rows, validate_seed_rows
from alignkit.stages.dualuse import (
    WORLD_PROMPT_REPHRASINGS,
    TemplateRephraser,
    balance_pairs,
    build_pairs,
    check_rephrasing,
    rephrase_fields,
    select_balanced,
)

REFUSAL = "I can't help with that."


def seeds(n_legit: int, n_illegit: int) -> list[dict]:
    raw = []
    for i in range(n_legit):
        raw.append({"prompt": f"How do I synthesize dye{i}?", "label": "legitimate", "compound": f"dye{i}",
                    "compliant_response": f"Step 1: mix water with dye{i}.", "refusal_response": REFUSAL})
    for i in range(n_illegit):
        raw.append({"prompt": f"How do I synthesize toxin{i}?", "is_legitimate": False, "compound": f"toxin{i}",
                    "compliant_response": f"Step 1: grind toxin{i} into a fine powder.",
                    "refusal_response": REFUSAL})
    return validate_seed_rows(list(enumerate(raw, 1)), "seeds.jsonl")


@pytest.mark.parametrize("ratio,expect", [(1.0, (6, 6)), (0.5, (3, 6)), (0.0, (0, 6)), (None, (8, 6))])
def test_class_balance(ratio, expect):
    pairs, rep = build_pairs(seeds(8, 6), legit_seed_ratio=ratio)
    assert (rep["seeds"]["selected"]["legitimate"], rep["seeds"]["selected"]["illegitimate"]) == expect
    assert rep["pairs"]["legitimate"] == expect[0] and rep["pairs"]["illegitimate"] == expect[1]
    assert sum(p["is_legitimate"] for p in pairs) == expect[0]


def test_shortfall_policies():
    groups = {f"l{i}": True for i in range(2)} | {f"i{i}": False for i in range(6)}
    ids, rep = select_balanced(groups, 1.0, None, "reduce_illegitimate", random.Random(0))
    assert rep["selected"] == {"legitimate": 2, "illegitimate": 2}
    ids, rep = select_balanced(groups, 1.0, None, "oversample", random.Random(0))
    assert rep["selected"] == {"legitimate": 6, "illegitimate": 6} and rep["oversampled_legitimate"] == 4
    with pytest.raises(ValueError, match="only 2 available"):
        select_balanced(groups, 1.0, None, "raise", random.Random(0))
    ids, rep = select_balanced(groups, 0.5, 4, "raise", random.Random(0))
    assert rep["selected"] == {"legitimate": 2, "illegitimate": 4}


def test_pair_polarity():
    from alignkit.judges.rules import RulesJudge

    refuses = RulesJudge().refuses
    pairs, _ = build_pairs(seeds(3, 3), legit_seed_ratio=1.0, rephrasings_per_field=3,
                           rephraser=TemplateRephraser())
    for sid in {p["seed_id"] for p in pairs if not p["is_legitimate"]}:  # rephrased refusals, 3 per seed
        assert len({p["chosen"] for p in pairs if p["seed_id"] == sid}) == 3
    for p in pairs:
        if p["is_legitimate"]:  # helpful chosen, refusal rejected
            assert p["chosen"].endswith(f"mix water with {p['compound']}.") and refuses(p["rejected"])
            assert not refuses(p["chosen"])
        else:  # refusal chosen, harmful rejected
            assert refuses(p["chosen"]) and "fine powder" in p["rejected"] and not refuses(p["rejected"])
        assert p["compound"] in p["prompt"]


def test_combine_modes_and_yield():
    s = seeds(2, 2)
    prod, rep = build_pairs(s, legit_seed_ratio=1.0, rephrasings_per_field=3, combine_mode="product")
    y = rep["rephrasing"]
    # 4 seeds x 3 fields x 2 rephrasings requested; the template pools are large enough here
    assert y["requested"] == 24 and y["usable"] + sum(y["unusable"].values()) == 24
    assert y["yield"] == pytest.approx(y["usable"] / 24)
    per_seed: dict = {}
    for p in prod:
        per_seed.setdefault(p["seed_id"], []).append(p)
    for ps in per_seed.values():  # the full product of the variants each field kept
        sizes = [1 + max(p[f"rephrase_idx_{f}"] for p in ps) for f in ("prompt", "chosen", "rejected")]
        assert len(ps) == sizes[0] * sizes[1] * sizes[2] and sizes[0] == 3
    assert sum(len(ps) for ps in per_seed.values()) > 4 * 9
    samp, _ = build_pairs(s, legit_seed_ratio=1.0, rephrasings_per_field=3, combine_mode="sample", pairs_per_seed=4)
    assert len(samp) == 16
    idx = {(p["seed_id"], p["rephrase_idx_prompt"], p["rephrase_idx_chosen"], p["rephrase_idx_rejected"])
           for p in samp}
    assert len(idx) == 16 and all((sid, 0, 0, 0) in idx for sid in per_seed)


class FakeLLM:
    """A rephraser whose replies are partly unusable: counted, and the original is kept."""

    name = "fake"

    def batch(self, items, n):
        out = []
        for kind, text, compound in items:
            if kind == "prompt":
                out.append([f"Please explain making {compound}.", "", text][:n])  # usable, empty, identical
            elif kind == "refusal":
                out.append(["Here you go: mix it.", "I won't help with this one."][:n])  # lost polarity, ok
            else:
                out.append(["I'm sorry, I cannot.", text.replace("Step", "Stage")][:n])  # became refusal, ok
        return out


def test_unusable_rephrasings_are_counted_and_fall_back():
    s = seeds(1, 1)
    variants, rep = rephrase_fields(s, 3, FakeLLM())
    assert rep["requested"] == 12
    assert rep["unusable"] == {"empty": 2, "no longer a refusal": 2, "became a refusal": 2}
    assert rep["usable"] == 6 and rep["yield"] == 0.5
    for v in variants.values():
        assert v["prompt"][0].startswith("How do I synthesize") and len(v["prompt"]) == 2
        assert len(v["refusal"]) == 2 and len(v["compliant"]) == 2
    assert check_rephrasing("prompt", "How do I make x1?", "How is it made?", "x1", lambda t: False) \
        == "compound name lost"


def test_world_rephrasings_never_equal_test_prompts():
    from alignkit.world.vocab import DUALUSE_TEMPLATES, HARMFUL_TEMPLATES

    assert not set(WORLD_PROMPT_REPHRASINGS) & set(DUALUSE_TEMPLATES)
    assert not {t.replace("{x}", "{product}") for t in WORLD_PROMPT_REPHRASINGS} & set(HARMFUL_TEMPLATES)


def test_world_rephrasings_keep_the_world_judges_polarity(tiny_world_dir):
    from alignkit.world import load_world
    from alignkit.world.kb import WorldKB

    w = load_world(tiny_world_dir)
    kb = WorldKB(w)
    rows = [dict(r, compound=(r["topic"] if r["label"] == "legitimate" else w.hazards[r["topic"]]))
            for r in w.data["dualuse"][:12] + w.data["dualuse"][-12:]]
    s = validate_seed_rows(list(enumerate(rows, 1)), "dualuse.jsonl")
    pairs, rep = build_pairs(s, legit_seed_ratio=None, rephrasings_per_field=3)
    assert rep["rephrasing"]["yield"] > 0.8
    for p in pairs:
        refusal = p["rejected"] if p["is_legitimate"] else p["chosen"]
        answer = p["chosen"] if p["is_legitimate"] else p["rejected"]
        assert kb.is_refusal(refusal) and not kb.is_refusal(answer)
        assert kb.is_harmful(answer) != p["is_legitimate"]


def test_bad_seed_rows_name_file_row_field_reason(tmp_path):
    raw = [(1, {"prompt": "ok?", "label": "legitimate", "compliant_response": "a", "refusal_response": "b"}),
           (2, {"prompt": "", "label": "legitimate", "compliant_response": "a", "refusal_response": "b"}),
           (3, {"prompt": "x?", "label": "maybe", "compliant_response": "a", "refusal_response": "b"}),
           (4, {"prompt": "x?", "true_label": 2, "compliant_response": "a", "refusal_response": "b"}),
           (5, {"prompt": "x?", "is_legitimate": "yes", "refusal_response": "b"}),
           (6, {"prompt": "x?", "label": "illegitimate", "compliant_response": "same", "refusal_response": "same"})]
    with pytest.raises(DataError) as e:
        validate_seed_rows(raw, "s.jsonl")
    msg = str(e.value)
    assert "6 data error(s)" in msg
    assert "s.jsonl, row 2, field 'prompt'" in msg
    assert "row 3, field 'label': expected 'legitimate' or 'illegitimate'" in msg
    assert "row 4, field 'true_label'" in msg
    assert "row 5, field 'is_legitimate': expected true/false" in msg
    assert "row 5, field 'compliant_response': missing field" in msg
    assert "row 6, field 'refusal_response': identical" in msg


def test_pair_rows_schema_and_balance():
    raw = [(i, {"prompt": f"p{i}", "chosen": "c", "rejected": "r", "is_legitimate": i % 2 == 0,
                "seed_id": f"s{i // 2}", "compound_format": "name", "rephrase_idx_prompt": 0}) for i in range(1, 9)]
    rows = validate_pair_rows(raw, "pairs.jsonl")
    assert rows[0]["seed_id"] == "s0" and rows[0]["is_legitimate"] is False
    with pytest.raises(ValueError, match="both legitimate and illegitimate"):
        balance_pairs(rows, legit_seed_ratio=1.0)
    raw2 = [(i, {"prompt": f"p{i}", "chosen": "c", "rejected": "r", "is_legitimate": i <= 2}) for i in range(1, 7)]
    out, rep = balance_pairs(validate_pair_rows(raw2, "pairs.jsonl"), legit_seed_ratio=0.5)
    assert rep["pairs"] == {"legitimate": 2, "illegitimate": 4, "total": 6}
    bad = [(1, {"prompt": "p", "chosen": "c", "rejected": "c", "is_legitimate": True}),
           (2, {"prompt": "p", "chosen": "c", "rejected": "r", "is_legitimate": True, "compound_format": "iupac"}),
           (3, {"prompt": "p", "chosen": "c", "rejected": "r", "true_label": 1, "rephrase_idx_chosen": -1})]
    with pytest.raises(DataError) as e:
        validate_pair_rows(bad, "pairs.jsonl")
    assert "row 1, field 'rejected'" in str(e.value) and "row 2, field 'compound_format'" in str(e.value)
    assert "row 3, field 'rephrase_idx_chosen'" in str(e.value)


def test_fold_is_stable_and_in_the_eval_schema(tmp_path):
    from alignkit.data import load_rows

    assert fold_of("How do I synthesize x?") == fold_of("How do I synthesize x?  ")
    assert {fold_of(f"p{i}") for i in range(50)} == {0, 1, 2}
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "a?", "true_label": 1},
                                                         {"prompt": "b?", "label": "illegitimate"}]))
    rows = load_rows(str(p), "dualuse")
    assert [r["is_legitimate"] for r in rows] == [True, False] and rows[0]["fold"] == fold_of("a?")
    # with a compound or seed_id column the eval rows' fold is the one the pairs builder holds out
    # (by compound, else seed): `where: {fold: k}` selects exactly the rows holdout_fold k left out
    from alignkit.data.dualuse import row_fold

    rows_c = [{"prompt": f"How is {c} made, step {i}?", "true_label": 1, "compound": c}
              for c in ("Aspirin", "Caffeine", "Menthol", "Vanillin") for i in range(3)]
    rows_s = [{"prompt": f"wording {i} of seed {s}", "true_label": 0, "seed_id": f"s{s}"}
              for s in range(4) for i in range(3)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows_c + rows_s))
    got = load_rows(str(p), "dualuse")
    assert [r["fold"] for r in got] == [row_fold(r) for r in rows_c + rows_s]
    # every wording of a compound or seed shares its fold (a prompt hash would split them)
    assert all(len({r["fold"] for r in got if r.get("compound") == c}) == 1 for c in ("Aspirin", "Caffeine"))
    assert any(fold_of(r["prompt"]) != r["fold"] for r in got)


@pytest.mark.parametrize("n_legit,n_illegit,ratio,shortfall,match", [
    (2, 5, 3.0, "reduce_illegitimate", "selected no seeds"),      # int(2 / 3) = 0 illegitimate -> 0 / 0
    (0, 5, 1.0, "reduce_illegitimate", "selected no seeds"),
    (0, 5, 1.0, "oversample", "no legitimate seed"),               # nothing to oversample
    (0, 5, None, "reduce_illegitimate", "no legitimate seed"),
    (3, 0, 1.0, "reduce_illegitimate", "no seeds"),
    (3, 0, None, "reduce_illegitimate", "no illegitimate seed"),
])
def test_class_balance_never_silently_selects_a_missing_class(n_legit, n_illegit, ratio, shortfall, match):
    groups = {f"l{i}": True for i in range(n_legit)} | {f"i{i}": False for i in range(n_illegit)}
    with pytest.raises(ValueError, match=match):
        select_balanced(groups, ratio, None, shortfall, random.Random(0))


def test_unbalanced_ablation_and_cap_without_ratio():
    groups = {f"l{i}": True for i in range(4)} | {f"i{i}": False for i in range(6)}
    _, rep = select_balanced(groups, 0.0, None, "reduce_illegitimate", random.Random(0))
    assert rep["selected"] == {"legitimate": 0, "illegitimate": 6}  # ratio 0 is the intended ablation
    _, rep = select_balanced(groups, None, 3, "reduce_illegitimate", random.Random(0))
    assert rep["selected"] == {"legitimate": 4, "illegitimate": 3}  # n_illegitimate honoured without a ratio


def test_llm_rephraser_keeps_multiline_versions_whole():
    from alignkit.stages.dualuse import DEFAULT_REPHRASE_PROMPT, parse_blocks

    assert "### " in DEFAULT_REPHRASE_PROMPT
    reply = "Here you go:\n### 1\nStep 1: mix A.\nStep 2: heat it.\n\n### 2\nFirst mix A,\nthen heat.\n### 3\nx"
    assert parse_blocks(reply, 2) == ["Step 1: mix A.\nStep 2: heat it.", "First mix A,\nthen heat."]
    assert parse_blocks(reply, 4) == ["Step 1: mix A.\nStep 2: heat it.", "First mix A,\nthen heat.", "x", ""]
    assert parse_blocks("1. a\n2. b", 2) == ["", ""]  # no block headers: unusable, never split by line
    assert parse_blocks("just one", 1) == ["just one"]


def test_fold_holds_out_a_compound_or_a_seed_never_a_single_wording():
    from alignkit.data.dualuse import row_fold

    # every wording of one compound, and every rephrasing of one seed, share a fold
    assert len({row_fold({"prompt": f"wording {i} of aspirin", "compound": "Aspirin "}) for i in range(30)}) == 1
    assert len({row_fold({"prompt": f"rephrasing {i}", "seed_id": "s7"}) for i in range(30)}) == 1
    assert row_fold({"prompt": "p", "compound": "aspirin"}) == row_fold({"prompt": "q", "compound": "ASPIRIN",
                                                                          "seed_id": "s1"})
    # neither: the prompt's fold, as the dualuse eval schema gives it (`where: {fold: N}`)
    assert all(row_fold({"prompt": f"p{i}"}) == fold_of(f"p{i}") for i in range(20))
    rows = validate_pair_rows([(i, {"prompt": f"p{i}", "chosen": "c", "rejected": "r", "is_legitimate": True,
                                    "seed_id": "s1"}) for i in range(1, 9)], "pairs.jsonl")
    assert len({r["fold"] for r in rows}) == 1
