# lsa_ext: set-up, build, test, demo. Everything happens in .venv (created with
# --system-site-packages so a machine's existing torch, e.g. on a GPU box, is reused).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: all venv build test lint demo bench clean

all: build

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# torch is installed only when missing (a GPU machine's preinstalled torch is kept).
$(VENV)/.deps: $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q setuptools wheel ninja numpy scikit-learn mlxtend matplotlib tqdm \
		pytest pytest-benchmark pytest-timeout hypothesis ruff
	touch $@

# The extension is built without build isolation (isolation would fetch a multi-GB torch).
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

venv: $(VENV)/.deps
build: $(VENV)/.built

lint: $(VENV)/.deps
	$(PY) -m ruff check .

test: build lint
	$(PY) -m pytest -q tests

demo: build
	$(VENV)/bin/lsa analyze

bench: build
	$(PY) benchmarks/ops_table.py --repeats 21

clean:
	rm -rf build *.egg-info lsa_ext/*.so $(VENV)
