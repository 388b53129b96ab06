# `make demo` and `make test` work on a fresh machine: each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
LOCK := requirements.lock
UV := uv==0.13.9
LATEST_VENV ?= /tmp/dico-scale-latest
FLOOR_VENV ?= /tmp/dico-scale-floor
# One resolution of setup.py (install_requires + dev, for Python 3.11): the lock's newest and test-floor's oldest
RESOLVE := uv pip compile setup.py --extra dev --python-version 3.11 --no-header --quiet
PIP_CAP := $(shell $(PIP) config list 2>/dev/null | sed -n "s/^global.constraint='\(.*\)'/\1/p")

.PHONY: install lock test-latest test-floor demo compare test test-gpu bench-wheels gpu-check bench-data clean

# Exactly the versions in requirements.lock (every package, torch included), then this package without dependencies.
# uv installs the lock (~35 s into a fresh virtualenv here, pip ~110 s), from the indexes pip is configured with;
# pip does it where uv cannot be installed or fails. Bytecode is compiled at install, as pip does: with
# PYTHONDONTWRITEBYTECODE set (CI, these machines) every process would otherwise compile each module it imports.
install:
	$(PIP) install -q $(UV) && $(PYTHON) -m uv pip install -q --compile-bytecode --python "$$($(PYTHON) -c 'import sys; print(sys.executable)')" \
	    $$($(PYTHON) tests/lockfile.py --uv-index-args) -r $(LOCK) || $(PIP) install -q -r $(LOCK)
	$(PIP) install -q --no-deps -e .
	$(PYTHON) -m compileall -q dico_scale kernels tests

# Re-resolve requirements.lock to the newest releases setup.py allows (install_requires + dev), for this machine's
# Python and platform, within pip's own constraints if it has any (this machine caps torch at what lies on its disk).
# --upgrade: without it uv keeps the pins of the file it writes over, and the lock never moves.
# Run `make test` on the new lock before committing it.
lock:
	$(PIP) install -q $(UV)
	$(PYTHON) -m $(RESOLVE) --upgrade -o $(LOCK) $(if $(PIP_CAP),--constraint $(PIP_CAP))

# The newest releases setup.py allows, on purpose: a throwaway virtualenv without the lock, the tests that start no
# 2-rank job. An upstream release that breaks us shows here before a user meets it.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade -e '.[dev]'
	$(LATEST_VENV)/bin/python tests/lockfile.py --newer-than-lock
	$(LATEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) -m 'not distributed and not gpu' tests

# The oldest releases setup.py allows, on purpose: each direct requirement at the bottom of its range (uv's
# lowest-direct resolution; what they pull in comes at its newest, as a user's pip would take it), in a throwaway
# virtualenv, the whole suite. torch, torchvision and triton stay at the lock's: their floor (torch 2.11, triton 3.6)
# is the lent GPU machine's image, which `make gpu-check` runs on, and from a registry a CUDA build of several GB.
# Floors that failed here were raised: transformers 5.20-5.23, peft 0.17, mlflow 3.0-3.8, num2words 0.5.0-0.5.4,
# DeepSpeed 0.19.0-0.19.7.
test-floor:
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q $(UV)
	grep -E '^(torch|torchvision|triton)==' $(LOCK) > $(FLOOR_VENV)/torch.txt
	$(FLOOR_VENV)/bin/python -m $(RESOLVE) --resolution lowest-direct --constraint $(FLOOR_VENV)/torch.txt \
	    $$($(PYTHON) tests/lockfile.py --uv-index-args) -o $(FLOOR_VENV)/floor.lock
	$(MAKE) install PYTHON=$(FLOOR_VENV)/bin/python LOCK=$(FLOOR_VENV)/floor.lock
	$(FLOOR_VENV)/bin/python tests/lockfile.py --newer-than-lock
	$(call run-tests,$(FLOOR_VENV)/bin/python)

demo: install
	$(PYTHON) -m dico_scale.demo

# DiCO vs SCST from the demo's XE captioner (trained first when runs/demo/xe/model.pt is missing): docs/dico_vs_scst.png
compare: install
	$(PYTHON) -m dico_scale.compare --config configs/demo/compare.yaml --prepare

# Two passes on TEST_WORKERS pytest-xdist workers: the single-process tests, then the tests that start 2-rank jobs,
# two jobs at a time (a job alone keeps 2 cores only ~60% busy: imports, launchers, barriers, checkpoint writes), a
# module (or the demo's chain) per unit of work, the longest first (tests/work_units.py).
TEST_WORKERS ?= 2
define run-tests
	$(1) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m 'not distributed' --durations=10 tests
	$(1) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m distributed --durations=10 tests
endef
test: install
	$(call run-tests,$(PYTHON))

test-gpu: install
	$(PYTHON) -m pytest -q -m gpu tests

# Benchmark peers as wheels, for the GPU machine that has no registry (run here, before the GPU check).
bench-wheels:
	bash benchmarks/fetch_wheels.sh

# On the lent GPU machine: the GPU tests (kernels, then training), then the benchmarks; results under $$OUT.
gpu-check:
	bash benchmarks/gpu_check.sh

bench-data: install
	$(PYTHON) benchmarks/data.py --json runs/bench/data.json

clean:
	rm -rf runs data/demo mlflow.db mlartifacts
