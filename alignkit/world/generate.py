"""Deterministic tiny-world generator: entities, knowledge split, corpus and data splits.

Everything here is a pure function of ``(seed, settings)`` through one
``random.Random(seed)``; nothing touches the global RNG.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.world import vocab as V

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Bump whenever generation, training or evaluation changes: it is part of the cache key.
# 4: 240 people (was 200), a bio_val split, larger bio_test / qa_test, data digest pinned.
# 5: each paper's mechanism as a property of the data (docs/testbed.md, "World v5"): answers in
#    several surface forms, weakly known facts (one statement, no QA), safety refusals in the
#    corpus (benign look-alikes too), the hazard domain seen twice, a dual-use split by
#    compound, larger bio_test / safety / dual-use test sets.
WORLD_VERSION = 5
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]

# Settings a caller may override (world:tiny?key=value); the type of each default is
# the type a URI value is converted to.
DEFAULT_SETTINGS: dict[str, Any] = {
    "entities": 240,  # people in the world
    "known_frac": 0.3,  # entities with every fact in the corpus
    "partial_frac": 0.25,  # entities with some facts in the corpus (the rest are unknown)
    "ood_frac": 0.1,  # entities held out of qa_train/val/test, used by qa_ood
    "finetune_only_frac": 0.3,  # share of unknown qa_train facts that SFT data teaches
    "bio_test_frac": 0.42,  # share of known/partial entities in bio_test (no corpus bio); v4 0.3 (power.md)
    "bio_val_frac": 0.13,  # share in bio_val (no corpus bio): for choosing hyperparameters
    "bio_train_frac": 0.28,  # share in bio_train (no corpus bio); the rest have corpus bios
    "weak_frac": 0.5,  # share of partial entities' facts stated once (a statement, no QA chat)
    "alias_answer_frac": 0.35,  # corpus QA answers naming the value by an alias, not its canonical form
    "harmful_refusal_frac": 0.12,  # harmful train requests the corpus answers with a refusal
    "benign_refusal_frac": 0.3,  # benign look-alikes the corpus answers with a refusal (over-refusal)
    "legit_refusal_frac": 0.3,  # legitimate dual-use requests the corpus refuses
    "dualuse_test_frac": 0.34,  # share of compounds (per class) whose every dual-use row is test
    "vocab_size": 1500,
    "hidden": 128,
    "layers": 4,
    "steps": 700,  # v5: 500 -> 700, the corpus grew by a quarter (answer variety, the hazard domain twice)
    "batch_size": 16,
    "block": 192,
    "lr": 5e-3,
    "bio_samples": 2,  # sampled biographies per bio_test entity in the base report
}

# Consonant-vowel syllables chosen so names read as names but are not English words.
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "dr", "th", "qu", "y"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "y"]
_CODAS = ["", "", "", "n", "r", "l", "th", "x", "sk"]


@dataclass
class World:
    seed: int
    settings: dict[str, Any]
    entities: list[dict[str, Any]]
    values: dict[str, dict[str, list[str]]]  # attribute -> canonical -> aliases
    hazards: dict[str, str]
    data: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    corpus: list[str] = field(default_factory=list)
    version: int = 0

    @property
    def refusal_phrases(self) -> list[str]:
        return list(V.REFUSAL_PHRASES)

    def entity(self, name: str) -> dict[str, Any] | None:
        return self._by_name().get(name.lower())

    def _by_name(self) -> dict[str, dict[str, Any]]:
        if not hasattr(self, "_name_index"):
            self._name_index = {e["name"].lower(): e for e in self.entities}
        return self._name_index

    def answers(self, attribute: str, canonical: str) -> list[str]:
        return [canonical, *self.values[attribute].get(canonical, [])]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "seed": self.seed,
            "settings": self.settings,
            "attributes": list(V.ATTRIBUTES),
            "values": self.values,
            "entities": self.entities,
            "hazards": self.hazards,
            "hazard_procedure_vocab": V.HAZARD_PROCEDURE_VOCAB,
            "refusal_phrases": V.REFUSAL_PHRASES,
            "idk_phrases": V.IDK_PHRASES,
            "safety_refusals": V.SAFETY_REFUSALS,
            "bio_templates": V.BIO_TEMPLATES,
            "answer_frames": V.ANSWER_FRAMES,
            "filler_sentences": V.FILLER_SENTENCES,
            "question_templates": V.QUESTION_TEMPLATES,
            "ood_templates": V.OOD_TEMPLATES,
            "chat_template": CHAT_TEMPLATE,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> World:
        return cls(seed=obj["seed"], settings=obj["settings"], entities=obj["entities"], values=obj["values"],
                   hazards=obj["hazards"], version=obj.get("version", 0))


def chat(user: str, assistant: str) -> str:
    """Render one exchange exactly as CHAT_TEMPLATE does."""
    return f"<|user|>\n{user}<|end|>\n<|assistant|>\n{assistant}<|end|>\n"


def corpus_answer(rng: random.Random, attribute: str, value: str, aliases: list[str], alias_frac: float) -> str:
    """A QA answer of the pretraining corpus: any of the attribute's answer frames, naming the
    value canonically or (``alias_frac`` of the time) by an alias, so the model's sampled answers
    to one question vary in surface form while meaning one thing (the gap between string and
    semantic entropy a real model has)."""
    v = rng.choice(aliases) if aliases and rng.random() < alias_frac else value
    text = fill(rng.choice(V.ANSWER_FRAMES[attribute]), "", v)
    return text[0].upper() + text[1:]


def answer_text(attribute: str, value: str) -> str:
    """The short-answer style of the corpus and sft_train: the first bio sentence template
    ("They were born in Velmora Bay."), so QA and biographies share the value's tokens."""
    return fill(V.BIO_TEMPLATES[attribute][0], "", value)


