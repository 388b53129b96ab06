#!/usr/bin/env bash
# Fetch the benchmark peers' wheels (pure Python + Triton) on a machine with a package registry, for the offline
# GPU machine, which installs them with: pip install --no-deps benchmarks/wheels/*.whl
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download --no-deps -d wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -l wheels
