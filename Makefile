# Two commands on a fresh machine with only Python 3.11: `make demo` and `make test`.
# Both create (or refresh, when setup.py changes) the virtualenv in .venv themselves.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_output
PYTEST_ARGS ?=

.PHONY: venv demo test bench clean browser fashion-data example-fashion

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: venv
	$(BIN)/xai-audit demo --output $(DEMO_DIR)

# The report's browser test renders the page in headless Chromium and reads its printed PDF with
# pdftotext (Debian's chromium and poppler-utils); root installs them directly, anyone else
# through sudo.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@test -x /usr/bin/chromium && test -x /usr/bin/pdftotext || { \
		echo "Installing chromium and poppler-utils for the report's browser test (apt-get)" && \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium poppler-utils; }

test: venv browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

# Fashion-MNIST (Debian's dataset-fashion-mnist, 70,000 real images) audited whole: not part of
# `make test` (tests/test_fashion.py runs the same path on a few hundred images).
fashion-data:
	@test -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz || { \
		echo "Installing dataset-fashion-mnist (apt-get)" && \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }

example-fashion: venv fashion-data
	$(BIN)/python -m beam_pipeline.demo.fashion --output fashion_output

bench: venv
	$(BIN)/python bench/bench_job.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) fashion_output build *.egg-info
