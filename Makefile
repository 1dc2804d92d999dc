# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) pipelines/train.py
	$(PY) pipelines/index.py --model models:/hvd@latest --shards data/shards-demo
	$(PY) pipelines/search.py --model models:/hvd@latest "a red square in the top left"

test: $(VENV)/.installed-dev
	$(PY) -m ruff check hvd pipelines benchmarks tests
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check hvd pipelines benchmarks tests

clean:
	rm -rf data runs mlruns mlflow.db .pytest_cache
