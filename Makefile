# The two README commands. Each creates its own virtual environment on first use.
# Every environment installs from requirements/lock.txt (`make lock` regenerates it) except
# `make test-latest` (newest allowed versions) and `make test-min` (lowest, requirements/min.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
MIN := requirements/min.txt
# Tunix's NNX LLMs for the depth tests' model zoo; --no-deps: its own requirements are a whole
# training stack.
TUNIX := google-tunix==0.1.7
PIP := -m pip install --quiet
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
LINT_PATHS := dualopt_jax tests examples benchmarks tools

# The core tests `make test-min` runs against the lowest allowed versions: update rules against
# the NumPy references, every factory through every wrapping (contract), Optax's own harness,
# depths, the forward order, hyper-parameters, describe/drift. Not the HF/Tunix zoos (optional
# packages), multi-host, checkpoint/integration or benchmark smoke runs.
CORE_TESTS := tests/test_rollback.py tests/test_dualopt.py tests/test_spd.py tests/test_l2sp.py \
  tests/test_projection.py tests/test_fixnorm.py tests/test_lr_decay.py tests/test_depths.py \
  tests/test_forward.py tests/test_hyperparams.py tests/test_describe.py tests/test_drift.py \
  tests/test_complex.py tests/test_optax_harness.py tests/test_contract.py \
  tests/test_requirements.py
# Tools for the core tests in .venv-min; pip picks their newest versions that fit the pins.
MIN_TOOLS := pytest pytest-xdist hypothesis orbax-checkpoint
TESTS ?= dualopt_jax tests
MIN_STAMP := .venv-min/.installed-$(shell cat pyproject.toml $(MIN) | cksum | cut -d' ' -f1)

.PHONY: demo test test-tunix lint bench docs docs-check lock test-latest test-min release-check \
  typecheck ci clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) $(PIP) --upgrade pip
	$(PY) $(PIP) -c $(LOCK) -e ".[test,examples,docs]"
	$(PY) $(PIP) -c $(LOCK) --no-deps $(TUNIX)
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

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)

test: lint
	$(PY) -m pytest -n 2 -q --doctest-modules dualopt_jax tests $(ARGS)

test-tunix: $(TSTAMP)
	$(TPY) -m pytest -q -p no:cacheprovider tests/test_examples_frameworks.py -k tunix $(ARGS)

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

# Regenerates requirements/lock.txt: a fresh temporary venv, an unconstrained install of the
# extras the venvs use plus Tunix, then `pip freeze`. Run it with the CI's Python (3.11).
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" $(PIP) --upgrade pip; \
	"$$tmp/venv/bin/python" $(PIP) -e ".[test,examples,docs]"; \
	"$$tmp/venv/bin/python" $(PIP) --no-deps $(TUNIX); \
	"$$tmp/venv/bin/python" -m pip freeze --exclude-editable > "$$tmp/freeze.txt"; \
	if grep -iE '^(torch|nvidia)' "$$tmp/freeze.txt"; then echo "lock: torch was pulled in" >&2; exit 1; fi; \
	{ echo "# Exact versions for Python $$("$$tmp/venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'),"; \
	  echo "# made by \`make lock\` on $$(date -u +%Y-%m-%d): a fresh venv, then"; \
	  echo "#   pip install -e \".[test,examples,docs]\" && pip install --no-deps $(TUNIX)"; \
	  echo "#   pip freeze --exclude-editable"; \
	  echo "# Used as constraints (pip install -c $(LOCK) ...) by .venv, make release-check and CI."; \
	  cat "$$tmp/freeze.txt"; } > $(LOCK)
	@echo "wrote $(LOCK)"

# The newest versions pyproject allows, whatever the lock says.
test-latest:
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python $(PIP) --upgrade pip
	.venv-latest/bin/python $(PIP) --upgrade --upgrade-strategy eager -e ".[test,examples]"
	.venv-latest/bin/python $(PIP) --no-deps $(TUNIX)
	.venv-latest/bin/python -m pip list | grep -iE '^(jax|jaxlib|flax|optax|chex|numpy) '
	.venv-latest/bin/python -m pytest -n 2 -q -p no:cacheprovider --doctest-modules $(TESTS) $(ARGS)

# The lowest versions pyproject allows for the runtime dependencies (pip cannot resolve lowest
# itself: requirements/min.txt pins them, tests/test_requirements.py keeps the two equal).
$(MIN_STAMP): pyproject.toml $(MIN)
	rm -rf .venv-min
	$(PYTHON) -m venv .venv-min
	.venv-min/bin/python $(PIP) --upgrade pip
	.venv-min/bin/python $(PIP) -e . -r $(MIN) $(MIN_TOOLS)
	touch $@

test-min: $(MIN_STAMP)
	.venv-min/bin/python -m pip list | grep -iE '^(jax|jaxlib|flax|optax|chex|numpy) '
	.venv-min/bin/python -m pytest -n 2 -q -p no:cacheprovider $(CORE_TESTS) $(ARGS)

# Build wheel + sdist, check their metadata and contents, install the wheel (locked runtime
# dependencies) into a clean venv and run the package's doctests there from outside the repo.
release-check: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*
	$(PY) tools/check_dist.py dist
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" $(PIP) -c $(LOCK) dist/*.whl pytest; \
	cd "$$tmp" && "$$tmp/venv/bin/python" -c 'import dualopt_jax, sys; f = dualopt_jax.__file__; print("installed copy:", f, dualopt_jax.__version__); sys.exit("site-packages" not in f)' \
	&& JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=8 "$$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider --doctest-modules --pyargs dualopt_jax

typecheck: $(STAMP)
	$(PY) -m pyright --pythonpath $(PY)

# What .ci/run runs, in this order.
ci: test test-min docs release-check typecheck

clean:
	rm -rf $(VENV) $(TUNIX_VENV) .venv-latest .venv-min dist .pytest_cache docs/_build
