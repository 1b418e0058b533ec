# Two commands do all the set-up on a fresh machine with only python3:
#   make run    the demo: gpumgr in front of simulated consumers
#   make test   the whole test suite
# `make help` lists every target.
#
# Tests live by speed (see tests/conftest.py):
#   tests/unit         no sockets, no processes, no sleeps (Clock, StubTreq, MemoryReactor);
#                      tests/unit/conftest.py fails a unit test that binds or connects a socket
#                      or starts a process
#   tests/integration  the real broker and the simulated services on loopback
#   tests/system       real twistd processes, the fault suite, the browser, packaging, bench smoke
# The directory sets the markers (tests/conftest.py): `integration` on tests/integration,
# `system` and `slow` on tests/system (a few long integration runs are marked `slow` too), so
# `-m "not integration and not slow"` selects exactly tests/unit.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# `make run` installs gpumgr alone; `make test` adds the [test] extras to the same venv.
RUN_STAMP  := $(VENV)/.installed-run-stamp
TEST_STAMP := $(VENV)/.installed-test-stamp
LISTEN ?= tcp:8770:interface=127.0.0.1
# Runs a command with no network: a user and network namespace with no interface up.
OFFLINE ?= unshare --user --map-root-user --net

.PHONY: help run test test-unit test-unit-offline typecheck venv clean bench bench-smoke

help:  ## this list
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUN_STAMP): setup.cfg pyproject.toml constraints.txt | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -c constraints.txt \
		--config-settings editable_mode=compat -e .
	touch $@

$(TEST_STAMP): setup.cfg pyproject.toml constraints.txt | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -c constraints.txt \
		--config-settings editable_mode=compat -e '.[test]'
	touch $@

venv: $(TEST_STAMP)  ## the virtualenv with gpumgr and the test tools

run: $(RUN_STAMP)  ## the demo: gpumgr in front of simulated consumers (LISTEN=...)
	$(BIN)/twistd --nodaemon --pidfile= gpumgr --demo --listen '$(LISTEN)'

# mypy, then the unit tests without a network, then the whole suite (unit tests included).
test: $(TEST_STAMP) test-unit-offline  ## mypy, the unit tests offline, then every test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(TEST_STAMP)  ## the fast loop: tests/unit only
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# Proof that the unit tests need no network: run them where there is none. Where this machine
# cannot make a namespace (unshare refused), say so and run them with the guard alone.
# PYTEST_ARGS is for the full run (`make test PYTEST_ARGS='-k fault'` must not stop here on
# "no tests collected"); UNIT_ARGS is for this one.
test-unit-offline: $(TEST_STAMP) typecheck  ## tests/unit with the network switched off
	@if $(OFFLINE) true 2>/dev/null; then \
		echo "$(OFFLINE) pytest tests/unit"; \
		$(OFFLINE) $(BIN)/python -m pytest -q tests/unit $(UNIT_ARGS); \
	else \
		echo "note: '$(OFFLINE)' is not allowed here; tests/unit runs with its socket guard only"; \
		$(BIN)/python -m pytest -q tests/unit $(UNIT_ARGS); \
	fi

typecheck: $(TEST_STAMP)  ## mypy
	$(BIN)/mypy

# Benchmarks: gpumgr vs direct vs nginx, interleaved in one run, then scheduling on a
# realistic mixed trace, capacity: 1 against capacity: auto (see bench/README.md).
# nginx and wrk come from Debian: sudo apt-get install nginx-light wrk
bench: $(TEST_STAMP)  ## benchmarks: gpumgr vs direct vs nginx; scheduling (bench/README.md)
	$(BIN)/python bench/run.py --out bench/results/latest.json
	$(BIN)/python bench/sched.py --out bench/results/sched.json

bench-smoke: $(TEST_STAMP)  ## a short benchmark run
	$(BIN)/python bench/run.py --smoke --out bench/results/smoke.json
	$(BIN)/python bench/sched.py --smoke --out bench/results/sched-smoke.json

clean:  ## remove the virtualenv and build outputs
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
