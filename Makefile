# The two commands of the README's quick start:
#   make demo   install what purenn needs into .venv and run the demo
#   make test   install what purenn needs into .venv and run the tests (the default, fast set)
# Other targets: make test-slow (the slow end-to-end tests, which CI also runs), make lint, make clean.
#
# The virtual environment sees the packages already installed for $(PYTHON) (--system-site-packages),
# so a machine that has PyTorch installs only what is missing; on a fresh machine pip downloads
# everything, PyTorch included (set VENV_FLAGS= for an isolated environment).

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?= --system-site-packages
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.purenn-installed

.PHONY: demo test test-slow lint clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("purenn needs Python >= 3.10, this is " + sys.version.split()[0]) if sys.version_info < (3, 10) else None'
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PIP) "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m purenn.cli.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks export_examples
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV)
