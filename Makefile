# `make test` and `make report` each set up .venv on a fresh machine first.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip --no-input
Q       := -q --progress-bar off
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: test report venv clean lint

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install $(Q) --upgrade pip setuptools wheel
	# 1. torch first: this pin takes the CPU build on disk (a bare `torch` pulls CUDA).
	$(PIP) install $(Q) torch==2.13.0
	# 2. the project, editable, with every extra (the theseus extra is theseus-ai's runtime deps).
	$(PIP) install $(Q) -e '.[theseus,cvx,report,test]'
	# 3. theseus-ai 0.2.3 last: an sdist whose setup.py imports torch (no build isolation), and
	#    --no-deps because it requires scikit-sparse, which needs SuiteSparse's C headers. Done
	#    last, no later pip run re-checks it, so pip prints no dependency "ERROR" for it.
	$(PIP) install $(Q) --no-deps --no-build-isolation theseus-ai==0.2.3
	@echo "venv ready. scikit-sparse is intentionally not installed (only Theseus's CholmodSparseSolver needs it; tests that need it skip)."
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: venv
	$(VPY) -m pytest -q tests

report: venv
	$(VPY) -m comparisons

lint: venv
	$(VPY) -m ruff check fold_plugins adapters comparisons tests

clean:
	rm -rf $(VENV) comparisons/out
