# The two README commands. Each creates its own virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-tunix lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples]"
	$(PY) -m pip install --quiet --no-deps google-tunix==0.1.7
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Tunix's trainer stack (about 1.6 GB; ~6 min to install on 2 cores) in a second environment.
TUNIX_VENV ?= .venv-tunix
TPY := $(TUNIX_VENV)/bin/python
TSTAMP := $(TUNIX_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(TSTAMP): pyproject.toml
	$(PYTHON) -m venv $(TUNIX_VENV)
	$(TPY) -m pip install --quiet --upgrade pip
	$(TPY) -m pip install --quiet -e ".[tunix]" "pytest>=8"
	rm -f $(TUNIX_VENV)/.installed-*
	touch $(TSTAMP)

demo: $(STAMP)
	$(PY) examples/demo.py $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check dualopt_jax tests examples benchmarks
	$(PY) -m pytest -n 2 -q --doctest-modules dualopt_jax tests $(ARGS)

test-tunix: $(TSTAMP)
	$(TPY) -m pytest -q -p no:cacheprovider tests/test_examples_frameworks.py -k tunix $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/compile_time.py

clean:
	rm -rf $(VENV) $(TUNIX_VENV) .pytest_cache
