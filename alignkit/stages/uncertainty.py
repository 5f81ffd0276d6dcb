"""Sampling-based uncertainty of a model's answers: semantic clustering, semantic entropy,
lexical (string) entropy and Semantic Volume (se_abstention.md §2, Extension).

Clustering (:func:`cluster_answers`) is the greedy representative loop of jlko
``get_semantic_ids`` (Farquhar et al. 2024) for every equivalence backend:

    for i in 1..M: if s_i has no cluster: open cluster k; for every later j: if s_i ≡ s_j: s_j -> k

so one representative per cluster is compared with the answers after it. Two documented
quirks are kept on purpose (se_abstention.md §2.3): the relation need not be transitive
(a ≡ b and b ≡ c do not make a ≡ c: with [a, b, c], c opens its own cluster when a ≢ c),
and a later representative *re-assigns* an answer that already has a cluster
([a, c, b] with a ≡ b, c ≡ b, a ≢ c gives [0, 1, 1]: b moves from a's cluster to c's).

The loop runs over all M answers, duplicates included, exactly as jlko's does: de-duplicating
first (as lm-polygraph does) changes the clusters when the relation is not transitive — with
[a, b, c, b], a ≡ b, b ≡ c, a ≢ c, jlko gives [0, 0, 1, 1] (c re-assigns the second b), a
de-duplicated loop [0, 0, 1, 0]. Duplicates still cost no judge call: two identical strings
are taken as equivalent without asking (an NLI judge says entailment on identical text), and
every directed pair is judged once (cached).

Many questions are clustered in lock-step (:meth:`Equivalence.cluster_many`): each round takes
the next representative of every question still open and sends all their comparisons to the
judge as *one* batch, so an HTTP judge runs at its full ``concurrency`` and a local NLI model
fills its batches across questions, instead of one question (a handful of pairs) at a time.

Equivalence backends (:func:`build_equivalence`, config ``method.clustering``):

* ``exact``     — normalised exact match (case, surrounding space/punctuation, inner spaces).
* ``embedding`` — cosine of sentence embeddings >= ``threshold`` (MiniLM by default).
* ``kb``        — the tiny world's knowledge base: an answer maps to the canonical values
                  it states (aliases resolved: "Quorith City" = "Quorith"); refusals map to
                  one class. Exact in the testbed.
* ``llm``       — bidirectional entailment judged by an LLM (``judge``: ``hf`` local model
                  or ``http`` OpenAI-compatible endpoint) with ``nli_prompt``.
* ``nli``       — bidirectional entailment by a local NLI sequence classifier at
                  ``model_path`` (``AutoModelForSequenceClassification``; label names from
                  ``config.id2label``).

For ``llm`` / ``nli``: ``strict_entailment: true`` (jlko's CLI default) merges a pair only
when both directions say entailment; ``false`` (jlko's function default) merges unless a
direction says contradiction or both say neutral. ``condition_on_question`` prepends the
question to each answer. Directed judgments are cached in memory (and on disk by the HTTP
judge); ``stats`` counts ``calls`` (directed judgments computed) and ``cache_hits``.

This module imports torch / transformers only inside the ``nli`` backend.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# normalize_answer: the loose normaliser of whole answers; is_abstention is re-exported (one
# definition, in judges.rules, which evaluation's qa task also uses)
from alignkit.judges.rules import is_abstention  # noqa: F401
from alignkit.judges.rules import normalize_loose as normalize_answer

ENTAILMENT, NEUTRAL, CONTRADICTION = "entailment", "neutral", "contradiction"
NLI_LABELS = (ENTAILMENT, NEUTRAL, CONTRADICTION)

# jlko EntailmentLLM prompt (semantic_entropy.py), one direction; {question}, {text1}, {text2}.
DEFAULT_NLI_PROMPT = (
    "We are evaluating answers to the question \"{question}\"\n"
    "Here are two possible answers:\n"
    "Possible Answer 1: {text1}\nPossible Answer 2: {text2}\n"
    "Does Possible Answer 1 semantically entail Possible Answer 2? "
    "Respond with entailment, contradiction, or neutral."
)


# --------------------------------------------------------------------------- clustering


def greedy_cluster(items: Sequence[Any], equivalent_to: Callable[[Any, list[Any]], list[bool]]) -> list[int]:
    """jlko ``get_semantic_ids`` over ``items``: ``equivalent_to(rep, later_items)`` returns,
    for the representative ``rep``, one bool per later item (one batch per representative).
    Later representatives re-assign items they match (kept from the reference code)."""
    loop = _greedy_steps(items)
    try:
        rep, later = next(loop)
        while True:
            rep, later = loop.send(equivalent_to(rep, later))
    except StopIteration as stop:
        return stop.value


def _greedy_steps(items: Sequence[Any]):
    """The greedy loop as a generator: yields ``(rep, later_items)``, receives one bool per
    later item, returns the ids. Lets :meth:`Equivalence.cluster_many` run many in lock-step."""
    ids = [-1] * len(items)
    next_id = 0
    for i, rep in enumerate(items):
        if ids[i] != -1:
            continue
        ids[i] = next_id
        later = list(items[i + 1:])
        if later:
            same = yield rep, later
            for j, eq in enumerate(same, start=i + 1):
                if eq:
                    ids[j] = next_id
        next_id += 1
    return ids


class Equivalence:
    """A semantic-equivalence relation. Subclasses implement :meth:`equivalent_to` (and may
    override :meth:`equivalent_to_many` to judge many questions' comparisons at once)."""

    name = "equivalence"

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()

    def equivalent_to(self, question: str, rep: str, others: list[str]) -> list[bool]:
        raise NotImplementedError

    def equivalent_to_many(self, requests: list[tuple[str, str, list[str]]]) -> list[list[bool]]:
        """``equivalent_to`` for many ``(question, rep, others)`` at once."""
        return [self.equivalent_to(q, rep, others) for q, rep, others in requests]

    def cluster(self, answers: Sequence[str], question: str = "") -> list[int]:
        """Cluster ids of ``answers`` (ints from 0 in order of first appearance of a representative)."""
        return self.cluster_many([(answers, question)])[0]

    def cluster_many(self, groups: Sequence[tuple[Sequence[str], str]]) -> list[list[int]]:
        """Cluster ids for each ``(answers, question)``: jlko's greedy loop over every answer of
        each group (duplicates included), all groups advanced together, one judge batch per
        round. A string is equivalent to an identical one without a judge call; the judge sees
        each representative's distinct other strings once."""
        loops, reqs, out = [], [], [None] * len(groups)
        for g, (answers, question) in enumerate(groups):
            answers = list(answers)
            self.stats["answers"] += len(answers)
            self.stats["unique_answers"] += len(set(answers))
            loop = _greedy_steps(answers)
            try:
                reqs.append((g, question, loop, next(loop)))
            except StopIteration as stop:
                out[g] = stop.value
            loops.append(loop)
        while reqs:
            asks = [(q, rep, list(dict.fromkeys(o for o in later if o != rep))) for _, q, _, (rep, later) in reqs]
            verdicts = self.equivalent_to_many(asks)
            nxt = []
            for (g, q, loop, (rep, later)), (_, _, uniq), v in zip(reqs, asks, verdicts):
                if len(v) != len(uniq):
                    raise RuntimeError(f"{self.name}: {len(v)} verdicts for {len(uniq)} answers")
                same = dict(zip(uniq, v))
                try:
                    nxt.append((g, q, loop, loop.send([o == rep or same[o] for o in later])))
                except StopIteration as stop:
                    out[g] = stop.value
            reqs = nxt
        return out


class ExactMatch(Equivalence):
    """Normalised exact string match (:func:`normalize_answer`)."""

    name = "exact"

    def equivalent_to(self, question: str, rep: str, others: list[str]) -> list[bool]:
        k = normalize_answer(rep)
        return [normalize_answer(o) == k for o in others]


class EmbeddingCosine(Equivalence):
    """Cosine similarity of sentence embeddings >= ``threshold``. Each distinct string is
    embedded once (kept in memory)."""

    name = "embedding"

    def __init__(self, embedder: Any, threshold: float = 0.9) -> None:
        super().__init__()
        if not -1 <= threshold <= 1:
            raise ValueError(f"embedding threshold must be in [-1, 1], got {threshold}")
        self.embedder, self.threshold = embedder, threshold
        self._vec: dict[str, np.ndarray] = {}

    def _embed(self, texts: list[str]) -> list[np.ndarray]:
        new = [t for t in dict.fromkeys(texts) if t not in self._vec]
        if new:
            e = np.asarray(self.embedder.encode(new), dtype=np.float64)
            n = np.linalg.norm(e, axis=1, keepdims=True)
            e = np.divide(e, n, out=np.zeros_like(e), where=n > 0)
            self._vec.update(zip(new, e))
            self.stats["embedded"] += len(new)
        return [self._vec[t] for t in texts]

    def equivalent_to(self, question: str, rep: str, others: list[str]) -> list[bool]:
        r, *os_ = self._embed([rep, *others])
        return [float(r @ o) >= self.threshold for o in os_]


class KBCanonical(Equivalence):
    """The world knowledge base as an exact oracle: an answer's class is the set of
    canonical (attribute, value) facts it states; a refusal is its own class; an answer
    stating no fact falls back to its normalised text."""

    name = "kb"

    def __init__(self, kb: Any) -> None:
        super().__init__()
        self.kb = kb

    def key(self, answer: str) -> Any:
        return self.kb.answer_class(answer, normalize_answer)

    def equivalent_to(self, question: str, rep: str, others: list[str]) -> list[bool]:
        k = self.key(rep)
        return [self.key(o) == k for o in others]


class _Entailment(Equivalence):
    """Bidirectional entailment from a directed NLI judge (``_judge_pairs``), cached."""

    def __init__(self, strict_entailment: bool = True, condition_on_question: bool = True) -> None:
        super().__init__()
        self.strict = strict_entailment
        self.condition = condition_on_question
        self._cache: dict[tuple[str, str, str], str] = {}

    def _judge_pairs(self, items: list[tuple[str, str, str]]) -> list[str]:
        """NLI label of "a entails b" for each ``(question, a, b)`` (question "" = unconditioned)."""
        raise NotImplementedError

    def directed(self, question: str, pairs: list[tuple[str, str]]) -> list[str]:
        """NLI label of "a entails b" for each (a, b); computed pairs are cached and counted."""
        return self.directed_many([(question, a, b) for a, b in pairs])

    def directed_many(self, items: list[tuple[str, str, str]]) -> list[str]:
        """:meth:`directed` for ``(question, a, b)`` triples of any number of questions, in one
        judge batch."""
        keys = [(q if self.condition else "", a, b) for q, a, b in items]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        self.stats["cache_hits"] += len(keys) - len(todo)
        if todo:
            labels = self._judge_pairs(todo)
            if len(labels) != len(todo):
                raise RuntimeError(f"{self.name}: {len(labels)} labels for {len(todo)} pairs")
            for k, lab in zip(todo, labels):
                if lab not in NLI_LABELS:
                    raise ValueError(f"{self.name}: label {lab!r} is not one of {NLI_LABELS}")
                self._cache[k] = lab
            self.stats["calls"] += len(todo)
            self.stats["judge_batches"] += 1
        return [self._cache[k] for k in keys]

    def equivalent_to(self, question: str, rep: str, others: list[str]) -> list[bool]:
        return self.equivalent_to_many([(question, rep, others)])[0]

    def equivalent_to_many(self, requests: list[tuple[str, str, list[str]]]) -> list[list[bool]]:
        # one batch for every request: both directions for every later answer
        items = [t for q, rep, others in requests for o in others for t in ((q, rep, o), (q, o, rep))]
        labels = iter(self.directed_many(items))
        out = []
        for _, _, others in requests:
            pairs = [(next(labels), next(labels)) for _ in others]
            out.append([equivalent_from_labels(fw, bw, self.strict) for fw, bw in pairs])
        return out


def equivalent_from_labels(forward: str, backward: str, strict: bool = True) -> bool:
    """jlko ``are_equivalent``: strict = entailment both ways; non-strict = no contradiction
    and not (neutral, neutral)."""
    if strict:
        return forward == ENTAILMENT and backward == ENTAILMENT
    return CONTRADICTION not in (forward, backward) and (forward, backward) != (NEUTRAL, NEUTRAL)


def parse_nli_label(text: str) -> str:
    """jlko ``EntailmentLLM.predict_implication``: the first 30 characters of the lower-cased
    reply are searched for the words with priority entailment > neutral > contradiction;
    neutral when none is there (jlko logs "MANUAL NEUTRAL")."""
    head = text.lower()[:30]
    for w in (ENTAILMENT, NEUTRAL, CONTRADICTION):
        if w in head:
            return w
    return NEUTRAL


class LLMEntailment(_Entailment):
    """Directed NLI asked of a chat judge (anything with ``complete(conversations)``:
    :class:`alignkit.judges.hf.HFJudge`, :class:`alignkit.judges.http.HTTPJudge`)."""

    name = "llm"

    def __init__(self, judge: Any, nli_prompt: str = DEFAULT_NLI_PROMPT, strict_entailment: bool = True,
                 condition_on_question: bool = True) -> None:
        super().__init__(strict_entailment, condition_on_question)
        for f in ("{text1}", "{text2}"):
            if f not in nli_prompt:
                raise ValueError(f"nli_prompt must contain {f}")
        self.judge, self.prompt = judge, nli_prompt
        # Unconditioned (condition_on_question: false): the lines naming {question} are left
        # out, rather than rendering 'the question ""'.
        self.prompt_no_question = "\n".join(x for x in nli_prompt.split("\n") if "{question}" not in x)

    def _judge_pairs(self, items: list[tuple[str, str, str]]) -> list[str]:
        convs = [[{"role": "user", "content": (self.prompt if q else self.prompt_no_question).format(
            question=q, text1=a, text2=b)}] for q, a, b in items]
        return [parse_nli_label(r) for r in self.judge.complete(convs)]


class ClassifierEntailment(_Entailment):
    """Directed NLI by a local sequence classifier (DeBERTa-MNLI style): input is the pair
    (premise, hypothesis) — each prefixed with the question when conditioning — and the
    argmax class is mapped to entailment / neutral / contradiction by ``config.id2label``.
    ``device``: ``None`` = CUDA when available, else CPU; pairs longer than ``max_length``
    tokens are truncated."""

    name = "nli"

    def __init__(self, model_path: str, strict_entailment: bool = True, condition_on_question: bool = True,
                 batch_size: int = 32, max_length: int = 256, device: str | None = None) -> None:
        super().__init__(strict_entailment, condition_on_question)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path)
        import torch

        self.model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
        self.model = self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.label_of = classifier_labels(self.model.config.id2label, model_path)
        self.batch_size, self.max_length = batch_size, max_length

    def _judge_pairs(self, items: list[tuple[str, str, str]]) -> list[str]:
        import torch

        def pre(q: str) -> str:
            return f"{q} " if q else ""

        out: list[str] = []
        dev = next(self.model.parameters()).device
        with torch.inference_mode():
            for s in range(0, len(items), self.batch_size):
                chunk = items[s:s + self.batch_size]
                enc = self.tok([pre(q) + a for q, a, _ in chunk], [pre(q) + b for q, _, b in chunk], padding=True,
                               truncation=True, max_length=self.max_length, return_tensors="pt").to(dev)
                pred = self.model(**enc).logits.argmax(-1).tolist()
                out += [self.label_of[int(i)] for i in pred]
        return out


