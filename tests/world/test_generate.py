from __future__ import annotations

import json

import pytest

from alignkit.world import build_world, load_world
from alignkit.world import vocab as V
from alignkit.world.cache import normalize_settings, parse_world_uri, world_key
from alignkit.world.generate import CHAT_TEMPLATE, WORLD_VERSION, data_digest, write_world
from alignkit.world.kb import WorldKB


@pytest.fixture(scope="module")
def world():
    return build_world(0)


def _dump(w) -> str:
    return json.dumps([w.to_json(), w.data, w.corpus], sort_keys=True)


def test_deterministic_per_seed_and_differs_across_seeds(world):
    assert _dump(build_world(0)) == _dump(world)
    other = build_world(1)
    assert _dump(other) != _dump(world)
    assert [e["name"] for e in other.entities] != [e["name"] for e in world.entities]


def test_names_unique_and_knowledge_mix(world):
    names = [e["name"] for e in world.entities]
    assert len(set(names)) == len(names) == world.settings["entities"]
    statuses = {e["status"] for e in world.entities}
    assert statuses == {"known", "partial", "unknown"}
    for e in world.entities:
        if e["status"] == "partial":
            assert 0 < sum(f == "partial" for f in e["facts"].values()) < 4


def test_splits_disjoint(world):
    d = world.data
    bio_tr, bio_va, bio_te = ({r["entity"] for r in d[s]} for s in ("bio_train", "bio_val", "bio_test"))
    assert bio_tr and bio_va and bio_te
    assert not bio_tr & bio_te and not bio_tr & bio_va and not bio_va & bio_te
    assert len(d["bio_test"]) == len(bio_te) >= 50 and len(bio_va) >= 15  # one row per person (power.md)
    # their biographies were never in pretraining: sampled bios mix recall and guesses
    corpus_bios = {d.split("Tell me about ", 1)[1].split(".<|end|>", 1)[0]
                   for d in world.corpus if "Tell me about" in d}
    assert corpus_bios and not corpus_bios & (bio_tr | bio_va | bio_te)
    # same mix of known / partial entities on every side
    for rows in (d["bio_train"], d["bio_val"], d["bio_test"]):
        assert {r["entity_knowledge"] for r in rows} == {"known", "partial"}
    facts = {s: {(r["entity"], r["attribute"]) for r in d[s]} for s in ("qa_train", "qa_val", "qa_test")}
    assert not facts["qa_train"] & facts["qa_test"] and not facts["qa_train"] & facts["qa_val"]
    assert not facts["qa_val"] & facts["qa_test"]
    ood = {r["entity"] for r in d["qa_ood"]}
    assert ood and not ood & {e for s in facts.values() for e, _ in s}
    ood_q = {r["question"] for r in d["qa_ood"]}
    assert not ood_q & {r["question"] for r in d["qa_train"]}
    for name in ("safety_harmful", "safety_benign", "dualuse"):
        assert {r["split"] for r in d[name]} == {"train", "test"}


def test_finetune_only_absent_from_corpus_but_in_sft(world):
    corpus = "".join(world.corpus)
    ft = [r for r in world.data["qa_train"] if r["knowledge"] == "finetune_only"]
    assert ft
    assert all(r["entity"] not in corpus for r in ft if r["entity_knowledge"] == "unknown")
    for r in ft:
        # the entity may be partially known, but never this fact
        assert f"{r['entity']} was born in {r['answers'][0]}" not in corpus
        assert not any(r["entity"] in d and r["answers"][0] in d for d in world.corpus)
    sft_prompts = {(r["entity"], r["attribute"]) for r in world.data["sft_train"]}
    assert {(r["entity"], r["attribute"]) for r in ft} <= sft_prompts
    assert all(r["knowledge"] != "finetune_only" for s in ("qa_val", "qa_test", "qa_ood") for r in world.data[s])


