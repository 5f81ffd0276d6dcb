"""CRaFT selection (Algorithm 1), its baselines, THS and the recipe's config (no model)."""

from __future__ import annotations

import pytest

from alignkit.config import ConfigError
from alignkit.metrics import truthful_helpfulness_score
from alignkit.recipes import load_config
from alignkit.recipes.craft import Method, select

# qid: (mu, sigma, delta_mu) — a hand-built knowledge-state table
TABLE = {0: (1.0, 0.99, 0.0), 1: (0.9, 0.80, 0.0), 2: (0.6, 0.95, -0.1),   # known (mu >= 0.51)
         3: (0.5, 0.50, -0.2),                                                # between 0.49 and 0.51
         4: (0.3, 0.40, -0.1), 5: (0.2, 0.70, -0.2),                        # unknown, correctness falling
         6: (0.1, 0.30, 0.2),                                                 # unknown, becoming known
         7: (0.0, 0.90, 0.0), 8: (0.4, 0.20, 0.0)}                           # unknown, flat


def _table():
    return [{"qid": q, "mu": m, "sigma": s, "delta_mu": d} for q, (m, s, d) in TABLE.items()]


def _split(rows):
    out = {"vanilla": set(), "idk": set(), "dropped": set()}
    for r in rows:
        out[r["bucket"]].add(r["qid"])
    return out


def test_algorithm1_craft_strict_flow():
    rows, rep = select(_table(), Method(n_van=2, n_idk=2, idk_delta_strict=True))
    s = _split(rows)
    assert s["vanilla"] == {0, 2}          # most certain knowns (sigma .99, .95), 1 (.80) cut
    assert s["idk"] == {4, 5}              # mu <= .49 and delta_mu < 0, least certain first
    assert s["dropped"] == {1, 3, 6, 7, 8}
    why = {r["qid"]: r["reason"] for r in rows}
    assert why[1] == "not selected: over n_van"
    assert why[3].startswith("between thresholds")
    assert why[6].startswith("knowledge flow") and why[7].startswith("knowledge flow")  # mu=0 can never fall
    assert rep["buckets"] == {"vanilla": 2, "idk": 2, "dropped": 5}
    assert rep["candidates"] == {"vanilla": 3, "idk": 2}
    assert sum(rep["reasons"].values()) == len(TABLE)


def test_algorithm1_non_strict_flow_takes_flat_items_least_certain_first():
    rows, _ = select(_table(), Method(n_van=2, n_idk=2, idk_delta_strict=False))
    s = _split(rows)
    assert s["idk"] == {8, 4}  # candidates 4 (.40), 5 (.70), 7 (.90), 8 (.20): delta_mu <= 0
    assert 6 in s["dropped"]   # delta_mu > 0 still dropped


def test_corcer_rait_has_no_flow_filter_and_cor_rait_is_random():
    rows, _ = select(_table(), Method(variant="corcer_rait", n_van=2, n_idk=2))
    s = _split(rows)
    assert s["vanilla"] == {0, 2} and s["idk"] == {8, 6}  # 6 is rising, but w/o Flow keeps it
    for seed in range(5):
        rows, rep = select(_table(), Method(variant="cor_rait", n_van=2, n_idk=2, seed_subsample=seed))
        s = _split(rows)
        assert len(s["vanilla"]) == 2 and s["vanilla"] <= {0, 1, 2}
        assert len(s["idk"]) == 2 and s["idk"] <= {4, 5, 6, 7, 8}
        rows, _ = select(_table(), Method(variant="craft_no_certainty", n_van=2, n_idk=1))
        assert _split(rows)["idk"] <= {4, 5}
    picks = {frozenset(_split(select(_table(), Method(variant="cor_rait", n_van=1, n_idk=2, seed_subsample=s))[0])
                       ["idk"]) for s in range(20)}
    assert len(picks) > 1  # random, seeded


def test_van_tuning_takes_random_items_with_answers_kept():
    rows, rep = select(_table(), Method(variant="van", n_van=3, n_idk=1))
    assert rep["buckets"]["vanilla"] == 4 and rep["buckets"]["idk"] == 0