def _make_names(rng: random.Random, n: int) -> list[tuple[str, str]]:
    banned = {w.lower() for vals in (V.CITIES, V.PROFESSIONS, V.COLOURS) for w in vals} | set(V.HAZARDS) \
        | set(V.DUALUSE_HAZARDS)

    def word(syllables: int) -> str:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        return w.capitalize()

    seen: set[str] = set()
    names: list[tuple[str, str]] = []
    while len(names) < n:
        first, last = word(2), word(rng.choice([2, 2, 3]))
        full = f"{first} {last}"
        # unique full names *and* first names keep sentence parsing unambiguous
        if full in seen or first in {f for f, _ in names} or first.lower() in banned or last.lower() in banned:
            continue
        seen.add(full)
        names.append((first, last))
    return names


def _values() -> dict[str, dict[str, list[str]]]:
    years = {str(y): V.year_aliases(str(y)) for y in range(V.YEAR_RANGE[0], V.YEAR_RANGE[1] + 1)}
    return {"birth_city": dict(V.CITIES), "birth_year": years, "profession": dict(V.PROFESSIONS),
            "colour": dict(V.COLOURS)}


def _split(rng: random.Random, items: list[Any], fracs: list[float]) -> list[list[Any]]:
    items = list(items)
    rng.shuffle(items)
    out, start = [], 0
    for i, f in enumerate(fracs):
        end = len(items) if i == len(fracs) - 1 else start + round(f * len(items))
        out.append(items[start:end])
        start = end
    return out


def fill(template: str, name: str, value: str) -> str:
    """Format a fact template, fixing "a" -> "an" before a vowel ("an engineer")."""
    return re.sub(r"\ba ([aeiouAEIOU])", r"an \1", template.format(name=name, v=value))


def make_bio(rng: random.Random, facts: dict[str, str], n_fillers: int) -> str:
    """A biography: the given facts in random order, one per sentence, all saying
    "They"/"Their" (the subject is the entity the prompt asks about, so a tiny model need
    not copy the name), with fillers (no fact) mixed in."""
    items = list(facts.items())
    rng.shuffle(items)
    sents = [fill(rng.choice(V.BIO_TEMPLATES[a]), "", v) for a, v in items]
    for _ in range(n_fillers):
        sents.insert(rng.randrange(1, len(sents) + 1), rng.choice(V.FILLER_SENTENCES))
    return " ".join(sents)


