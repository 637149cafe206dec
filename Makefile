# The two README commands. Each creates its own virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint bench docs docs-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples,docs]"
	$(PY) -m pip install --quiet --no-deps google-tunix==0.1.7
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check dualopt_jax tests examples benchmarks
	$(PY) -m pytest -n 2 -q --doctest-modules dualopt_jax tests $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/compile_time.py

# The documentation site, offline: warnings are errors, every reference must resolve.
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W -n --keep-going -b html docs docs/_build/html

# Renders pages in headless Chromium and checks every internal link (needs `chromium`).
docs-check: docs
	$(PY) docs/check_site.py

clean:
	rm -rf $(VENV) .pytest_cache docs/_build
