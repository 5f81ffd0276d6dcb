"""alignkit.stages.uncertainty: greedy clustering (jlko get_semantic_ids, quirks included), every
equivalence backend on crafted answer sets, dedup before NLI, call counts, Semantic Volume."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignkit.metrics import semantic_entropy
from alignkit.stages import uncertainty as U

PARIS = ["Paris.", "The capital is Paris.", "It is Paris, the capital."]  # paraphrases
ROME = "The capital is Rome."                                               # contradicts them


def rule_relation(pairs: set[frozenset]):
    return lambda rep, later: [a == rep or frozenset((rep, a)) in pairs for a in later]


def test_greedy_cluster_is_not_transitive():
    # a≡b, b≡c, a≢c: c is never compared with b (b is not a representative) -> own cluster
    rel = rule_relation({frozenset("ab"), frozenset("bc")})
    assert U.greedy_cluster(list("abc"), rel) == [0, 0, 1]


def test_greedy_cluster_later_representative_reassigns():
    # order [a, c, b] with a≡b, c≡b, a≢c: b first joins a's cluster, then c's loop re-assigns it
    rel = rule_relation({frozenset("ab"), frozenset("cb")})
    assert U.greedy_cluster(list("acb"), rel) == [0, 1, 1]


def test_exact_match_and_entropy_endpoints():
    eq = U.ExactMatch()
    ids = eq.cluster(["Paris.", "paris", " PARIS!", "Rome"])
    assert ids == [0, 0, 0, 1]
    assert semantic_entropy(eq.cluster(["x"] * 10)) == 0.0
    assert semantic_entropy(eq.cluster([f"a{i}" for i in range(10)])) == pytest.approx(math.log(10))
    assert U.lexical_entropy(["Paris.", "paris", "Paris."]) == pytest.approx(semantic_entropy([0, 1, 0]))


class FakeNLI:
    """A chat judge that answers NLI prompts by rule: same city -> entailment, else contradiction."""

    def __init__(self, neutral_one_way: bool = False):
        self.prompts: list[str] = []
        self.neutral_one_way = neutral_one_way

    def complete(self, convs):
        out = []
        for c in convs:
            text = c[0]["content"]
            self.prompts.append(text)
            a = text.split("Possible Answer 1:")[1].split("\n")[0]
            b = text.split("Possible Answer 2:")[1].split("\n")[0]
            same = ("Paris" in a) == ("Paris" in b)
            if self.neutral_one_way and "Paris." == a.strip() and "capital" in b:
                out.append("Neutral.")  # "Paris." does not say it is the capital
            else:
                out.append("Entailment" if same else "contradiction")
        return out


def test_llm_entailment_merges_paraphrases_not_contradictions_dedups_and_counts():
    judge = FakeNLI()
    eq = U.LLMEntailment(judge, strict_entailment=True)
    answers = [PARIS[0], PARIS[1], PARIS[0], ROME, PARIS[2], ROME]
    ids = eq.cluster(answers, "What is the capital?")
    assert ids == [0, 0, 0, 1, 0, 1]
    # 4 unique strings: representative "Paris." vs 3 later uniques (both directions) = 6 calls,
    # then ROME (unassigned) vs the one unique after it = 2 calls; duplicates cost nothing.
    assert eq.stats["calls"] == 8 == len(judge.prompts)
    assert eq.stats["unique_answers"] == 4 and eq.stats["answers"] == 6
    assert all("What is the capital?" in p for p in judge.prompts)  # condition_on_question
    eq.cluster(answers, "What is the capital?")  # the same question again: all cached
    assert eq.stats["calls"] == 8 and eq.stats["cache_hits"] == 8


def test_llm_entailment_strict_vs_non_strict_and_unconditioned():
    answers = [PARIS[0], PARIS[1], ROME]
    strict = U.LLMEntailment(FakeNLI(neutral_one_way=True), strict_entailment=True, condition_on_question=False)
    loose = U.LLMEntailment(FakeNLI(neutral_one_way=True), strict_entailment=False)
    # (neutral, entailment): strict splits, non-strict (no contradiction, not both neutral) merges
    assert strict.cluster(answers, "Q?") == [0, 1, 2]
    assert loose.cluster(answers, "Q?") == [0, 0, 1]
    assert "Q?" not in strict.judge.prompts[0]
    assert U.equivalent_from_labels("neutral", "neutral", strict=False) is False
    assert U.equivalent_from_labels("entailment", "contradiction", strict=False) is False
    with pytest.raises(ValueError, match="text1"):
        U.LLMEntailment(FakeNLI(), nli_prompt="no fields")


def test_parse_nli_label():
    # jlko predict_implication: first 30 lower-cased characters, entailment > neutral > contradiction
    assert U.parse_nli_label("Entailment. Because...") == "entailment"
    assert U.parse_nli_label("contradiction or entailment?") == "entailment"      # priority, not position
    assert U.parse_nli_label("Contradiction (not neutral).") == "neutral"
    assert U.parse_nli_label("It is a contradiction, not entailment") == "contradiction"  # 'entailment' past 30
    assert U.parse_nli_label("The answer, after thinking it over: entailment") == "neutral"  # nothing in 30
    assert U.parse_nli_label("unsure") == "neutral"


def test_is_abstention_substring_and_exact():
    ph = "I don't know the answer."
    assert U.is_abstention("Sorry, I don\u2019t know the answer. Ask me later.", ph)          # substring default
    assert not U.is_abstention("Sorry, I don't know the answer. Ask me later.", ph, "exact")
    assert U.is_abstention("  i don't know the ANSWER ", ph, "exact")
    assert not U.is_abstention("I don't know.", ph) and not U.is_abstention("They were born in Paris.", ph)
    with pytest.raises(ValueError, match="abstain_match"):
        U.is_abstention("x", ph, "fuzzy")


def test_llm_unconditioned_prompt_has_no_question_line():
    judge = FakeNLI()
    U.LLMEntailment(judge, condition_on_question=False).cluster([PARIS[0], ROME], "Q?")
    assert judge.prompts and all("question" not in p and "Possible Answer 1" in p for p in judge.prompts)


class StubEmbedder:
    name = "stub"

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += len(texts)
        return np.array([[1.0, 0.1 * len(t) % 0.3, 0.0] if "Paris" in t else [0.0, 0.2, 1.0] for t in texts])


def test_embedding_cosine_threshold_and_embeds_each_string_once():
    emb = StubEmbedder()
    eq = U.EmbeddingCosine(emb, threshold=0.9)
    assert eq.cluster([*PARIS, ROME, PARIS[0]]) == [0, 0, 0, 1, 0]
    assert emb.calls == 4

    class Exact:  # parallel vectors have cosine exactly 1; a small tilt falls below threshold 1
        def encode(self, texts):
            return np.array([{"a": [1.0, 0, 0], "b": [2.0, 0, 0], "c": [1.0, 0.05, 0]}[t] for t in texts])

    assert U.EmbeddingCosine(Exact(), threshold=1.0).cluster(["a", "b", "c"]) == [0, 0, 1]


@pytest.mark.slow
def test_embedding_minilm_paraphrase_vs_contradiction():
    from alignkit.judges.embedding import build_embedder

    e = build_embedder({"backend": "minilm"}).encode(["They were born in Quorith.", "Their birthplace was Quorith.",
                                                      "They were born in 1913."])
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    para, contra = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert para > contra
    thr = (para + contra) / 2
    eq = U.EmbeddingCosine(build_embedder({"backend": "minilm"}), threshold=thr)
    assert eq.cluster(["They were born in Quorith.", "Their birthplace was Quorith.", "They were born in 1913."]) \
        == [0, 0, 1]


def test_kb_canonical_aliases_merge_refusals_one_class(tiny_world_dir):
    from alignkit.world import load_world
    from alignkit.world.kb import WorldKB

    w = load_world(tiny_world_dir)
    canon, aliases = next((c, a) for c, a in w.values["birth_city"].items() if a)
    other = next(c for c in w.values["birth_city"] if c != canon)
    eq = U.KBCanonical(WorldKB(tiny_world_dir))
    answers = [f"They were born in {canon}.", f"Born in {aliases[0]}.", f"They were born in {other}.",
               "I don't know the answer.", "I do not know."]
    assert eq.cluster(answers) == [0, 0, 1, 2, 2]
    assert isinstance(U.build_equivalence({"backend": "kb"}, str(tiny_world_dir)), U.KBCanonical)


@pytest.fixture(scope="module")
def tiny_nli_dir(tmp_path_factory):
    """A randomly initialised tiny BERT sequence classifier with NLI label names (plumbing only)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("nli")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "capital", "is", "paris", "rome", "it", ",", ".",
             "what", "?", "q"]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wl.normalizer = normalizers.Lowercase()
    wl.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    wl.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=3,
                     id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},
                     label2id={"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2})
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _force(eq, label_id: int):
    import torch

    with torch.no_grad():
        eq.model.classifier.weight.zero_()
        eq.model.classifier.bias.copy_(torch.tensor([10.0 if i == label_id else 0.0 for i in range(3)]))


def test_nli_classifier_plumbing_and_forced_outputs(tiny_nli_dir):
    eq = U.build_equivalence({"backend": "nli", "model_path": str(tiny_nli_dir), "batch_size": 2})
    assert isinstance(eq, U.ClassifierEntailment) and eq.label_of == {0: "contradiction", 1: "neutral",
                                                                        2: "entailment"}
    labels = eq.directed("What is the capital?", [(PARIS[1], ROME), (ROME, PARIS[1]), (PARIS[0], PARIS[1])])
    assert all(lab in U.NLI_LABELS for lab in labels) and eq.stats["calls"] == 3
    _force(eq, 2)  # always entailment: everything merges
    eq._cache.clear()
    assert eq.cluster([*PARIS, ROME], "What is the capital?") == [0, 0, 0, 0]
    _force(eq, 0)  # always contradiction: nothing merges, every pair of uniques judged both ways
    eq._cache.clear()
    before = eq.stats["calls"]
    assert eq.cluster([PARIS[0], PARIS[0], ROME, PARIS[1]], "Q") == [0, 0, 1, 2]
    assert eq.stats["calls"] - before == 2 * 2 + 2 * 1  # 3 uniques: M(M-1) directed calls


def test_nli_classifier_paraphrase_vs_contradiction_by_rule(tiny_nli_dir, monkeypatch):
    """The classifier's outputs forced by a rule on its inputs (question prepended)."""
    import torch

    eq = U.ClassifierEntailment(str(tiny_nli_dir))
    seen = []

    def fake_forward(**enc):
        texts = eq.tok.batch_decode(enc["input_ids"], skip_special_tokens=True)
        seen.extend(texts)
        # entailment when both segments name the same city (0 or 2 "rome"), else contradiction
        rows = [[0.0, 0.0, 5.0] if t.count("rome") != 1 else [5.0, 0.0, 0.0] for t in texts]
        return type("Out", (), {"logits": torch.tensor(rows)})()

    monkeypatch.setattr(eq, "model", type("M", (), {"__call__": lambda self, **k: fake_forward(**k),
                                                    "parameters": lambda self: iter([torch.zeros(1)])})())
    assert eq.cluster([PARIS[1], PARIS[2], ROME], "What is the capital?") == [0, 0, 1]
    assert all(t.count("what is the capital") == 2 for t in seen)  # both segments conditioned


def test_nli_device_and_max_length_from_config(tiny_nli_dir):
    eq = U.build_equivalence({"backend": "nli", "model_path": str(tiny_nli_dir), "device": "cpu", "max_length": 9})
    assert eq.max_length == 9 and next(eq.model.parameters()).device.type == "cpu"
    seen = []
    orig = eq.tok.__call__
    eq.tok = type("T", (), {"__call__": lambda self, *a, **k: seen.append(k["max_length"]) or orig(*a, **k)})()
    eq.directed("What is the capital?", [(PARIS[1], ROME)])
    assert seen == [9]


def test_classifier_labels_rejects_unknown_names():
    with pytest.raises(ValueError, match="LABEL_0"):
        U.classifier_labels({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})


def test_semantic_volume_hand_values():
    eps = 1e-3
    same = np.tile([[3.0, 4.0]], (3, 1))  # 3 identical answers: eigenvalues (3+eps, eps, eps)
    assert U.semantic_volume(same, eps) == pytest.approx(math.log(3 + eps) + 2 * math.log(eps))
    ortho = np.eye(3) * 2.0  # orthogonal after normalisation: (1+eps)^3
    assert U.semantic_volume(ortho, eps) == pytest.approx(3 * math.log(1 + eps))
    assert U.semantic_volume(ortho, eps) > U.semantic_volume(same, eps)
    assert U.semantic_volume(np.random.default_rng(0).normal(size=(4, 16)), eps, pca_dim=2) < 0
    with pytest.raises(ValueError):
        U.semantic_volume(same, 0.0)


def test_build_equivalence_errors():
    with pytest.raises(ValueError, match="unknown clustering backend"):
        U.build_equivalence({"backend": "bogus"})
    with pytest.raises(ValueError, match="world"):
        U.build_equivalence({"backend": "kb"})
    assert isinstance(U.build_equivalence({"backend": "exact"}), U.ExactMatch)


class RuleEquivalence(U.Equivalence):
    """An equivalence given as a set of unordered pairs; counts comparisons it was asked."""

    name = "rule"

    def __init__(self, pairs):
        super().__init__()
        self.pairs = {frozenset(p) for p in pairs}
        self.asked: list[tuple[str, str]] = []

    def equivalent_to(self, question, rep, others):
        self.asked += [(rep, o) for o in others]
        return [frozenset((rep, o)) in self.pairs for o in others]


def test_cluster_runs_jlko_loop_over_duplicates_when_not_transitive():
    """jlko get_semantic_ids loops over all M answers. With a ≡ b, b ≡ c, a ≢ c and answers
    [a, b, c, b], c becomes a representative and re-assigns the *second* b: [0, 0, 1, 1].
    De-duplicating first ([a, b, c]) gave both b's a's cluster: [0, 0, 1, 0]."""
    eq = RuleEquivalence([("a", "b"), ("b", "c")])
    assert eq.cluster(list("abcb")) == [0, 0, 1, 1]
    assert U.greedy_cluster(list("abcb"), lambda r, later: [frozenset((r, x)) in eq.pairs for x in later]) \
        == [0, 0, 1, 1]
    # identical strings are never sent for comparison: a's loop asks about b and c once each
    assert eq.asked == [("a", "b"), ("a", "c"), ("c", "b")]
    assert semantic_entropy(eq.cluster(list("abcb"))) == pytest.approx(math.log(2))


class CountingNLI(FakeNLI):
    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def complete(self, convs):
        self.batches.append(len(convs))
        return super().complete(convs)


def test_llm_clustering_of_many_questions_is_one_judge_batch_per_round():
    """An HTTP judge parallelises within one complete() call (its ``concurrency``); clustering
    question by question sent a handful of pairs at a time. cluster_many advances every
    question together: one batch per greedy round, however many questions."""
    judge = CountingNLI()
    eq = U.LLMEntailment(judge)
    groups = [([PARIS[0], ROME, PARIS[1], f"The capital is Rome{'!' * i}"], f"Q{i}?") for i in range(10)]
    ids = eq.cluster_many(groups)
    assert ids == [[0, 1, 0, 1]] * 10
    assert len(judge.batches) == 2 and judge.batches[0] == 10 * 3 * 2  # round 1: every question's first rep
    # the same answers one question at a time give the same clusters
    assert [U.LLMEntailment(FakeNLI()).cluster(a, q) for a, q in groups] == ids


def test_score_rows_sends_all_questions_to_the_judge_together():
    import alignkit.recipes.se_abstention as R
    from alignkit.recipes.se_abstention import Method

    judge = CountingNLI()
    rows = [{"qid": i, "question": f"Q{i}?", "answers": None, "standard_response": "Paris.",
             "samples": [PARIS[0], ROME, PARIS[1]], "sample_logps": [-0.1, -0.2, -0.3]} for i in range(12)]
    out = R.score_rows(rows, Method(), U.LLMEntailment(judge), None, None)
    assert [r["semantic_ids"] for r in out] == [[0, 1, 0]] * 12
    assert len(judge.batches) <= 3  # greedy rounds (M = 3), not one call per question


def test_semantic_volume_pca_keeps_the_spread():
    """sv_pca_dim must not re-normalise after projecting: with pca_dim=1 every projection would
    become ±1 and the volume would not depend on how far apart the answers are."""
    eps = 1e-3

    def fan(angle):  # 4 unit vectors spread by ±angle around one direction in the (x, y) plane
        a = np.radians([-angle, -angle / 3, angle / 3, angle])
        return np.stack([np.cos(a), np.sin(a), np.zeros(4)], axis=1)

    vols = [U.semantic_volume(fan(t), eps, pca_dim=1) for t in (2, 10, 40, 80)]
    assert vols == sorted(vols) and vols[-1] - vols[0] > 3  # wider fan, larger volume
    same = np.tile([[0.0, 1.0, 0.0]], (4, 1))
    assert U.semantic_volume(same, eps, pca_dim=1) == pytest.approx(4 * math.log(eps))  # the floor
    assert U.semantic_volume(same, eps, pca_dim=1) < vols[0]
    # pca_dim 2 on 2-D data changes nothing but the centring
    assert U.semantic_volume(fan(40), eps, pca_dim=2) > U.semantic_volume(fan(10), eps, pca_dim=2)
