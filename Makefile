# retro: the two commands of the README are `make demo` and `make test`; both install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/tiny.toml
DATA_DIR ?= ../shared/data

.PHONY: install test test-fast demo reproduce lint bench bench-db bench-train bench-generate bench-gpu bench-scale clean

install: $(VENV)/.installed

# torch first, pinned: an unpinned torch (or a package that depends on it, installed before it) pulls a
# multi-GB CUDA build onto a CPU machine.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The whole chain on the embedded default (no download, no GPU, < 10 minutes on 2 cores), ending with what this
# scale shows (recipes/tiny.toml, reproduce.showcase): db query answers with their sources, a fact added with
# db add and removed again, Retro's perplexity with and without retrieval against its GPT (+- standard error).
demo: install
	$(BIN)/retro reproduce -c recipes/tiny.toml

# Any recipe end to end, each finished stage skipped: make reproduce RECIPE=recipes/sft-cpu.toml DATA_DIR=...
reproduce: install
	DATA_DIR=$(abspath $(DATA_DIR)) $(BIN)/retro reproduce -c $(RECIPE)

lint: install
	$(BIN)/ruff check retrocli tests benchmarks

bench: bench-db bench-train bench-generate bench-scale

bench-db: install
	$(BIN)/python benchmarks/bench_db.py --data-dir $(DATA_DIR)

# The peer, lucidrains' retro-pytorch, in its own venv (torch first, pinned; pyarrow<26 or it fails to import).
PEER ?= .venv-peer
$(PEER)/.installed:
	$(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install -q torch==2.13.0
	$(PEER)/bin/pip install -q retro-pytorch 'pyarrow<26'
	touch $@

bench-train: install $(PEER)/.installed
	$(BIN)/python benchmarks/bench_train.py --peer-python $(PEER)/bin/python

# KV-cached decoding against recomputing the sequence for every token, same model and prompts.
bench-generate: install
	$(BIN)/python benchmarks/bench_generate.py

# The one prepared script for a lent GPU (docs/benchmarks.md says how to run it there): results.json and
# summary.md in $$OUT or ./bench-gpu-out. No install step: the GPU machine's python3 already holds a CUDA torch
# (and cannot reach a registry); here it uses the venv. `python benchmarks/bench_gpu.py --tiny` checks it on a CPU.
BENCH_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
bench-gpu:
	$(BENCH_PYTHON) benchmarks/bench_gpu.py

# 10M synthetic chunk embeddings added and searched at 1M, 3M, 10M in < 4 GiB: ~11 minutes on 2 cores.
bench-scale: install
	$(BIN)/python benchmarks/bench_scale.py

clean:
	rm -rf runs