def classifier_labels(id2label: Mapping[Any, str], where: str = "") -> dict[int, str]:
    """Map an NLI classifier's ``id2label`` to entailment / neutral / contradiction by name
    (case-insensitive prefix: "ENTAILMENT", "entail", "Contradiction", ...)."""
    out = {}
    for i, name in id2label.items():
        low = str(name).lower()
        lab = next((x for x in NLI_LABELS if low.startswith(x[:6])), None)
        if lab is None:
            raise ValueError(f"NLI model {where}: label {name!r} (id {i}) is not entailment / neutral / "
                             "contradiction; set config.id2label to those names")
        out[int(i)] = lab
    if set(out.values()) != set(NLI_LABELS):
        raise ValueError(f"NLI model {where}: id2label {dict(id2label)} must name entailment, neutral and "
                         "contradiction once each")
    return out


CLUSTERING_BACKENDS = ("exact", "embedding", "kb", "llm", "nli")


def build_equivalence(spec: Mapping[str, Any], world_dir: str | None = None) -> Equivalence:
    """An :class:`Equivalence` from a config mapping (``method.clustering``):
    ``{backend: exact | embedding | kb | llm | nli, ...}``."""
    s = dict(spec)
    backend = s.pop("backend", "exact")
    strict = s.pop("strict_entailment", True)
    cond = s.pop("condition_on_question", True)
    if backend == "exact":
        return ExactMatch()
    if backend == "embedding":
        from alignkit.judges.embedding import build_embedder

        return EmbeddingCosine(build_embedder(s.get("embedder") or {"backend": "minilm"}), s.get("threshold", 0.9))
    if backend == "kb":
        from alignkit.world.kb import WorldKB

        wd = s.get("world_dir") or world_dir
        if not wd:
            raise ValueError("clustering backend 'kb' needs a world (model world:tiny, or clustering.world_dir)")
        return KBCanonical(WorldKB(wd))
    if backend == "llm":
        from alignkit.judges import build_judge

        judge = build_judge(s["judge"])
        if not hasattr(judge, "complete"):
            raise ValueError("clustering.judge must be a prompt judge (backend hf or http)")
        return LLMEntailment(judge, s.get("nli_prompt") or DEFAULT_NLI_PROMPT, strict, cond)
    if backend == "nli":
        return ClassifierEntailment(s["model_path"], strict, cond, s.get("batch_size", 32), s.get("max_length", 256),
                                    s.get("device"))
    raise ValueError(f"unknown clustering backend {backend!r}; valid: {', '.join(CLUSTERING_BACKENDS)}")


