#!/bin/bash
# Cross-entropy (XE) stage on 8 nodes x 8 GPUs (torchrun, one launcher per node: slurm/launch.sh).
#   sbatch slurm/xe_8node.sh [key=value ...]            (from the repository root; mkdir -p logs first)
#   CONFIG=configs/demo/xe.yaml sbatch slurm/xe_8node.sh train.max_steps=100
# Edit the #SBATCH lines for your cluster (CPUs, time limit, partition/account); see docs/operations.md.
#SBATCH --job-name=xe
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
##SBATCH --time=24:00:00
##SBATCH --partition=gpu
##SBATCH --account=myproject
##SBATCH --exclusive
##SBATCH --mem=0

export CONFIG=${CONFIG:-configs/coco/xe.yaml}
# This copy of the script runs from Slurm's spool directory: find the repository (DICO_ROOT, the submission
# directory, or the folder the submitted script came from).
ROOT=${DICO_ROOT:-${SLURM_SUBMIT_DIR:-.}}
if [[ ! -f $ROOT/slurm/launch.sh ]]; then
    script=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
    ROOT=$(cd "$(dirname "$script")/.." 2>/dev/null && pwd) || ROOT=.
fi
if [[ ! -f $ROOT/slurm/launch.sh ]]; then
    echo "xe_8node.sh: cannot find the dico-scale repository: submit from it or set DICO_ROOT" >&2
    exit 2  # CONFIG_ERROR (dico_scale/exit_codes.py: not importable before the repository is found)
fi
cd "$ROOT"
exec bash slurm/launch.sh "$@"
