# The two quick-start commands: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install chromium serve test test-integration bench bench-proxy clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The dashboard's browser tests need Debian's chromium; installed here when missing.
chromium:
	sh scripts/ensure-chromium.sh

# The service on the embedded default: SQLite, embedded broker and worker, no other service.
serve: install
	$(VENV)/bin/mediagate serve

# Lint (ruff), types (mypy, its files in pyproject.toml) and the whole suite, the import-layer check
# included (tests/test_imports.py). With MEDIAGATE_TEST_DATABASE_URL and MEDIAGATE_TEST_REDIS_URL set it runs
# against that PostgreSQL and Redis (as .ci/run does); without, on SQLite and the embedded broker.
test: install chromium
	$(VENV)/bin/ruff check app workers tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

# The suite against the local PostgreSQL and Redis, as CI runs it.
test-integration: install chromium
	MEDIAGATE_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \
	MEDIAGATE_TEST_REDIS_URL=redis://127.0.0.1:6379/14 $(PY) -m pytest -q

# Submits through mediagate against pgbench (local PostgreSQL and Redis; installs wrk if missing).
bench: install
	$(PY) -m bench.submit

# The LLM passthrough against a loopback fake upstream, direct and through mediagate (wrk and Python load).
bench-proxy: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.proxy --compare-clients --driver all

clean:
	rm -rf $(VENV) data .pytest_cache
