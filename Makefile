# Every target installs into .venv first if it is missing or out of date.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A cell may take up to 20 minutes: a guard against a hung kernel, not a speed test (on a machine whose
# other core is busy, chapter 04's training cell took more than 300 s; `make times` measures speed).
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 --nbval-sanitize-with nbval_sanitize.cfg
LAB_ARGS ?=

.PHONY: install lab test unit nbval lint sync bench html times clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

## make lab: JupyterLab on the book (notebooks/ are the executed chapters; book/ their sources)
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" $(LAB_ARGS) notebooks/00_preface.ipynb

## make test: lint (ruff and mypy), unit tests, and every notebook re-executed by nbval
# The tests and notebooks run in JOBS processes (pytest-xdist; one notebook's cells stay together in
# one process), each PyTorch process with cores / JOBS threads: more threads than cores make each of
# PyTorch's parallel operations wait for a thread whose core is taken. The browser tests then run
# after them, as their own set, under the same thread rule: each one runs a chapter in JupyterLab.
JOBS ?= $(shell nproc 2>/dev/null || echo 1)
THREADS ?= $(shell n=$$(( $$(nproc 2>/dev/null || echo 1) / $(JOBS) )); echo $$(( n > 0 ? n : 1 )))
PARALLEL := $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist loadscope)
THREAD_ENV := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(THREADS)}

test: $(STAMP)
	$(VENV)/bin/ruff check minigpt wafer tests bench scripts
	$(VENV)/bin/mypy
	$(THREAD_ENV) $(PY) -m pytest tests notebooks $(NBVAL) $(PARALLEL) \
	    --ignore=tests/e2e -p no:cacheprovider
	$(THREAD_ENV) $(PY) -m pytest tests/e2e $(PARALLEL) -p no:cacheprovider

unit: $(STAMP)
	$(PY) -m pytest tests -p no:cacheprovider

nbval: $(STAMP)
	$(PY) -m pytest notebooks $(NBVAL) -p no:cacheprovider

## make lint: ruff over the code, and mypy over minigpt/ and wafer/ (configured in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check minigpt wafer tests bench scripts
	$(VENV)/bin/mypy

## make sync: pair book/*.md with notebooks/*.ipynb and re-execute changed chapters
## (CHAPTERS="01 02" re-executes only those; FORCE=1 all)
sync: $(STAMP)
	$(PY) scripts/sync.py $(if $(FORCE),--force) $(CHAPTERS)

## make html: the book as a website in build/site/_build/html (from the executed notebooks)
html: $(STAMP)
	$(PY) scripts/site.py

## make times: execute every chapter in a temporary copy and print each one's run time
times: $(STAMP)
	$(PY) scripts/chapter_times.py $(CHAPTERS)

## make bench: benchmarks; tables on stdout, JSON in bench/results/
bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build
