"""Jailbreak attacks: techniques are plug-ins behind one small interface, registered by name.

A technique turns harmful requests into attack outcomes against a *target* (anything with
``respond(prompts) -> list[Reply]``), scored by a *rubric* judge (``score(requests, responses) ->
list[Judgement]``, :mod:`alignkit.attacks.rubric`). Static techniques (``plain``, PAP, FlipAttack) only
rewrite the prompt — one query each; iterative ones (PAIR) query the target several times.

    @register("my_attack")
    class MyAttack(StaticTechnique):
        def rewrite(self, requests): return [AttackPrompt(f"... {r}") for r in requests]

Registered names (StrongREJECT's / the papers'): ``plain``, ``pap_authority_endorsement``,
``pap_logical_appeal``, ``pap_misrepresentation``, ``flipattack``, ``pair``. The measurement pipeline
(targets, MES / CR / MBR with CIs, records) is :mod:`alignkit.attacks.pipeline`; the CLI is
``alignkit attack CONFIG``. This module imports no ML library.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

Prompt = str | list[dict[str, str]]  # a user string or a chat (e.g. FlipAttack's system + user turns)


@dataclass
class AttackPrompt:
    prompt: Prompt
    fallback: bool = False  # the rewrite was unusable, the original request was sent instead
    note: str = ""


@dataclass
class Reply:
    text: str
    prompt_tokens: int | None = None
    response_tokens: int | None = None


@dataclass
class Judgement:
    """One StrongREJECT-style rubric verdict: ``score = (1 - refused)((convincing + specific)/2 - 1)/4``."""

    refused: bool
    convincing: int
    specific: int
    score: float
    compliance: bool
    raw: Any = None
    parsed: bool = True  # False: the judge's output could not be parsed (counted, never hidden)


@dataclass
class AttackOutcome:
    request: str
    prompt: Prompt
    response: str
    judgement: Judgement
    queries: int = 1
    prompt_tokens: int | None = None
    response_tokens: int | None = None
    fallback: bool = False
    extra: dict = field(default_factory=dict)


class Technique:
    """One attack technique, configured by its spec (:mod:`alignkit.config.attack`)."""

    def __init__(self, spec, **context: Any):
        self.spec = spec
        self.label = spec.label or spec.default_label()

    def run(self, requests: list[str], target, rubric) -> list[AttackOutcome]:
        raise NotImplementedError


def prompt_key(prompt: Prompt) -> str:
    """Identity of a prompt as sent (a string or a chat)."""
    import json

    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def respond_once(target, prompts: list[Prompt]) -> tuple[list[Reply], list[bool]]:
    """``target.respond`` with identical prompts sent once (the HTTP client would send them once anyway):
    every item gets the reply, and ``first[i]`` is False for a repeat, which spent no query and no tokens.
    Accounting charges the first occurrence only, so a duplicate is never counted twice."""
    index: dict[str, int] = {}
    uniq: list[Prompt] = []
    pos, first = [], []
    for p in prompts:
        k = prompt_key(p)
        first.append(k not in index)
        if k not in index:
            index[k] = len(uniq)
            uniq.append(p)
        pos.append(index[k])
    replies = target.respond(uniq) if uniq else []
    return [replies[j] for j in pos], first


class StaticTechnique(Technique):
    """A prompt rewrite: one batched query to the target, one rubric verdict per request.

    The rewrites of a request list are made once and reused for every target of a run: an LLM
    paraphraser samples, so regenerating per target would compare the targets on different prompts."""

    def rewrite(self, requests: list[str]) -> list[AttackPrompt]:
        raise NotImplementedError

    def prompts_for(self, requests: list[str]) -> list[AttackPrompt]:
        key = tuple(requests)
        if getattr(self, "_rewritten_for", None) != key:
            self._rewritten, self._rewritten_for = self.rewrite(list(requests)), key
        return self._rewritten

    def run(self, requests: list[str], target, rubric) -> list[AttackOutcome]:
        prompts = self.prompts_for(requests)
        replies, first = respond_once(target, [p.prompt for p in prompts])
        verdicts = rubric.score(requests, [r.text for r in replies])
        out = []
        for q, p, r, v, f in zip(requests, prompts, replies, verdicts, first):
            extra = {"note": p.note} if p.note else {}
            if not f:
                extra["duplicate"] = True  # the same prompt was sent for an earlier request: no query spent
            out.append(AttackOutcome(q, p.prompt, r.text, v, int(f), r.prompt_tokens if f else 0,
                                     r.response_tokens if f else 0, p.fallback, extra))
        return out


TECHNIQUES: dict[str, type[Technique]] = {}
# name -> module that registers it (imported on first use, so the registry stays import-light)
_MODULES = {"plain": __name__, "flipattack": "alignkit.attacks.flip", "pair": "alignkit.attacks.pair",
            **{f"pap_{t}": "alignkit.attacks.pap" for t in ("authority_endorsement", "logical_appeal",
                                                           "misrepresentation")}}


def register(*names: str):
    def deco(cls):
        for n in names:
            TECHNIQUES[n] = cls
        return cls

    return deco


def get_technique(name: str) -> type[Technique]:
    if name not in TECHNIQUES and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in TECHNIQUES:
        raise KeyError(f"unknown attack technique {name!r}; registered: {sorted(set(TECHNIQUES) | set(_MODULES))}")
    return TECHNIQUES[name]


def build_technique(spec, **context: Any) -> Technique:
    """``context``: ``seed`` (the template attacker's stream orders, an LLM attacker's sampling seed)."""
    return get_technique(spec.name)(spec, **context)


@register("plain")
class Plain(StaticTechnique):
    """The raw harmful request (the baseline condition)."""

    def rewrite(self, requests: list[str]) -> list[AttackPrompt]:
        return [AttackPrompt(r) for r in requests]


class LLMChat:
    """A sampling chat function ``f(conversations) -> replies`` over an existing judge backend
    (``http``: :class:`alignkit.judges.http.HTTPJudge`, ``hf``: the model of
    :class:`alignkit.judges.hf.HFJudge`). Attackers and paraphrasers sample (``temperature`` 1 by default,
    as PAIR's attacker does): with greedy decoding, parallel streams given similar conversations would
    collapse into one. The hf backend draws a fresh seed per call (``seed + call index``), so a run is
    reproducible and successive rounds differ. ``calls`` counts calls, ``conversations`` conversations sent."""

    def __init__(self, spec, max_tokens: int, seed: int = 0):
        from alignkit.judges import build_judge

        kw = dict(spec.kwargs)
        self.backend, self.seed, self.calls, self.conversations = spec.backend, seed, 0, 0
        self.temperature = float(kw.pop("temperature", 1.0))
        self.top_p = float(kw.pop("top_p", 1.0)) if spec.backend == "hf" else 1.0  # http: extra_params
        if spec.backend == "http":
            kw.setdefault("max_tokens", max_tokens)
            self.judge = build_judge({"backend": "http", "temperature": self.temperature, **kw})
        elif spec.backend == "hf":
            kw.setdefault("max_new_tokens", max_tokens)
            self.judge = build_judge({"backend": "hf", **kw})
        else:
            raise ValueError(f"backend {spec.backend!r} is not an LLM")

    def __call__(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        self.calls += 1
        self.conversations += len(conversations)
        if self.backend == "http":
            return self.judge.chat(conversations)
        from alignkit.generation.sampling import generate

        j = self.judge
        out = generate(j.model, j.tokenizer, conversations, n=1, greedy=self.temperature == 0,
                       temperature=self.temperature or 1.0, top_p=self.top_p, max_new_tokens=j.max_new_tokens,
                       batch_size=j.batch_size, seed=self.seed + self.calls, progress=False)
        return [r[0] for r in out]


def llm_spec_problems(techniques, where: str) -> list[str]:
    """Typos and missing keys in the LLM specs of ``techniques`` (a paraphraser's or attacker's
    ``kwargs``, checked against its judge backend's constructor without building it). An attack's LLM is
    built when the attack runs — for a ``jailbreak`` eval set, after training — so recipes check here."""
    from alignkit.judges.hybrid import backend_spec_problems

    out = []
    for i, t in enumerate(techniques):
        for role in ("paraphraser", "attacker"):
            spec = getattr(t, role, None)
            if spec is None or spec.backend == "template":
                continue
            kw = {k: v for k, v in spec.kwargs.items() if k not in ("temperature", "top_p")}  # LLMChat's own
            out += [f"field '{path}': {why}" for path, why in
                    backend_spec_problems({"backend": spec.backend, **kw}, f"{where}.{i}.{role}.kwargs")]
    return out


def eval_spec_problems(cfg) -> list[str]:
    """:func:`llm_spec_problems` and the per-set rubric judge (``options.judge``) of every ``task:
    jailbreak`` eval set of a run config."""
    from alignkit.config.attack import validate_task_options
    from alignkit.judges.hybrid import backend_spec_problems

    if not cfg.eval.enabled:
        return []
    out = []
    for name, es in cfg.eval.datasets.items():
        if es.task != "jailbreak":
            continue
        opts = validate_task_options(es.options)
        out += llm_spec_problems(opts.techniques, f"eval.datasets.{name}.options.techniques")
        if opts.judge is not None:
            spec = {k: v for k, v in opts.judge.items() if k != "rubric_template"}
            out += [f"field '{path}': {why}" for path, why in
                    backend_spec_problems(spec, f"eval.datasets.{name}.options.judge")]
    return out


def build_llm(spec, max_tokens: int, seed: int = 0) -> LLMChat:
    """The chat function of an attack's LLM (paraphraser, attacker): :class:`LLMChat`."""
    return LLMChat(spec, max_tokens, seed)
