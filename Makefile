# make run: serve on the embedded Redis.  make test: the whole suite.  make bench: the benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) server.py $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check site tests bench server.py
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run.py $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check site tests bench server.py

clean:
	rm -rf $(VENV) var .pytest_cache
