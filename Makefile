# Two commands a newcomer needs: `make demo` and `make test`. Both set up first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Extra pip arguments for torch, e.g. an index of CPU-only wheels on a CPU machine that has no
# local torch wheel. On a GPU machine the default PyPI build (with CUDA) is what you want.
TORCH_PIP_ARGS ?=

.PHONY: setup demo test lint fetch clean

setup: $(STAMP) fetch

# Re-installs only when pyproject.toml changes; otherwise a no-op.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned: an unpinned torch would pull GBs of CUDA wheels on a CPU machine.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[dev]"
	@# CoLES: pytorch-lifestream pins spacy==3.7.4 (unused); its real deps are in pyproject.toml.
	$(PY) -m pip install --quiet --no-deps pytorch-lifestream==0.7.0
	@touch $(STAMP)

# The default dataset and model into the cache ($$LLM4ES_CACHE or ~/.cache/llm4es); fast when present.
fetch: $(STAMP)
	@$(VENV)/bin/llm4es fetch

demo: setup
	$(VENV)/bin/llm4es demo

# Lint first (seconds): the layer contracts and ruff, then the tests.
test: setup lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) data reports