# --------------------------------------------------------------------------- signals


def lexical_entropy(samples: Sequence[str]) -> float:
    """R-Tuning-U string entropy (se_abstention.md §2.1): discrete entropy over exact-string
    unique samples (surrounding whitespace stripped). Paraphrases inflate it."""
    from alignkit.metrics import semantic_entropy

    return semantic_entropy([s.strip() for s in samples])


def semantic_volume(embeddings: np.ndarray, epsilon: float = 1e-3, pca_dim: int | None = None) -> float:
    """Semantic Volume (X. Li et al. 2025): ``log det(VᵀV + εI)`` with V = [v_1 … v_n] the
    unit-normalised embeddings of the n samples as columns.

    With ``pca_dim`` the unit vectors are reduced to their top ``pca_dim`` principal
    components (centred, as ``sklearn.decomposition.PCA.transform`` does) and *not*
    re-normalised: re-normalising after projecting throws the lengths away, and with
    ``pca_dim=1`` every projection becomes ±1, so the volume no longer depends on how far
    apart the answers are. Here it is the volume of the cloud in the top-``pca_dim``
    subspace: n identical answers sit on the floor n·log ε, and it grows with the spread
    along the principal directions.

    VᵀV is the n×n Gram matrix, so the value is computed in sample space: without PCA, for
    n identical answers it is log((n+ε)·ε^(n−1)), for n orthogonal ones n·log(1+ε) — higher
    means more spread (more uncertain). ε > 0 keeps the log finite.
    """
    if epsilon <= 0:
        raise ValueError(f"sv_epsilon must be > 0, got {epsilon}")
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] == 0:
        raise ValueError(f"semantic_volume: need an [n, d] array with n >= 1, got shape {e.shape}")
    n = np.linalg.norm(e, axis=1, keepdims=True)
    v = np.divide(e, n, out=np.zeros_like(e), where=n > 0)
    if pca_dim is not None:
        if pca_dim < 1:
            raise ValueError(f"sv_pca_dim must be >= 1, got {pca_dim}")
        c = v - v.mean(0, keepdims=True)
        _, _, vt = np.linalg.svd(c, full_matrices=False)
        v = c @ vt[:pca_dim].T
    gram = v @ v.T
    sign, logdet = np.linalg.slogdet(gram + epsilon * np.eye(gram.shape[0]))
    if sign <= 0:
        raise ValueError("semantic_volume: Gram matrix + eps I is not positive definite")
    return float(logdet)


def likelihood_semantic_entropy(cluster_ids: Sequence[int], mean_logps: Sequence[float]) -> float:
    """Likelihood-weighted SE (se_abstention.md §2.1) from length-normalised log-probs."""
    from alignkit.metrics import semantic_entropy

    return semantic_entropy(cluster_ids, mean_logps)
