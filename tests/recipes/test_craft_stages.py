"""CRaFT's stages on the tiny world and on crafted rows: Δμ from one local sampler, the paper's
query / rehearsal / RAIT / evaluation prompts, multiple-choice rows and certainty, the initial
eval's key, and THS from its geometric definition (issue 22's CRaFT findings)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.config import ConfigError
from alignkit.recipes import load_config
from alignkit.recipes.craft import Method
from conftest import edited_source

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "recipes" / "craft.yaml"
EXAMPLE = ROOT / "recipes" / "examples" / "craft_llama3_8b.yaml"


def _cfg(tmp_path, *over):
    from alignkit.config.paths import expand_config

    cfg = load_config(YAML, [f"method.stage_dir={tmp_path / 'stages'}", "data.train.limit=40",
                             "method.num_samples=4", *over])
    expand_config(cfg)
    return cfg, Method.model_validate(cfg.method)


def _endpoint_table(cfg, method, path):
    """A query table as an endpoint (other precision, other RNG) would write it: every item's
    μ0 = 0.25 from its own samples; the first three items known (the rehearsal set)."""
    import alignkit.recipes.craft as C

    rows = C._query_rows(cfg, method)
    out = []
    for i, r in enumerate(rows):
        known = i < 3
        samples = [r["answers"][0]] * 4 if known else [r["answers"][0], "x", "y", "z"]
        flags = [True] * 4 if known else [True, False, False, False]
        out.append({**r, "samples": samples, "sample_is_correct": flags, "mu": sum(flags) / 4,
                    "sigma": 1.0, "mu0": sum(flags) / 4, "sigma0": 1.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_unchanged_items_get_zero_delta_mu_when_the_query_came_from_another_sampler(tiny_world_dir, tmp_path,
                                                                                    monkeypatch):
    """μ0 from an endpoint and μ̃ from the local rehearsed model are two samplers: an item the
    rehearsal did not change got a random Δμ. Δμ must compare the local model with itself: with a
    rehearsal that changes nothing, Δμ = 0 on every item, and only the IdK candidates
    (μ0 ≤ τ_idk) are queried again."""
    import alignkit.recipes.craft as C
    import alignkit.stages.knowledge as kn

    cfg, method = _cfg(tmp_path)
    table = _endpoint_table(cfg, method, tmp_path / "query.jsonl")
    monkeypatch.setattr(kn, "brief_finetune", lambda model, tok, rows, **kw: {"steps": 0, "rows": len(rows)})
    out = C.stage_rehearse(cfg, method, tmp_path / "query.jsonl")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    cands = {r["qid"] for r in table if r["mu0"] <= method.tau_idk}
    assert {r["qid"] for r in rows if r.get("delta_mu") is not None} == cands
    assert all(r["delta_mu"] == 0.0 for r in rows if r["qid"] in cands)
    assert json.loads(out.with_suffix(".provenance.json").read_text())["report"]["requeried"] == len(cands)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_delta_mu_is_mu_of_the_rehearsed_minus_mu_of_the_initial_model(tiny_world_dir, tmp_path):
    """Δμ = μ(M̃) − μ(M0) (craft.md §3; the paper's printed formula has a typo), with both μ
    recomputed here: μ(M̃) from the rehearsed samples by the alias rule, μ(M0) by querying the
    initial model afresh on the same questions, same seed."""
    import alignkit.recipes.craft as C
    from alignkit.models import load_for_sampling
    from alignkit.stages.knowledge import is_correct_alias_substring, oe_knowledge_state

    cfg, method = _cfg(tmp_path, "method.rehearsal.learning_rate=1e-3", "method.rehearsal.num_train_epochs=2")
    table = _endpoint_table(cfg, method, tmp_path / "query.jsonl")
    out = C.stage_rehearse(cfg, method, tmp_path / "query.jsonl")
    rows = {r["qid"]: r for r in map(json.loads, out.read_text().splitlines())}
    cands = [r for r in table if r["mu0"] <= method.tau_idk]
    model, tok = load_for_sampling(cfg.model)
    m0 = oe_knowledge_state(model, tok, cands, n=method.num_samples, temperature=method.temperature,
                            max_new_tokens=method.max_new_tokens, batch_size=method.gen_batch_size, seed=cfg.seed,
                            prompt_key="query_prompt")
    changed = 0
    for r, k in zip(cands, m0):
        got = rows[r["qid"]]
        mu_reh = sum(is_correct_alias_substring(s, r["answers"]) for s in got["samples_reh"]) / method.num_samples
        assert got["mu_reh"] == pytest.approx(mu_reh)
        assert got["delta_mu"] == pytest.approx(mu_reh - k["mu"])
        changed += got["samples_reh"] != k["samples"]
    assert changed > 0  # the rehearsal did move the model


def test_query_rehearsal_rait_and_eval_prompts_of_the_papers_setup(tiny_world_dir, tmp_path):
    """The code queries with a 3-shot 'as simple as possible' prompt (earlier chat turns),
    rehearses on the bare question, trains RAIT on the refusal prompt, evaluates the trained
    model on that prompt and the initial model (THS reference, Init-Basic) on the bare one."""
    import alignkit.recipes.craft as C

    ex = load_config(EXAMPLE)
    em = Method.model_validate(ex.method)
    cfg, _ = _cfg(tmp_path)
    # the example's method on the tiny world's rows (its data files are not on this machine)
    cfg.method = {**ex.method, "stage_dir": None}
    method = Method.model_validate(cfg.method)
    r = C._query_rows(cfg, method)[0]
    q = r["question"]
    assert [t["role"] for t in r["query_prompt"]] == ["user", "assistant"] * 3 + ["user"]
    assert r["query_prompt"][-1]["content"] == f"Answer the following question as simple as possible.\nQuestion: {q}\nAnswer:"
    assert r["rehearsal_prompt"] == q
    assert r["prompt"].startswith("Answer the following question, and if you don't know the answer") and \
        r["prompt"].endswith(q)
    reh = C._rehearsal_rows([{**r, "mu0": 1.0, "sigma0": 1.0, "samples": [r["answers"][0]] * 10,
                              "sample_is_correct": [True] * 10}], method)
    assert reh[0]["prompt"] == [{"role": "user", "content": q}]
    # evaluation: trained model on the RAIT prompt, refusal = contains "I don't know"; initial on the bare question
    opts, problems = C.eval_options(ex, em)
    assert not problems and opts and all(o["question_template"] == em.prompt_template for o in opts.values())
    assert all(o["abstain_phrase"] == "I don't know" and o["abstain_match"] == "substring" for o in opts.values())
    ref = C.reference_eval_config(ex, em)
    assert all(e.options["question_template"] == "{question}" for e in ref.datasets.values())
    # the query stage's refusal test is the official code's, the substring "i don't know" only
    # (craft.md §5.7), not a broader refusal-pattern list: anything else is scored as an answer
    from alignkit.stages.knowledge import is_refusal_keyword

    assert em.refusal_keywords == ["i don't know"]
    assert is_refusal_keyword("Well, I don't know.", em.refusal_keywords)
    assert not is_refusal_keyword("I'm not sure, maybe York.", em.refusal_keywords)
    assert not is_refusal_keyword("I do not know.", em.refusal_keywords)  # the recipe default has it; the code not
    # optimiser steps: the paper packs 2048-token sequences, 64 per step -> about a dozen RAIT steps
    t = ex.train
    rows_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * 4  # 4 GPUs, as the paper
    steps = math.ceil((em.n_van + em.n_idk) * t.num_train_epochs / rows_per_step)
    assert ex.data.padding_free and 8 <= steps <= 20, steps
    h = em.rehearsal
    assert math.ceil(h.size / (h.batch_size * h.gradient_accumulation_steps)) * h.num_train_epochs <= 6


def test_eval_options_that_disagree_with_the_training_prompt_are_rejected():
    with pytest.raises(ConfigError, match="question_template.*differs from method.prompt_template"):
        load_config(YAML, ["method.prompt_template=Answer briefly. {question}",
                           "eval.datasets.qa_test.options={question_template: '{question}'}"])
    with pytest.raises(ConfigError, match="query_template"):
        load_config(YAML, ["method.query_template=no field"])


# ---------------------------------------------------------------- multiple choice


class _FixedLogits(torch.nn.Module):
    """A model whose next-token logits are given per call (batch size 1)."""

    def __init__(self, rows):
        super().__init__()
        self.rows = list(rows)
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kw):
        from types import SimpleNamespace

        v = self.rows.pop(0)
        return SimpleNamespace(logits=v.reshape(1, 1, -1).expand(input_ids.shape[0], input_ids.shape[1], -1))


def test_mc_certainty_ranks_a_confident_item_above_one_the_letters_barely_cover(tiny_random_model_dir):
    """After a chat prompt the letters may take 5% of the mass. With the code's raw entropy such
    an item ranks MORE certain than one answered 90% 'A' — the default must not."""
    from transformers import AutoTokenizer

    from alignkit.stages.knowledge import mc_knowledge_state, mc_letter_ids

    tok = AutoTokenizer.from_pretrained(tiny_random_model_dir)
    ids = mc_letter_ids(tok, 4)
    V = len(tok)

    def logits(letter_probs, other_mass):
        p = torch.full((V,), other_mass / (V - 4))
        p[ids] = torch.tensor(letter_probs)
        return p.log()

    low = logits([0.0125] * 4, 0.95)                   # letters: 5% of the mass, spread evenly
    sure = logits([0.9, 1 / 30, 1 / 30, 1 / 30], 0.0)  # letters: all the mass, 90% on A
    items = [{"options": list("wxyz"), "target": "A", "q": "Q1?"}, {"options": list("wxyz"), "target": "A", "q": "Q2?"}]
    m = Method(task="mcqa")
    out = mc_knowledge_state(_FixedLogits([low, sure]), tok, items, batch_size=1, prompt_key="q",
                             certainty_probs=m.mcqa_certainty_probs, prompt_format=m.mcqa_prompt_format)
    assert out[1]["sigma"] > out[0]["sigma"]  # the confident item is the more certain one
    assert out[0]["letter_mass"] == pytest.approx(0.05, rel=1e-3) and out[1]["letter_mass"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="completion"):
        Method(task="mcqa", mcqa_certainty_probs="raw")  # raw only after the code's completion prompt
    Method(task="mcqa", mcqa_certainty_probs="raw", mcqa_prompt_format="completion")


def test_mmlu_rows_are_multiple_choice_items(tiny_world_dir, tmp_path):
    """MMLU's rows ({question, A, B, C, D, target}) are the paper's MCQA data; they must load as
    items (not be rejected as QA rows without answers), and a bad row must name file, row, field."""
    import alignkit.recipes.craft as C
    from alignkit.data import DataError

    f = tmp_path / "mmlu.jsonl"
    rows = [{"id": i, "subject": "astronomy", "question": f"Which planet is number {i}?", "A": "Mercury",
             "B": "Venus", "C": "Earth", "D": "Mars", "target": "ABCD"[i % 4]} for i in range(6)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, method = _cfg(tmp_path, "method.task=mcqa", f"data.train.path={f}", "data.train.limit=null")
    items = C._query_rows(cfg, method)
    assert [it["target"] for it in items] == ["A", "B", "C", "D", "A", "B"]
    assert items[2]["options"] == ["Mercury", "Venus", "Earth", "Mars"] and items[2]["answers"] == ["Earth"]
    assert "C. Earth" in items[2]["query_prompt"] and items[2]["subject"] == "astronomy"
    bad = [dict(rows[0]), {**rows[1], "target": "E"}, {k: v for k, v in rows[2].items() if k != "C"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(DataError) as e:
        C._query_rows(cfg, method)
    msg = str(e.value)
    assert str(f) in msg and "row 2" in msg and "target" in msg and "row 3" in msg and "'C'" in msg


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_mcqa_query_on_the_tiny_world_reports_letter_mass(tiny_world_dir, tmp_path):
    import alignkit.recipes.craft as C

    cfg, method = _cfg(tmp_path, "method.task=mcqa", "data.train.limit=16")
    out = C.stage_query(cfg, method)
    table = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(table) == 16 and all(0 < r["letter_mass"] <= 1 + 1e-6 and 0 <= r["mu0"] <= 1 for r in table)
    rep = json.loads(out.with_suffix(".provenance.json").read_text())["report"]
    assert rep["letter_mass_median"] == pytest.approx(float(np.median([r["letter_mass"] for r in table])))


# ---------------------------------------------------------------- the initial eval: key and THS


def test_initial_eval_key_covers_the_judge_code(tiny_world_dir, tmp_path, monkeypatch):
    """The initial model's eval records give THS's (P_c0, P_w0): a changed judge (a refusal
    pattern, a matching rule) must not reuse them."""
    import alignkit.judges.kb as kb
    import alignkit.judges.rules as rules
    import alignkit.recipes.craft as C
    import alignkit.stages.runner as runner

    keys = []

    def fake(name, key, fn, stage_dir=None):
        keys.append(json.dumps(key, sort_keys=True, default=str))
        return tmp_path / "x.jsonl"

    monkeypatch.setattr(runner, "run_stage", fake)
    cfg, method = _cfg(tmp_path)
    C.stage_initial_eval(cfg, method)
    for mod in (kb, rules):
        with edited_source(mod):
            C.stage_initial_eval(cfg, method)
    C.stage_initial_eval(cfg, method)
    assert keys[1] != keys[0] and keys[2] != keys[0] and keys[3] == keys[0]


def _cross(a, b):
    return a[0] * b[1] - a[1] * b[0]


@pytest.mark.parametrize("row,init,reported", [
    ((53.3, 9.6), (66.8, 33.1), 34.0),    # LLaMA3-8B MMLU CRaFT (the code groups MMLU by subject: ±0.1)
    ((38.5, 12.9), (54.0, 46.0), 23.3),   # LLaMA2-7B TriviaQA CRaFT
    ((43.5, 10.9), (66.8, 33.2), 21.5),   # LLaMA3-8B TriviaQA CRaFT
    ((15.8, 22.4), (29.3, 70.7), 6.5),    # LLaMA2-7B NQ (OOD) CRaFT
])
def test_ths_is_the_papers_cross_product_ratio(row, init, reported):
    """THS = (OE2 × OE1) / (OA × OE1) with A = (1, 0) (craft.md §3), computed here as 2-D cross
    products — not the closed form the code uses — against Table 2 of the paper."""
    from alignkit.metrics import truthful_helpfulness_score

    e1, e2, a = (init[0], init[1]), (row[0], row[1]), (100.0, 0.0)
    geometric = 100.0 * _cross(e2, e1) / _cross(a, e1)
    assert geometric == pytest.approx(reported, abs=0.15)
    assert truthful_helpfulness_score(*row, *init) == pytest.approx(geometric, rel=1e-12)
    assert truthful_helpfulness_score(*init, *init) == 0.0
