# Quick start: `make repro` runs the pipeline, `make test` runs the tests.
# Both create .venv on first use. torch is pinned here: an unpinned torch pulls a CUDA build.
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: repro test install install-dev clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e . $(TORCH)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]' $(TORCH)
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

repro: install
	dvc repro

test: install-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)
