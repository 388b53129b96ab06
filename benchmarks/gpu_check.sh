#!/usr/bin/env bash
# The GPU check in one command, for the lent GPU machine (a bare image with torch + triton and no network):
#   bash benchmarks/gpu_check.sh            (results under $OUT, else benchmarks/results)
# benchmarks/wheels/ is git-ignored: carry it to the GPU machine along with the working tree.
# 1. installs this package without dependencies (the kernels need only torch + triton) and the benchmark peers'
#    wheels (benchmarks/fetch_wheels.sh fetches them beforehand on a machine with a registry);
# 2. the kernels' GPU tests (marker gpu): float64 agreement, poisoned outputs, CUDA-graph capture;
# 3. the training GPU tests (tests/test_gpu.py, tests/test_dico_stage.py): a dico step through the fused head's
#    backward against the torch head (fp32 and bf16); xe and dico on CUDA in bf16; VLMs' dico under ZeRO-3 in bf16,
#    Idefics3 full and Gemma 3 with LoRA; ZeRO-3 with the fused head (the reference's gradient-free log-probs)
#    inside the captioner's forward, offloaded parameters and optimizer, fp16 with loss scaling, gathered generation;
# 4. a small random VLM's DiCO step (Idefics3, width 1024, 4 layers, 224-pixel tiles; configs/smolvlm/dico.yaml,
#    8 images x 5 candidates x 30 tokens): full fine-tuning vs LoRA, median step, images/s, peak GiB;
# 5. benchmarks/kernel_bench.py: ours vs naive fp32, half log_softmax, torch.compile, Liger, Cut Cross-Entropy;
#    also the untied heads of VLM vocabularies (V = 151,936 and 262,208) against Liger and Cut CE;
# 6. benchmarks/dico_step.py: images/s of a whole DiCO step at the COCO model sizes, loss.kernel auto vs torch.
# The checks that decide what loss.kernel=auto may do come first, the measurements after (the H100 run of 2026-12-06
# spent its time on benchmarks while its tests were cut). Tests run on 3 pytest workers: Triton compiles each
# autotune config on the CPU, one at a time per process (16 cores there), and the tiny models leave the GPU idle.
# Each part runs under its own time limit (seconds; a lease is short, and a hung part must not cost the others):
#   GPU_CHECK_LIMITS="tests train vlm bench step", default "200 210 45 120 50";
# and none runs past GPU_CHECK_BUDGET (default 555) seconds from the start, the install included: one 10-minute call.
# A part at its limit gets SIGINT (killed 10 s later): pytest then prints where it stood and what passed, a benchmark
# its traceback. A test running over 45 s dumps every thread's stack (faulthandler) and goes on: the 2026-12-04 run
# lost its kernel tests to a limit with nothing to say where they hung.
set -uo pipefail
cd "$(dirname "$0")/.."
read -r T_TESTS T_TRAIN T_VLM T_BENCH T_STEP <<<"${GPU_CHECK_LIMITS:-200 210 45 120 50}"
BUDGET=${GPU_CHECK_BUDGET:-555}
limit() {  # a part's own limit, or what is left of the budget if less (at least 1 s: timeout 0 would mean none)
    local left=$(( BUDGET - SECONDS ))
    echo $(( $1 < left ? $1 : (left > 1 ? left : 1) ))
}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
# Not editable: setuptools' develop re-invokes pip with build isolation, which needs a registry.
python3 -m pip install -q --no-deps --no-build-isolation . || exit 1
if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index --upgrade benchmarks/wheels/*.whl || echo "wheels failed to install"
else
    echo "no wheels in benchmarks/wheels (make bench-wheels): peers skipped, training tests fail to import"
fi
# PYTHONSAFEPATH (python -P, inherited by pytest's workers): the repository's dico_scale/ (without kernels/src mapped
# in) must not shadow the installed package. --noconftest: tests/conftest.py's session fixtures need MLflow and
# open_clip's model configs, which this image lacks (the H100 run of 2026-12-06 stopped there).
PYTEST="env PYTHONSAFEPATH=1 python3 -m pytest -n 3 --noconftest -p no:cacheprovider -m gpu"
timeout -s INT -k 10 $(limit $T_TESTS) $PYTEST -v --durations=0 -o faulthandler_timeout=45 tests/test_gpu_kernels.py \
    tests/test_kernel_dico_loss.py 2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout -s INT -k 10 $(limit $T_TRAIN) $PYTEST -v --durations=0 tests/test_dico_stage.py tests/test_gpu.py 2>&1 \
    | tee "$OUT/gpu_training.txt"
train_rc=${PIPESTATUS[0]}
timeout -s INT -k 10 $(limit $T_VLM) python3 benchmarks/dico_step.py --config configs/smolvlm/dico.yaml \
    --captioners idefics3,idefics3:lora --hf-size 1024,4,16,224 --kernels auto --steps 8 --warmup 2 \
    --json "$OUT/vlm_step.json" 2>&1 | tee "$OUT/vlm_step.md"
vlm_rc=${PIPESTATUS[0]}
timeout -s INT -k 10 $(limit $T_BENCH) python3 benchmarks/kernel_bench.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.md"
bench_rc=${PIPESTATUS[0]}
timeout -s INT -k 10 $(limit $T_STEP) python3 benchmarks/dico_step.py --json "$OUT/dico_step.json" 2>&1 | tee "$OUT/dico_step.md"
step_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc training tests rc=$train_rc vlm step benchmark rc=$vlm_rc kernel benchmark rc=$bench_rc" \
    "step benchmark rc=$step_rc"
exit $(( tests_rc || bench_rc || step_rc || vlm_rc || train_rc ))
