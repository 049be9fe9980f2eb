# Quick start: `make repro` runs the pipeline, `make test` runs the tests.
# Both create .venv on first use and install exactly the versions in requirements.lock (the ones
# that produced the committed results); pyproject.toml keeps ranges for installs elsewhere.
# torch is pinned here too: an unpinned torch pulls a CUDA build.
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
LOCK := requirements.lock
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: repro test install install-dev lock

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e . $(TORCH)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev]' $(TORCH)
	touch $@

# Fashion-MNIST from Debian's archive (dataset-fashion-mnist: 70,000 images, read where it installs
# them, offline afterwards), where apt is available and this runs as root; elsewhere preparing a
# fashion_mnist dataset names the package in one line.
FASHION := /usr/share/datasets/fashion-mnist
$(FASHION):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	   || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null)) \
	  || echo "warning: could not install dataset-fashion-mnist; fashion_mnist datasets will not prepare"; \
	else echo "note: dataset-fashion-mnist needs apt as root; install it to prepare fashion_mnist datasets"; fi

install: $(VENV)/.installed | $(FASHION)
install-dev: $(VENV)/.installed-dev | $(FASHION)

repro: install
	dvc repro

test: install-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Refresh the lock: resolve pyproject.toml's ranges afresh in a clean venv and freeze the result
# (torch without its +cpu label, so the pin matches the CPU wheel here and the same version elsewhere).
lock:
	rm -rf .lockenv && python3 -m venv .lockenv
	.lockenv/bin/python -m pip install -q --upgrade pip
	.lockenv/bin/python -m pip install -q $(TORCH)
	.lockenv/bin/python -m pip install -q '.[dev,scale]' $(TORCH)
	.lockenv/bin/python -m pip freeze --exclude-editable | grep -v '^pipeline[= @]' \
		| sed 's/^torch==\([^+]*\)+.*/torch==\1/' > $(LOCK)
	rm -rf .lockenv build
