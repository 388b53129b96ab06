# `make demo` and `make test` work on a fresh machine: each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo compare test test-gpu bench-wheels gpu-check bench-data clean

install:
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'

demo: install
	$(PYTHON) -m dico_scale.demo

# DiCO vs SCST from the demo's XE captioner (trained first when runs/demo/xe/model.pt is missing): docs/dico_vs_scst.png
compare: install
	$(PYTHON) -m dico_scale.compare --config configs/demo/compare.yaml --prepare

test: install
	$(PYTHON) -m pytest -q tests

test-gpu: install
	$(PYTHON) -m pytest -q -m gpu tests

# Benchmark peers as wheels, for the GPU machine that has no registry (run here, before the GPU check).
bench-wheels:
	bash benchmarks/fetch_wheels.sh

# On the lent GPU machine: the kernels' GPU tests and benchmarks/kernels.py, results under $$OUT.
gpu-check:
	bash benchmarks/gpu_check.sh

bench-data: install
	$(PYTHON) benchmarks/data.py --json runs/bench/data.json

clean:
	rm -rf runs data/demo mlflow.db mlartifacts
