#!/usr/bin/env bash
# The one launcher the Slurm job scripts call (slurm/dico_8node.sh, xe_8node.sh, single_node.sh):
#
#   exec bash slurm/launch.sh [key=value ...]        (from the batch script, inside an allocation)
#
# In the batch shell it derives the rendezvous address, starts ONE task per node with srun, forwards the
# preemption signal to that job step and requeues the job when the trainer reports "preempted, checkpoint saved".
# Each node's task (this script again, with --node) starts torchrun there with one rank per GPU (or one CPU rank):
#
#   torchrun --nnodes $SLURM_JOB_NUM_NODES --nproc_per_node $GPUS_PER_NODE --rdzv_backend c10d \
#            --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT --rdzv_id $SLURM_JOB_ID \
#            dico_scale/train.py --config $CONFIG train.resume=auto [key=value ...]
#
# Knobs (environment; sbatch and srun pass the submitting shell's environment on, --export=ALL):
#   CONFIG          config file (required; the job scripts set a default)
#   GPUS_PER_NODE   ranks per node; default: the GPUs Slurm gave the step (SLURM_GPUS_ON_NODE), else
#                   `nvidia-smi -L | wc -l`, else 1 CPU rank (and DS_ACCELERATOR=cpu)
#   MASTER_PORT     rendezvous port on the first node; default 15000 + SLURM_JOB_ID % 20000
#   RESUME          passed first as train.resume=$RESUME (default auto; empty: nothing, the config's); a job this
#                   shell requeued after a preemption restarts with train.resume=auto last (its own
#                   newest checkpoint), whatever RESUME or the arguments say
#   PREEMPT_SIGNAL  the signal #SBATCH --signal=B:<SIG>@<secs> sends to this shell (default USR1); the trainer
#                   gets train.preempt_signal=SIG$PREEMPT_SIGNAL train.requeue_on_preempt=false (this shell requeues)
#   LOG_DIR         per-node logs, $LOG_DIR/<job name>-<job id>-node<i>-<host>.out (default logs)
#   RDZV_CONF       torchrun --rdzv_conf (default join_timeout=900,read_timeout=300)
#   SRUN_ARGS       extra srun options (word-split), e.g. "--cpu-bind=none"
#   PYTHON          the Python that has torch and dico_scale (default python3)
# Exit codes (dico_scale/exit_codes.py): the trainer's; PREEMPTED (3) from the ranks = "preempted, checkpoint
# saved" -> requeue, exit 0; DATA_ERROR (4) = too much bad data: not requeued, the job fails with it; CONFIG_ERROR (2).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
eval "$(cd "$ROOT" && "$PYTHON" -m dico_scale.exit_codes)"  # OK_EXIT, CONFIG_ERROR_EXIT, PREEMPTED_EXIT, ...
: "${PREEMPTED_EXIT:?launch.sh: $PYTHON cannot run dico_scale.exit_codes (set PYTHON to the Python with dico_scale)}"
PREEMPT_SIGNAL=${PREEMPT_SIGNAL:-USR1}
PREEMPT_SIGNAL=${PREEMPT_SIGNAL^^}
PREEMPT_SIGNAL=${PREEMPT_SIGNAL#SIG}
export PREEMPT_SIGNAL PYTHON

say() { echo "launch.sh: $*" >&2; }

node_task() {  # one per node, started by srun: torchrun with this node's ranks
    cd "$ROOT"
    local ngpu=0
    if [[ ${SLURM_GPUS_ON_NODE:-0} =~ ^[0-9]+$ ]] && (( ${SLURM_GPUS_ON_NODE:-0} > 0 )); then
        ngpu=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1; then
        ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if (( ngpu == 0 )); then
        export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}  # CPU-only node (train.py also sets it without CUDA)
    fi
    local nproc=${GPUS_PER_NODE:-$(( ngpu > 0 ? ngpu : 1 ))}
    local node_id=${SLURM_NODEID:-0}
    # The first node of the allocation (MASTER_ADDR) hosts the rendezvous store; saying so explicitly spares torch
    # from guessing it from host names (which fails when several Slurm nodes share one host, as in the tests).
    local is_host=$(( node_id == 0 ? 1 : 0 ))
    say "node ${SLURMD_NODENAME:-?} (node $node_id of $SLURM_JOB_NUM_NODES, host $(hostname)," \
        "task ${SLURM_PROCID:-?}): $nproc rank(s), ${ngpu} GPU(s)${DS_ACCELERATOR:+, DS_ACCELERATOR=$DS_ACCELERATOR}," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT"
    # exec: no shell stays behind that the preemption signal (delivered to every process of the step) could kill.
    exec "$PYTHON" "$ROOT/slurm/torchrun.py" \
        --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$nproc" \
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
        --rdzv_conf "${RDZV_CONF:-join_timeout=900,read_timeout=300},is_host=$is_host" --max_restarts 0 \
        dico_scale/train.py --config "$CONFIG" "$@"
}

if [[ ${1:-} == --node ]]; then
    shift
    node_task "$@"
fi

# ---- the batch shell
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    say "not inside a Slurm allocation: submit a job script, e.g. sbatch slurm/dico_8node.sh"
    exit "$CONFIG_ERROR_EXIT"
