# lanceflow: `make demo` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch; installed before anything that depends on torch so that pip does
# not fetch a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[local,dev]"
	touch $@

install: $(VENV)/.installed

# the demo keeps Prefect's temporary-server database inside the checkout, so a database left in
# ~/.prefect by another Prefect version cannot get in its way
demo: export PREFECT_HOME := $(CURDIR)/.prefect-demo
demo: install
	rm -rf .demo-lancedb
	$(VENV)/bin/lanceflow ingest samples/corpus --table .demo-lancedb
	$(VENV)/bin/lanceflow search "how many vacation days do I get" --table .demo-lancedb -k 3
	$(VENV)/bin/lanceflow search "비밀번호 변경 주기" --table .demo-lancedb -k 3

test: install
	$(VENV)/bin/ruff check flows tasks tests benchmarks
	$(VENV)/bin/mypy flows tasks
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/ingest_scifact.py
	$(PY) benchmarks/evaluate_scifact.py
	$(PY) benchmarks/openai_ratelimit.py

clean:
	rm -rf .demo-lancedb .prefect-demo lancedb .pytest_cache .mypy_cache .ruff_cache