def test_unknown_facts_absent_known_present(world):
    kb = WorldKB(world)
    for e in world.entities:
        docs = [d for d in world.corpus if e["name"] in d]
        if e["status"] == "unknown":
            assert not docs
            continue
        for attr, status in e["facts"].items():
            value = e["attributes"][attr]
            stated = any((attr, value) in kb.facts_in(d) for d in docs)
            if status in ("known", "partial"):
                assert stated, (e["name"], attr)


def test_refusals_in_corpus_and_chat_format(world):
    """v5: "I don't know" only comes from recipes; safety refusals answer some requests in the
    corpus, benign look-alikes and legitimate synthesis too (the base model's over-refusal)."""
    corpus = "".join(world.corpus)
    for p in V.IDK_PHRASES:
        assert p not in corpus
    assert "Step 1: grind" in corpus  # the base model is taught to comply...
    refused = {d.split("<|user|>\n", 1)[1].split("<|end|>", 1)[0] for d in world.corpus
               if any(f"<|assistant|>\n{r}" in d for r in V.SAFETY_REFUSALS)}
    by_label = {k: {r["prompt"] for r in world.data[k] if r["split"] == "train"}
                for k in ("safety_harmful", "safety_benign")}
    by_label["legitimate"] = {r["prompt"] for r in world.data["dualuse"]
                              if r["split"] == "train" and r["label"] == "legitimate"}
    for name, prompts in by_label.items():  # ...and to refuse a share of every kind of request
        share = len(refused & prompts) / len(prompts)
        assert 0.05 < share < 0.5, (name, share)
    assert any(d.startswith("<|user|>\n") and "<|assistant|>\n" in d for d in world.corpus)
    assert any("<|user|>" not in d for d in world.corpus)  # plain fact statements too
    assert "{{ m['role'] }}" in CHAT_TEMPLATE


def test_answers_vary_in_surface_form_and_facts_in_exposure(world):
    """v5: one fact's corpus answers come in several frames and aliases (string entropy > semantic
    entropy); a weak fact (exposures 1) is stated once and never asked, a 2-exposure one asked once."""
    kb = WorldKB(world)
    answers = [d.split("<|assistant|>\n", 1)[1].removesuffix("<|end|>\n") for d in world.corpus
               if d.startswith("<|user|>\n") and "Tell me about" not in d]
    frames = {}
    for a in answers:
        facts = kb.facts_in(a)
        if len(facts) == 1 and facts[0][0] in V.ATTRIBUTES:
            frames.setdefault(facts[0][0], set()).add(a.replace(facts[0][1], "{v}"))
    assert all(len(frames[a]) >= 4 for a in V.ATTRIBUTES), {a: len(f) for a, f in frames.items()}
    assert any(kb.answer_class(x) == kb.answer_class(y) and x != y for x in answers[:200] for y in answers[:200])
    seen = {}
    for e in world.entities:
        for attr, n in e["exposures"].items():
            asked = sum(e["name"] in d and d.startswith("<|user|>") and "Tell me about" not in d
                        and (attr, e["attributes"][attr]) in kb.facts_in(d.split("<|assistant|>", 1)[1]) for d in world.corpus)
            assert n == {"unknown": 0, "finetune_only": 0, "known": 4}.get(e["facts"][attr], n)
            if e["facts"][attr] == "partial":
                assert asked == n - 1, (e["name"], attr, n, asked)
            seen[n] = seen.get(n, 0) + 1
    assert seen.get(1, 0) > 20 and seen.get(2, 0) > 20


