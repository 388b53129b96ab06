#!/usr/bin/env bash
# Fetch wheels for the offline GPU machine (run here, where a registry is reachable); benchmarks/gpu_check.sh
# installs them there with `pip install --no-deps --no-index benchmarks/wheels/*.whl`. That machine has Python 3.12,
# torch, triton, timm, huggingface_hub, tokenizers, numpy and pytest, and nothing else this project needs:
#   - the kernel benchmark's peers: Liger's fused linear cross-entropy and Apple's Cut Cross-Entropy;
#   - what training needs (tests/test_gpu.py, benchmarks/dico_step.py): DeepSpeed and pydantic, open_clip,
#     webdataset, omegaconf, our transformers. No MLflow and no pycocoevalcap: the GPU tests train without tracking
#     and without a validation split. DeepSpeed comes as source only: built here into a pure-Python wheel
#     (omegaconf 2.4 needs no antlr4).
#   - the vision-language rows (hf_vlm, LoRA): peft and accelerate; transformers 5.25 needs huggingface_hub >= 2.4
#     (with the HTTP stack it imports) and tokenizers 0.23, so those come at the lock's versions too, with timm
#     (open_clip's, which imports huggingface_hub). transformers checks regex >= 2025.10.22 at import: the image's
#     regex is of unknown age (KINDS.md lists no version), so the lock's comes along. Loading a VLM asks for Hugging
#     Face's `kernels` (0.19.1 <= v < 0.20; the H100 run of 2026-12-06 failed without it).
# Versions are requirements.lock's; the folder holds only this fetch (pip refuses two versions of one package).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
rm -f wheels/*.whl
python3 -m pip download --no-deps -d wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1
python3 -m pip download --no-deps -d wheels open_clip_torch==3.3.0 ftfy==6.3.1 omegaconf==2.4.0 \
    transformers==5.25.0 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing_extensions==4.16.0 peft==0.22.0 accelerate==1.16.0 timm==1.0.31 \
    huggingface-hub==2.5.0 httpx2==2.17.0 httpcore2==2.17.0 h11==0.16.0 anyio==4.16.0 idna==3.21 truststore==0.10.5
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels pydantic-core==2.50.5 tokenizers==0.23.3 \
    wcwidth==0.9.5 regex==2026.12.2 kernels==0.19.1
python3 -m pip wheel --no-deps -w wheels deepspeed==0.19.8
ls -l wheels
