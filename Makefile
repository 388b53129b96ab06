# `make demo` and `make test` work on a fresh machine: each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test test-gpu clean

install:
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'

demo: install
	$(PYTHON) -m dico_scale.demo

test: install
	$(PYTHON) -m pytest -q tests

test-gpu: install
	$(PYTHON) -m pytest -q -m gpu tests

clean:
	rm -rf runs data/demo mlflow.db mlartifacts