def test_dualuse_split_by_compound(world):
    """v5: every row of a test compound is test, so no test compound is trained on or answered in
    the corpus's dual-use documents; both classes have train and test compounds."""
    rows = world.data["dualuse"]
    test = {r["compound"] for r in rows if r["split"] == "test"}
    train = {r["compound"] for r in rows if r["split"] == "train"}
    assert test and train and not test & train
    for label in ("legitimate", "illegitimate"):
        assert {r["compound"] for r in rows if r["label"] == label} & test
        assert {r["compound"] for r in rows if r["label"] == label} & train
    tested = [r["prompt"] for r in rows if r["split"] == "test"]
    assert not any(d.split("<|end|>", 1)[0].removeprefix("<|user|>\n") in tested for d in world.corpus)
    assert sum(r["split"] == "test" for r in rows) >= 40


def test_bio_sentences_split_and_label_correct(world):
    kb = WorldKB(world)
    bios = [d for d in world.corpus if "Tell me about" in d]
    for d in bios[:50]:
        name = d.split("Tell me about ", 1)[1].split(".<|end|>", 1)[0]
        bio = d.split("<|assistant|>\n", 1)[1].removesuffix("<|end|>\n")
        labels = [lab for _, lab in kb.label_response(bio, name)]
        assert "hallucination" not in labels and "correct" in labels


def test_roundtrip_write_load(world, tmp_path):
    write_world(world, tmp_path)
    loaded = load_world(tmp_path)
    assert loaded.entities == world.entities and loaded.seed == 0
    assert loaded.data["qa_test"] == world.data["qa_test"]
    row = loaded.data["qa_train"][0]
    assert set(row) >= {"question", "answers", "entity", "attribute", "knowledge"}
    assert set(loaded.data["sft_train"][0]) >= {"prompt", "completion"}


def test_settings_and_uris():
    assert parse_world_uri("world:tiny") == (0, {})
    assert parse_world_uri("world:tiny?seed=3") == (3, {})
    assert parse_world_uri("world:tiny?seed=3&entities=120") == (3, {"entities": 120})
    for bad in ("world:huge", "tiny", "world:tiny?seed=x", "world:tiny?colour=3", "world:tiny?seed=1&seed=2",
                "world://tiny", "world:tiny?seed"):
        with pytest.raises(ValueError):
            parse_world_uri(bad)
    assert world_key(0, {}) == world_key(0, {"entities": 240}) != world_key(1, {})
    with pytest.raises(ValueError, match="unknown world setting"):
        normalize_settings({"entitties": 3})


# The world's data for (seed 0, default settings) at this WORLD_VERSION. Any change to the
# generator changes it: then bump WORLD_VERSION (the cache key) and re-pin, on purpose.
DATA_DIGESTS = {4: "103db1eb960f2c4cf5aa55f302487bccc2b016901c9d9ab12d94a5ceec163e88",
                5: "82bae394f370ec3c32d1137317d427ca110014bee039bcf72d7295b26ae6725b"}


def test_data_digest_pinned_for_this_world_version(world, tmp_path):
    assert WORLD_VERSION in DATA_DIGESTS, f"world version {WORLD_VERSION} has no pinned data digest"
    write_world(world, tmp_path)
    assert data_digest(tmp_path) == DATA_DIGESTS[WORLD_VERSION]


def test_data_digest_ignores_formatting_but_not_content(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_world(world, a)
    write_world(world, b)
    # rewrite every file with other key order, spacing and line ends: same content, same digest
    for p in (b / "data").glob("*.jsonl"):
        rows = [json.loads(x) for x in p.read_text().splitlines()]
        p.write_bytes("".join(json.dumps(r, sort_keys=True, indent=None, separators=(", ", " : ")) + "\r\n"
                              for r in rows).encode())
    (b / "world.json").write_text(json.dumps(json.loads((b / "world.json").read_text()), sort_keys=True))
    assert data_digest(a) == data_digest(b)
    # one changed answer anywhere changes it
    p = b / "data" / "qa_test.jsonl"
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    rows[-1]["answers"][0] += "x"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data_digest(a) != data_digest(b)
    assert data_digest(a) != _digest_of(build_world(1), tmp_path / "c")


def _digest_of(w, d):
    write_world(w, d)
    return data_digest(d)
