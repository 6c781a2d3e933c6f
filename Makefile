# `make test` and `make report` each set up .venv on a fresh machine first.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip --no-input
Q       := -q --progress-bar off
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: test report venv clean lint typecheck pytest

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install $(Q) --upgrade pip setuptools wheel
	# 1. torch first: this pin takes the CPU build on disk (a bare `torch` pulls CUDA).
	$(PIP) install $(Q) torch==2.13.0
	# 2. the project, editable, with every extra (the theseus extra is theseus-ai's runtime deps).
	#    On a re-run theseus-ai is already here, and pip would report its deliberately missing
	#    scikit-sparse as a dependency conflict (see the README): that expected report is off,
	#    as is setuptools' "InformationOnly" notice about editable installs (the adapters/ ->
	#    fold_plugins.adapters mapping needs its import-hook editable mode).
	PYTHONWARNINGS="ignore:Editable installation" \
	  $(PIP) install $(Q) --no-warn-conflicts -e '.[theseus,cvx,report,test]'
	# 3. theseus-ai 0.2.3 last: an sdist whose setup.py imports torch (no build isolation), and
	#    --no-deps because it requires scikit-sparse, which needs SuiteSparse's C headers.
	$(PIP) install $(Q) --no-deps --no-build-isolation theseus-ai==0.2.3
	@echo "venv ready (scikit-sparse is not installed on purpose: only Theseus's" \
	      "CholmodSparseSolver needs it, and the tests that use it skip)."
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# the test command (README, .ci/run): lint, type-check, then the test suite
test: lint typecheck pytest

pytest: venv
	$(VPY) -m pytest -q tests

report: venv
	$(VPY) -m comparisons

lint: venv
	$(VPY) -m ruff check fold_plugins adapters comparisons tests

# mypy's basic checks on the core and the adapters (configured in pyproject.toml)
typecheck: venv
	$(VPY) -m mypy

clean:
	rm -rf $(VENV) comparisons/out
