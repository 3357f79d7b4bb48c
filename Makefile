# make run: serve on the embedded Redis.  make test: the whole suite.  make bench: the benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
AXE := tests/browser/node_modules/axe-core/axe.min.js

.PHONY: run test bench lint clean

# What serving needs, and no more: a first `make run` installs no test tools.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $(STAMP)

# The test extra on top (pytest, Playwright, ruff, an SMTP server for the mail tests).
$(TEST_STAMP): $(STAMP)
	$(PIP) -e '.[test]'
	touch $(TEST_STAMP)

run: $(STAMP)
	$(PY) server.py $(ARGS)

# axe-core for the browser tests' accessibility checks; without npm (or Chromium) they are skipped.
$(AXE): tests/browser/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error \
	  || echo "npm ci failed: the browser tests will be skipped"; \
	else echo "npm not found: the browser tests will be skipped"; fi

test: $(TEST_STAMP) $(AXE)
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run.py $(ARGS)

lint: $(TEST_STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) var .pytest_cache tests/browser/node_modules test-artifacts