def test_tie_rules_and_shortfall():
    t = [{"qid": i, "mu": 1.0, "sigma": s, "delta_mu": 0.0} for i, s in enumerate([0.9, 0.8, 0.8, 0.8, 0.1])]
    cut, _ = select(t, Method(n_van=2, n_idk=0))
    assert _split(cut)["vanilla"] == {0, 1}  # ties in data order, cut at N
    keep, _ = select(t, Method(n_van=2, n_idk=0, tie_at_cut="keep_all"))
    assert _split(keep)["vanilla"] == {0, 1, 2, 3}  # everything tied with the last one taken
    with pytest.raises(ValueError, match="fewer than n_idk"):
        select(_table(), Method(n_van=1, n_idk=5, bucket_shortfall="raise"))
    rows, rep = select(_table(), Method(n_van=1, n_idk=5, bucket_shortfall="resample_with_replacement"))
    assert rep["buckets"]["idk"] == 5 and rep["shortfall"]["idk"] == 3
    rows, rep = select(_table(), Method(n_van=1, n_idk=5))  # take_all (default)
    assert rep["buckets"]["idk"] == 2 and rep["shortfall"]["idk"] == 3


def test_ths_reproduces_the_papers_table_rows():
    # LLaMA3-8B-Instruct, MMLU CRaFT (craft.md §3, Table 2): 53.3 - 9.6 * 66.8 / 33.1 = 33.9 (reported 34.0)
    assert truthful_helpfulness_score(53.3, 9.6, 66.8, 33.1) == pytest.approx(33.93, abs=0.01)
    # LLaMA2-7B-Chat TriviaQA CRaFT: 38.5 / 12.9 against Init-Basic 54.0 / 46.0 -> 23.3
    assert truthful_helpfulness_score(38.5, 12.9, 54.0, 46.0) == pytest.approx(23.3, abs=0.2)
    assert truthful_helpfulness_score(0.54, 0.46, 0.54, 0.46) == 0.0  # the initial model itself


def test_ths_per_prompt_bootstrap_matches_closed_form():
    from alignkit.metrics.records import metric_ci, paired_difference

    recs = [{"prompt_index": i, "prompt": f"q{i}", "correct": i % 3 == 0, "refusal": i % 3 == 1, "ths_k": 0.8}
            for i in range(30)]
    c = metric_ci("qa", recs, "ths")
    # by hand: P_c = P_w = 10/30, k = P_c0/P_w0 = 0.8 -> THS = 1/3 - 1/3 * 0.8 = 1/15
    assert c["value"] == pytest.approx(1 / 15)
    assert c["lo"] <= c["value"] <= c["hi"]
    base = [dict(r, ths_k=None) for r in recs]  # no reference: its own, THS = 0
    assert metric_ci("qa", base, "ths")["value"] == pytest.approx(0.0)
    assert metric_ci("qa", recs, "p_wrong")["value"] == pytest.approx(1 / 3)
    d = paired_difference("qa", recs, recs, "ths")
    assert d["diff"] == 0.0


def test_shipped_yaml_and_bad_configs():
    cfg = load_config("recipes/craft.yaml")
    m = Method.model_validate(cfg.method)
    assert m.variant == "craft" and m.num_samples == 10 and m.temperature == 1.0
    with pytest.raises(ConfigError, match="tau_idk"):
        load_config("recipes/craft.yaml", ["method.tau_idk=0.9"])
    with pytest.raises(ConfigError, match="variant"):
        load_config("recipes/craft.yaml", ["method.variant=nope"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_config("recipes/craft.yaml", ["method.n_vann=3"])
    ex = load_config("recipes/examples/craft_llama3_8b.yaml")
    em = Method.model_validate(ex.method)
    assert (em.n_van, em.n_idk, em.rehearsal.learning_rate, ex.train.learning_rate) == (8000, 2000, 2e-4, 8e-6)
    assert em.rehearsal.lora is not None and em.rehearsal.lora.r == 64  # the paper's LoRA rehearsal (YAML: why)