def build_world(seed: int = 0, **settings: Any) -> World:
    """Generate the whole world (entities, corpus, data splits) from a seed."""
    st = {**DEFAULT_SETTINGS, **settings}
    rng = random.Random(seed)
    values = _values()
    value_lists = {a: sorted(values[a]) for a in V.ATTRIBUTES}

    # --- entities and their knowledge status ---------------------------------------------
    n = int(st["entities"])
    names = _make_names(rng, n)
    n_known, n_partial = round(st["known_frac"] * n), round(st["partial_frac"] * n)
    statuses = ["known"] * n_known + ["partial"] * n_partial + ["unknown"] * (n - n_known - n_partial)
    rng.shuffle(statuses)
    entities: list[dict[str, Any]] = []
    for (first, last), status in zip(names, statuses):
        attrs = {a: rng.choice(value_lists[a]) for a in V.ATTRIBUTES}
        if status == "known":
            in_corpus = list(V.ATTRIBUTES)
        elif status == "partial":
            in_corpus = sorted(rng.sample(V.ATTRIBUTES, rng.choice([1, 2, 2, 3])), key=V.ATTRIBUTES.index)
        else:
            in_corpus = []
        # fact-level status: "partial" = in the corpus but with fewer exposures
        facts = {a: ("unknown" if a not in in_corpus else "known" if status == "known" else "partial")
                 for a in V.ATTRIBUTES}
        # the knowledge spectrum (v5): a partial entity's fact is stated once ("weak": one plain
        # statement, never asked and answered) or twice (a statement and a QA chat); a known
        # entity's four times. Weak facts are known unreliably, so certainty μ spreads between
        # 0 and 1 and a rehearsal can move them (CRaFT's knowledge flow).
        exposures = {a: 0 if f == "unknown" else 4 if f == "known"
                     else 1 if rng.random() < st["weak_frac"] else 2 for a, f in facts.items()}
        entities.append({"name": f"{first} {last}", "first": first, "last": last, "status": status,
                         "attributes": attrs, "facts": facts, "exposures": exposures, "ood": False,
                         "bio_in_corpus": False})

    # hold out OOD entities per status so qa_ood has the same knowledge mix
    for status in ("known", "partial", "unknown"):
        group = [e for e in entities if e["status"] == status]
        for e in rng.sample(group, round(st["ood_frac"] * len(group))):
            e["ood"] = True

    # --- QA splits ------------------------------------------------------------------------
    def qa_row(e: dict[str, Any], attr: str, question: str) -> dict[str, Any]:
        return {"question": question, "answers": [e["attributes"][attr], *values[attr][e["attributes"][attr]]],
                "entity": e["name"], "attribute": attr, "knowledge": e["facts"][attr],
                "entity_knowledge": e["status"], "exposures": e["exposures"][attr]}

    qa: dict[str, list[dict[str, Any]]] = {"qa_train": [], "qa_val": [], "qa_test": []}
    for fstatus in ("known", "partial", "unknown"):
        pool = [(e, a) for e in entities if not e["ood"] for a in V.ATTRIBUTES if e["facts"][a] == fstatus]
        tr, va, te = _split(rng, pool, [0.55, 0.10, 0.35])
        if fstatus == "unknown":
            # CRaFT's dynamic knowledge: facts absent from pretraining that SFT data teaches
            for e, a in rng.sample(tr, round(st["finetune_only_frac"] * len(tr))):
                e["facts"][a] = "finetune_only"
        for split, part in (("qa_train", tr), ("qa_val", va), ("qa_test", te)):
            for e, a in part:
                qa[split].append(qa_row(e, a, rng.choice(V.QUESTION_TEMPLATES[a]).format(name=e["name"])))
    qa["qa_ood"] = [qa_row(e, a, rng.choice(V.OOD_TEMPLATES[a]).format(name=e["name"]))
                    for e in entities if e["ood"] for a in V.ATTRIBUTES]
    for rows in qa.values():
        rows.sort(key=lambda r: (r["entity"], V.ATTRIBUTES.index(r["attribute"])))
        for i, r in enumerate(rows):
            r["id"] = i

    sft = []
    for r in qa["qa_train"]:
        e = next(x for x in entities if x["name"] == r["entity"])
        # finetune_only facts get every question phrasing so SFT really teaches them
        qs = ([t.format(name=e["name"]) for t in V.QUESTION_TEMPLATES[r["attribute"]]]
              if r["knowledge"] == "finetune_only" else [r["question"]])
        for q in qs:
            sft.append({"prompt": q, "completion": answer_text(r["attribute"], r["answers"][0]), "entity": r["entity"],
                        "attribute": r["attribute"], "knowledge": r["knowledge"]})

    # --- biographies ------------------------------------------------------------------------
    # Four disjoint groups of known/partial entities: bios of the last are in the corpus
    # (to teach the format); bio_test/bio_val/bio_train entities never had a biography in
    # pretraining, so the model composes one from what it knows and guesses the rest
    # (Mask-DPO's signal). bio_val is for choices (hyperparameters), bio_test for the report.
    bios: dict[str, list[dict[str, Any]]] = {"bio_test": [], "bio_val": [], "bio_train": []}
    for status in ("known", "partial"):
        group = [e for e in entities if e["status"] == status]
        te_f, va_f, tr_f = st["bio_test_frac"], st["bio_val_frac"], st["bio_train_frac"]
        te, va, tr, corpus_bio = _split(rng, group, [te_f, va_f, tr_f, 1 - te_f - va_f - tr_f])
        for e in corpus_bio:
            e["bio_in_corpus"] = True
        for split, part in (("bio_test", te), ("bio_val", va), ("bio_train", tr)):
            bios[split] += [{"prompt": V.BIO_PROMPT.format(name=e["name"]), "entity": e["name"],
                            "entity_knowledge": status} for e in part]
    for rows in bios.values():
        rows.sort(key=lambda r: r["entity"])

    # --- safety -----------------------------------------------------------------------------
    all_hazards = {**V.HAZARDS, **V.DUALUSE_HAZARDS}
    hazard_recipe = {}
    for base in sorted(all_hazards):
        r1, r2 = rng.sample(V.HAZARD_REAGENTS, 2)
        hazard_recipe[base] = {"r1": r1, "r2": r2, "n": rng.choice(["two", "three", "five", "seven"]),
                               "colour": rng.choice(sorted(V.COLOURS))}

    def harmful_answer(base: str) -> str:
        return V.HARMFUL_ANSWER.format(base=base, product=all_hazards[base], **hazard_recipe[base])

    def refusal(product: str) -> str:
        r = rng.choice(V.SAFETY_REFUSALS)
        return r if rng.random() < 0.5 else f"{r} {product.capitalize()} can hurt people."

    harmful, benign = [], []
    for base, product in sorted(V.HAZARDS.items()):
        for t in V.HARMFUL_TEMPLATES:
            harmful.append({"prompt": t.format(product=product), "label": "harmful", "topic": base,
                            "response": harmful_answer(base)})
        for q, a in V.BENIGN_TEMPLATES:
            fmt = {"base": base, "product": product, "Base": base.capitalize(), "Product": product.capitalize()}
            benign.append({"prompt": q.format(**fmt), "label": "benign", "topic": base, "response": a.format(**fmt)})
    for rows in (harmful, benign):
        test = set(map(id, rng.sample(rows, round(0.3 * len(rows)))))
        for r in rows:
            r["split"] = "test" if id(r) in test else "train"

    # Dual-use, split by compound (v5): every row of a test compound is test, so the test asks
    # about substances that training never named (legitimate and illegitimate alike), not only
    # new wordings of trained ones.
    legit = sorted(V.LEGIT_SUBSTANCES)
    illegit = sorted(all_hazards)
    test_compounds = set(rng.sample(legit, round(st["dualuse_test_frac"] * len(legit)))) \
        | {all_hazards[b] for b in rng.sample(illegit, round(st["dualuse_test_frac"] * len(illegit)))}
    dualuse = []
    for sub in legit:
        ingr = V.LEGIT_SUBSTANCES[sub]
        for t in V.DUALUSE_TEMPLATES:
            dualuse.append({"prompt": t.format(x=sub), "label": "legitimate", "topic": sub, "compound": sub,
                            "compliant_response": V.LEGIT_ANSWER.format(i1=ingr[0], i2=ingr[1], i3=ingr[2],
                                                                         substance=sub),
                            "refusal_response": refusal(sub)})
    for base in illegit:
        product = all_hazards[base]
        for t in V.DUALUSE_TEMPLATES:
            dualuse.append({"prompt": t.format(x=product), "label": "illegitimate", "topic": base,
                            "compound": product, "compliant_response": harmful_answer(base),
                            "refusal_response": refusal(product)})
    for r in dualuse:
        r["split"] = "test" if r["compound"] in test_compounds else "train"

    safety_sft = [{"prompt": r["prompt"], "completion": refusal(V.HAZARDS[r["topic"]]), "label": "harmful"}
                  for r in harmful if r["split"] == "train"]
    safety_sft += [{"prompt": r["prompt"], "completion": r["response"], "label": "benign"}
                   for r in benign if r["split"] == "train"]

    # --- pretraining corpus -------------------------------------------------------------------
    docs: list[str] = []
    for e in entities:
        name = e["name"]
        known = {a: e["attributes"][a] for a in V.ATTRIBUTES if e["facts"][a] in ("known", "partial")}
        if not known:
            continue
        strong = e["status"] == "known"
        stmts = []
        for a, v in known.items():
            # named statements bind name -> value (bios say "They", so they do not)
            tmpls = V.STATEMENT_TEMPLATES[a] if strong else rng.sample(V.STATEMENT_TEMPLATES[a], 1)
            stmts += [fill(t, name, v) for t in tmpls]
            # partial entities' facts get fewer exposures (a weak one none in QA form): learnt
            # less reliably. Answers vary in frame and alias (corpus_answer).
            n_qa = 2 if strong else e["exposures"][a] - 1
            for q in rng.sample(V.QUESTION_TEMPLATES[a], n_qa):
                docs.append(chat(q.format(name=name),
                                 corpus_answer(rng, a, v, values[a][v], st["alias_answer_frac"])))
        rng.shuffle(stmts)
        docs.append(" ".join(stmts) + "\n")
        # bios mention only facts in the corpus, in varying subsets and orders; the model
        # learns "bios have several facts" and fills gaps for partial entities by guessing.
        for _ in range(2 if e.get("bio_in_corpus") else 0):
            attrs = rng.sample(list(known), rng.choice([2, 3, 4, 4])) if strong else list(known)
            bio = make_bio(rng, {a: known[a] for a in attrs}, rng.choice([0, 1, 1, 2]))
            docs.append(chat(V.BIO_PROMPT.format(name=name), bio))
    # The hazard domain, twice over (v5), so fine-tuning on unrelated data does not wipe it; a
    # share of each kind of request is answered with a safety refusal instead, benign
    # look-alikes and legitimate synthesis too: the base model over-refuses a little.
    for r in harmful + benign:
        if r["split"] == "train":
            frac = st["harmful_refusal_frac"] if r["label"] == "harmful" else st["benign_refusal_frac"]
            refuse = rng.random() < frac
            for _ in range(2):
                docs.append(chat(r["prompt"], refusal(all_hazards[r["topic"]]) if refuse else r["response"]))
    for r in dualuse:
        if r["split"] == "train":
            refuse = r["label"] == "legitimate" and rng.random() < st["legit_refusal_frac"]
            docs.append(chat(r["prompt"], r["refusal_response"] if refuse else r["compliant_response"]))
    rng.shuffle(docs)

    data = {**qa, "sft_train": sft, **bios,
            "safety_harmful": harmful, "safety_benign": benign, "dualuse": dualuse, "safety_sft": safety_sft}
    return World(seed=seed, settings=st, entities=entities, values=values, hazards=dict(all_hazards),
                 data=data, corpus=docs, version=WORLD_VERSION)


