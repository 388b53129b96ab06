#!/usr/bin/env bash
# A fresh install's first start: a 2-rank xe run of one step (torchrun, the demo's configs, tiny data, tracking off)
# with an empty TORCH_EXTENSIONS_DIR, from CHECKOUT (default: this one). Prints the wall time and what was compiled.
# Alternate two checkouts on one machine to compare them: benchmarks/first_start.sh /tmp/old; benchmarks/first_start.sh
set -euo pipefail
ROOT=$(cd "${1:-$(dirname "$0")/..}" && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"
port=$("$PYTHON" -c 'from dico_scale.launch import free_port; print(free_port())')
start=$(date +%s.%N)
DS_ACCELERATOR=cpu PYTHONPATH=$ROOT TORCH_EXTENSIONS_DIR=$WORK/ext "$PYTHON" slurm/torchrun.py --nproc_per_node 2 \
    --master_port "$port" dico_scale/train.py \
    --config configs/demo/xe.yaml "data.root=$WORK/data" tracking.enabled=false data.synthetic.n_train=100 \
    data.synthetic.n_val=6 data.synthetic.n_test=4 data.synthetic.samples_per_shard=25 data.samples_per_epoch=32 \
    data.shuffle_buffer=20 evaluator.weights= captioner.image_encoder_weights= train.micro_batch_size=2 \
    "train.output_dir=$WORK/out" train.max_steps=1 train.validate_at_end=false > "$WORK/log" 2>&1 \
    || { tail -20 "$WORK/log"; exit 1; }
end=$(date +%s.%N)
built=$(ls "$WORK/ext" 2>/dev/null | tr '\n' ' ' || true)
echo "$(git rev-parse --short HEAD): first start $("$PYTHON" -c "print(f'{$end - $start:.1f}')") s, compiled: ${built:-nothing}"
