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

.PHONY: setup test test-fast demo bench bench-scaling lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing the default torch build"; $(BIN)/pip install -q torch; \
	else \
		echo "no CUDA: installing the CPU torch pin $(TORCH_CPU)"; $(BIN)/pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/pip install -q -e ".[all]"
	@touch $(STAMP)

# The tests' shared tiny world is built (or found in the cache) first, outside pytest's per-test
# timeouts: on a slow 2-core machine its pretraining alone can take longer than a test may.
test: setup
	$(BIN)/alignkit world build --seed 0
	$(BIN)/python -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not distributed" $(PYTEST_ARGS)

demo: setup
	$(BIN)/alignkit demo --seed 0 --seeds 1 2 --jobs 2 --out runs/demo

# alignkit vs TRL (DPO speed, memory, MFU), CRaFT sampling, TA-SFT overhead: < 10 min on 2 CPU cores.
# Writes benchmarks/results/dpo.json.
bench: setup
	$(BIN)/python benchmarks/bench_dpo.py
	$(BIN)/python benchmarks/bench_craft.py
	$(BIN)/python benchmarks/bench_ta_sft.py

# DPO step time and peak memory vs sequence length and batch size (benchmarks/results/scaling.json).
bench-scaling: setup
	$(BIN)/python benchmarks/bench_scaling.py

lint: setup
	$(BIN)/ruff check alignkit tests benchmarks

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
