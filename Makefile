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

.PHONY: install demo test lint bench clean browser deploy serve

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

test: install browser
	$(VENV)/bin/ruff check flows tasks tests benchmarks
	$(VENV)/bin/mypy flows tasks
	$(VENV)/bin/hadolint Dockerfile
	$(PY) -m pytest

# the Prefect UI test drives Debian's chromium through Playwright (Playwright's own browser
# download cannot work offline); installed when missing and this is root on Debian, else that
# one test is skipped with the reason (CI requires it: LANCEFLOW_REQUIRE_BROWSER=1)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { (apt-get install -y -q chromium >/dev/null 2>&1 || \
	       (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
	      && echo "installed chromium" || echo "could not install chromium: the browser test will say so"; }; \
	  else echo "no chromium: the browser test will be skipped (apt-get install chromium)"; fi; }

# deploy the four deployments to the server PREFECT_API_URL names (see README: operating it)
LANCEFLOW_SOURCE ?= $(CURDIR)/samples/corpus
LANCEFLOW_TABLE ?= $(CURDIR)/lancedb
LANCEFLOW_EVAL_DATASET ?= $(CURDIR)/samples/eval/queries.jsonl
LANCEFLOW_CODE_DIR ?= $(CURDIR)
deploy: install
	$(VENV)/bin/prefect work-pool inspect lanceflow >/dev/null 2>&1 || \
	  $(VENV)/bin/prefect work-pool create lanceflow --type process
	LANCEFLOW_SOURCE="$(LANCEFLOW_SOURCE)" LANCEFLOW_TABLE="$(LANCEFLOW_TABLE)" \
	LANCEFLOW_EVAL_DATASET="$(LANCEFLOW_EVAL_DATASET)" LANCEFLOW_CODE_DIR="$(LANCEFLOW_CODE_DIR)" \
	  $(VENV)/bin/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml

# one machine, no worker: the nightly ingest, the evaluation after it, the weekly upkeep
serve: install
	$(VENV)/bin/lanceflow serve --source "$(LANCEFLOW_SOURCE)" --table "$(LANCEFLOW_TABLE)" \
	  --dataset "$(LANCEFLOW_EVAL_DATASET)"

bench: install
	$(PY) benchmarks/ingest_scifact.py
	$(PY) benchmarks/evaluate_scifact.py
	$(PY) benchmarks/openai_ratelimit.py
	$(PY) benchmarks/buckets.py

clean:
	rm -rf .demo-lancedb .prefect-demo .azurite .pytest_cache .mypy_cache .ruff_cache build/test-artifacts
