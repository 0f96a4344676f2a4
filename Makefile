# Two entry points, each creating .venv on first use:
#   make quickstart   train configs/quickstart.py on the built-in offline dataset and evaluate it
#   make test         run the test suite (8 simulated CPU devices)
# and the full-size ahead-of-time compiles for TPUs and GPUs (docs/accelerators.md):
#   make aot
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
AOT_VENV := .venv-aot
AOT_PY := $(AOT_VENV)/bin/python
WORKDIR ?= runs/quickstart

.PHONY: quickstart test lint aot aot-env

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The TPU and GPU compilers (libtpu, the CUDA plugin; pinned by jax to its own version) in an
# environment of their own that sees .venv's packages: installed beside the training packages,
# they make JAX try to start a TPU and a GPU backend in every CPU process.
$(AOT_VENV)/.installed: $(VENV)/.installed
	rm -rf $(AOT_VENV)
	$(PYTHON) -m venv $(AOT_VENV)
	$(PY) -m pip freeze --exclude-editable > $(AOT_VENV)/constraints.txt
	$(AOT_PY) -m pip install -q -c $(AOT_VENV)/constraints.txt \
		"jax[tpu,cuda12-local]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(AOT_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/convmixer_base.pth"
	touch $@

aot-env: $(AOT_VENV)/.installed

aot: $(AOT_VENV)/.installed
	$(AOT_PY) benchmarks/aot_table.py --output docs/accelerators.md

quickstart: $(VENV)/.installed
	$(PY) -m convmixer_jax.main --config configs/quickstart.py --workdir $(WORKDIR)

test: $(VENV)/.installed $(AOT_VENV)/.installed
	command -v shellcheck > /dev/null || (apt-get update -qq && apt-get install -y -qq shellcheck)
	$(PY) -m ruff check convmixer_jax configs tests
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check convmixer_jax configs tests
	$(PY) -m ruff format --check convmixer_jax configs tests
