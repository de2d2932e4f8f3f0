# Two commands on a fresh machine with only Python 3.11: `make demo` and `make test`.
# Both create (or refresh, when setup.py changes) the virtualenv in .venv themselves.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_output
PYTEST_ARGS ?=

.PHONY: venv demo test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: venv
	$(BIN)/xai-audit demo --output $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

bench: venv
	$(BIN)/python bench/bench_job.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