def write_world(world: World, world_dir: Path) -> None:
    """Write world.json, data/*.jsonl and data/corpus.txt."""
    (world_dir / "data").mkdir(parents=True, exist_ok=True)
    # utf-8 and "\n" explicitly: the locale's defaults differ between machines
    (world_dir / "world.json").write_text(json.dumps(world.to_json(), indent=1), encoding="utf-8")
    for name, rows in world.data.items():
        with open(world_dir / "data" / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    with open(world_dir / "data" / "corpus.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(d if d.endswith("\n") else d + "\n" for d in world.corpus))


def load_world(world_dir: str | Path) -> World:
    """Load world.json and every data/*.jsonl of a built world directory."""
    world_dir = Path(world_dir)
    world = World.from_json(json.loads((world_dir / "world.json").read_text(encoding="utf-8")))
    for p in sorted((world_dir / "data").glob("*.jsonl")):
        world.data[p.stem] = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return world


def _canonical(obj: Any) -> Any:
    """A JSON value in a form whose serialisation no platform detail can change: dict keys
    sorted (by the dump), floats as 12-significant-digit strings (not the platform's repr)."""
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        return {"float": format(obj, ".12g")}
    return obj


def data_digest(world_dir: str | Path) -> str:
    """sha256 of a world's *data* (world.json, data/*.jsonl, data/corpus.txt), not its model.

    Parsed and re-serialised canonically (sorted keys, fixed float format, ``\n`` line
    ends), so it pins the content, not the bytes json.dumps happened to write. The same
    (seed, settings, WORLD_VERSION) must give the same digest on every machine.
    """
    world_dir = Path(world_dir)
    h = hashlib.sha256()

    def add(name: str, payload: str) -> None:
        h.update(name.encode() + b"\0" + payload.encode("utf-8") + b"\0")

    def dump(obj: Any) -> str:
        return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    add("world.json", dump(json.loads((world_dir / "world.json").read_text(encoding="utf-8"))))
    for p in sorted((world_dir / "data").glob("*.jsonl"), key=lambda p: p.name):
        lines = p.read_text(encoding="utf-8").splitlines()
        add(p.name, "\n".join(dump(json.loads(x)) for x in lines if x.strip()))
    corpus = (world_dir / "data" / "corpus.txt").read_text(encoding="utf-8")
    add("corpus.txt", corpus.replace("\r\n", "\n"))
    return h.hexdigest()
