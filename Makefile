# qwen3asr_train — `make help` lists the targets.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
COMPAT_VENV ?= .venv-compat
COMPAT_STAMP := $(COMPAT_VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export OMP_NUM_THREADS ?= 1

.PHONY: help install sysdeps test test-slow test-all test-gpu test-compat compat-venv lint format demo clean clean-exp \
	bench memory gpu-check

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-11s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) sysdeps ## create .venv and install the package with its pinned dependencies

sysdeps: ## install espeak-ng (synthetic speech for the demo and aligner corpus) if missing
	@if ! ldconfig -p 2>/dev/null | grep -q libespeak-ng.so.1; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing espeak-ng"; \
	    ( $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq >/dev/null && \
	      $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq espeak-ng libespeak-ng1 >/dev/null ) || \
	      echo "warning: could not install espeak-ng; synthetic-speech tests will skip and make demo will fail"; \
	  else echo "espeak-ng not found and no apt-get: install espeak-ng yourself (needed by make demo)"; fi; \
	fi

test: install ## fast offline CPU tests: unmarked tests only (the CI command; ~3 min on 2 cores)
	$(PY) -m pytest -q -m "not slow and not gpu and not integration and not compat"

test-slow: install ## longer CPU checks: learning tests, multi-process runs, CLI subprocesses, wheel builds (CI runs them)
	$(PY) -m pytest -q -m "slow and not gpu and not compat"

test-all: install ## every CPU test but the compat suite (fast + slow tiers)
	$(PY) -m pytest -q -m "not gpu and not integration and not compat"

$(COMPAT_STAMP): tests/compat/requirements.txt
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install -q -r tests/compat/requirements.txt
	touch $(COMPAT_STAMP)

compat-venv: $(COMPAT_STAMP) ## the upstream package (qwen-asr 0.0.6, transformers 4.57.6) in its own venv

test-compat: install compat-venv ## both directions against upstream qwen-asr in its own venv (vLLM names too)
	QWEN3ASR_COMPAT_PYTHON=$(abspath $(COMPAT_VENV))/bin/python $(PY) -m pytest -q -m compat tests/test_compat.py tests/test_streaming.py

test-gpu: install ## CUDA tests (they skip cleanly without a GPU)
	$(PY) -m pytest -q -rs -m gpu

OFFICIAL_STAMP := $(COMPAT_VENV)/.official-installed
$(OFFICIAL_STAMP): benchmarks/requirements-official.txt $(COMPAT_STAMP)
	$(COMPAT_VENV)/bin/python -m pip install -q -r benchmarks/requirements-official.txt
	touch $(OFFICIAL_STAMP)

bench: install $(OFFICIAL_STAMP) ## official SFT recipe (unmodified, compat venv) vs our default SFT path, same weights+data; BENCH_ARGS=...
	$(PY) -m benchmarks.bench_sft $(BENCH_ARGS)

memory: install ## memory per GPU for 0.6B/1.7B x 1 GPU/DDP/FSDP/ZeRO-2/3 from measured activations; MEMORY_ARGS=...
	$(PY) -m benchmarks.memory $(MEMORY_ARGS)

gpu-check: install ## on a CUDA machine (<10 min): GPU tests + 0.6B/1.7B throughput/MFU/memory -> $OUT or gpu_check_out/
	$(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

lint: install ## ruff lint + format check
	$(VENV)/bin/ruff check qwen3asr_train tests data_tools benchmarks --extend-exclude benchmarks/upstream
	$(VENV)/bin/ruff format --check qwen3asr_train tests data_tools benchmarks --extend-exclude benchmarks/upstream

format: install ## apply ruff formatting
	$(VENV)/bin/ruff format qwen3asr_train tests data_tools benchmarks --extend-exclude benchmarks/upstream
	$(VENV)/bin/ruff check --fix qwen3asr_train tests data_tools benchmarks --extend-exclude benchmarks/upstream

demo: install ## offline demo: synthetic speech -> small model (~1.0M params) SFT -> held-out WER/CER (seen and unseen voices) before/after -> export
	bash recipes/demo_sft/run.sh

clean: ## remove caches and outputs/ (keeps .venv and exp/, which holds the recipes' corpora and runs)
	rm -rf outputs .pytest_cache .ruff_cache build *.egg-info

clean-exp: ## remove exp/ (the demo's and recipes' corpora, checkpoints and exports: hours of CPU to remake)
	rm -rf exp