fi
if [[ -z ${CONFIG:-} ]]; then
    say "CONFIG is not set (e.g. CONFIG=configs/coco/dico.yaml sbatch slurm/single_node.sh)"
    exit "$CONFIG_ERROR_EXIT"
fi
cd "$ROOT"
if [[ -d $CONFIG ]]; then
    say "CONFIG=$CONFIG is a folder: name a config file in it (e.g. $CONFIG/dico.yaml)"
    exit "$CONFIG_ERROR_EXIT"
elif [[ ! -f $CONFIG ]]; then
    say "CONFIG=$CONFIG: no such file (relative paths are read from $ROOT)"
    exit "$CONFIG_ERROR_EXIT"
fi
# The knobs, now (one line, CONFIG_ERROR): torchrun on each node would fail on them with a traceback, and a bad
# signal name only once the trap is set
if [[ -n ${GPUS_PER_NODE:-} ]] && ! [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]]; then
    say "GPUS_PER_NODE=$GPUS_PER_NODE is not a number of ranks per node (>= 1; unset: the node's GPUs)"
    exit "$CONFIG_ERROR_EXIT"
fi
if [[ -n ${MASTER_PORT:-} ]] && ! { [[ $MASTER_PORT =~ ^[1-9][0-9]*$ ]] && (( MASTER_PORT <= 65535 )); }; then
    say "MASTER_PORT=$MASTER_PORT is not a port (1-65535; unset: 15000 + the job id % 20000)"
    exit "$CONFIG_ERROR_EXIT"
fi
if ! kill -l "$PREEMPT_SIGNAL" >/dev/null 2>&1 || [[ $PREEMPT_SIGNAL =~ ^[0-9]+$ ]]; then
    say "PREEMPT_SIGNAL=$PREEMPT_SIGNAL is not a signal name (USR1, the default; what #SBATCH --signal=B:<SIG> sends)"
    exit "$CONFIG_ERROR_EXIT"
fi
export SLURM_JOB_NUM_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
export MASTER_ADDR
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$(( 15000 + SLURM_JOB_ID % 20000 ))}
export CONFIG RDZV_CONF=${RDZV_CONF:-join_timeout=900,read_timeout=300}
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
LOG_DIR=${LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)

# Put first, so that the same keys given as arguments win. The trainer catches the same signal as this shell, and
# this shell, not rank 0, requeues the job: it sees how the whole job step ended.
overrides=("train.preempt_signal=SIG$PREEMPT_SIGNAL" "train.requeue_on_preempt=false")
RESUME=${RESUME-auto}
[[ -n $RESUME ]] && overrides=("train.resume=$RESUME" "${overrides[@]}")
# Written before this shell requeues a preempted job: its restart continues the job's newest complete checkpoint,
# after the arguments (a RESUME or train.resume of none, or another folder's tag, would start over, or be refused
# beside the checkpoints the job wrote)
REQUEUED="$LOG_DIR/.requeued-$SLURM_JOB_ID"
last=()
[[ -f $REQUEUED ]] && last=("train.resume=auto")

srun_args=(--nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1
           --kill-on-bad-exit=1 --export=ALL --open-mode=append --output="$LOG_DIR/%x-%j-node%n-%N.out")
# Slurm 22.05's srun does not inherit --cpus-per-task from the batch job: without this, task binding on
# clusters with task/affinity or cgroups would squeeze all of a node's ranks onto one CPU.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
read -r -a extra <<<"${SRUN_ARGS:-}"
srun_args+=("${extra[@]}")

say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST]," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT, CONFIG=$CONFIG, node logs $LOG_DIR/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID-node*.out"
say "overrides: ${overrides[*]} $* ${last[*]}"

srun_pid=
preempted=0
forward_signal() {
    preempted=1
    say "got SIG$PREEMPT_SIGNAL: forwarding it to the job step (every process of it, the ranks included)"
    [[ -n $srun_pid ]] && kill -s "$PREEMPT_SIGNAL" "$srun_pid" 2>/dev/null || true
}
trap forward_signal "$PREEMPT_SIGNAL"

# In the background, so that the trap runs while we wait (bash defers traps until a foreground child exits).
srun "${srun_args[@]}" bash "$ROOT/slurm/launch.sh" --node "${overrides[@]}" "$@" "${last[@]}" &
srun_pid=$!
while :; do
    rc=0
    wait "$srun_pid" || rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break  # still running: the wait was cut short by the trapped signal
done
trap - "$PREEMPT_SIGNAL"

if (( rc == PREEMPTED_EXIT )) || (( preempted && rc != 0 )); then
    # rc 3: the ranks saved a checkpoint and stopped (srun reports 143 when --kill-on-bad-exit ended one node's task
    # after the other's exit: its checkpoint was complete by then). A failure after the warning signal is treated
    # alike: the job is about to be killed anyway, and train.resume=auto restarts from the newest *complete*
    # checkpoint.
    say "preempted (exit $rc): requeueing job $SLURM_JOB_ID; it resumes from its newest complete checkpoint"
    touch "$REQUEUED"
    scontrol requeue "$SLURM_JOB_ID"
    exit "$OK_EXIT"
fi
rm -f "$REQUEUED"
say "job step finished with exit code $rc"
exit "$rc"
