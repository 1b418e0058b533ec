# Two commands do all the set-up on a fresh machine with only python3:
#   make run    the demo: gpumgr in front of simulated consumers
#   make test   the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LISTEN ?= tcp:8770:interface=127.0.0.1

.PHONY: run test typecheck venv clean bench bench-smoke

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt \
		--config-settings editable_mode=compat -e '.[test]'
	touch $@

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/twistd --nodaemon --pidfile= gpumgr --demo --listen '$(LISTEN)'

test: $(STAMP)
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

typecheck: $(STAMP)
	$(BIN)/mypy

# Benchmarks: gpumgr vs direct vs nginx, interleaved in one run (see bench/README.md).
# nginx and wrk come from Debian: sudo apt-get install nginx-light wrk
bench: $(STAMP)
	$(BIN)/python bench/run.py --out bench/results/latest.json

bench-smoke: $(STAMP)
	$(BIN)/python bench/run.py --smoke --out bench/results/smoke.json

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
