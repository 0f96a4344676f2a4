# Two entry points, each creating .venv on first use:
#   make quickstart   train configs/quickstart.py on the built-in offline dataset and evaluate it
#   make test         run the test suite (8 simulated CPU devices)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/quickstart

.PHONY: quickstart test lint

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

quickstart: $(VENV)/.installed
	$(PY) -m convmixer_jax.main --config configs/quickstart.py --workdir $(WORKDIR)

test: $(VENV)/.installed
	command -v shellcheck > /dev/null || (apt-get update -qq && apt-get install -y -qq shellcheck)
	$(PY) -m ruff check convmixer_jax configs tests
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check convmixer_jax configs tests
	$(PY) -m ruff format --check convmixer_jax configs tests
