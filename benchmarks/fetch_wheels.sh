#!/usr/bin/env bash
# Fetch wheels for the offline GPU machine (run here, where a registry is reachable); benchmarks/gpu_check.sh
# installs them there with `pip install --no-deps --no-index benchmarks/wheels/*.whl`. All are pure Python.
#   - the kernel benchmark's peers: Liger's fused linear cross-entropy and Apple's Cut Cross-Entropy;
#   - what benchmarks/dico_step.py needs beyond that machine's torch image: open_clip, omegaconf, our transformers.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download --no-deps -d wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1
python3 -m pip download --no-deps -d wheels open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 omegaconf==2.4.0 \
    transformers==5.24.0
ls -l wheels
