"""The tiny world's stand-ins for model-driven attack parts: FlipAttack prompts in the world's
wording, a one-stream PAIR over plain callables, and the template attacker (each round the next
persuasion or flip wrapper, in a seeded order). The templates themselves are the world's data
(:mod:`alignkit.world.jailbreak`)."""

from __future__ import annotations

import random
from collections.abc import Callable

from alignkit.world.jailbreak import (
    _FLIP_CODES,
    _FLIP_INSTRUCTIONS,
    _TASK,
    FLIP_MODES,
    PERSUASION_TECHNIQUES,
    TECHNIQUES,
    persuade,
)


def flip(text: str, mode: str) -> str:
    """Apply one FlipAttack transformation (each is its own inverse)."""
    from alignkit.attacks.flip import flip as _flip

    if mode not in _FLIP_CODES:
        raise ValueError(f"unknown flip mode {mode!r}; choose from {FLIP_MODES}")
    return _flip(text, _FLIP_CODES[mode])


unflip = flip  # involutions


def flip_attack(request: str, mode: str = "flip_chars_in_sentence") -> str:
    return _FLIP_INSTRUCTIONS[mode] + _TASK + flip(request, mode) if mode in _FLIP_INSTRUCTIONS \
        else flip(request, mode)


def decode_flip_attack(prompt: str) -> str:
    """Recover the original request from a flip_attack prompt."""
    for mode, instr in _FLIP_INSTRUCTIONS.items():
        if prompt.startswith(instr + _TASK):
            return unflip(prompt[len(instr) + len(_TASK):], mode)
    raise ValueError("not a FlipAttack prompt produced by flip_attack()")


def wrap(request: str, technique: str, rng: random.Random | None = None) -> str:
    """One static attack condition (``pair`` needs a loop: see ``pair_attack``)."""
    rng = rng or random.Random(0)
    if technique == "plain":
        return request
    if technique.startswith("pap_"):
        return persuade(request, technique[4:], rng.randrange(2))
    if technique == "flipattack":
        return flip_attack(request, rng.choice(FLIP_MODES))
    raise ValueError(f"technique {technique!r} is not a static wrapper; choose from {TECHNIQUES[2:]} or 'plain'")


def wrapper_attacker(seed: int = 0) -> Callable[[str, list], str]:
    """A model-free attacker for the tiny world: each round tries the next wrapper
    (persuasion variants, then flips), in a seeded order."""
    rng = random.Random(seed)
    pool = [persuade("{request}", t, v) for t in PERSUASION_TECHNIQUES for v in range(2)]
    pool += [f"__flip__{m}" for m in FLIP_MODES]
    rng.shuffle(pool)

    def attack(request: str, history: list) -> str:  # history: PAIR turns so far (attacks.pair.PairTurn)
        tmpl = pool[len(history) % len(pool)]
        if tmpl.startswith("__flip__"):
            return flip_attack(request, tmpl[len("__flip__"):])
        return tmpl.format(request=request)

    return attack
