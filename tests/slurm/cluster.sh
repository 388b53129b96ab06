#!/usr/bin/env bash
# A real Slurm 22.05 cluster of 2 emulated nodes (n1, n2) on this one machine, for tests/test_slurm.py.
#
#   tests/slurm/cluster.sh up       install slurm-wlm + munge when missing (apt), start munged, slurmctld and
#                                   one slurmd per node; returns once sinfo shows both nodes idle
#   tests/slurm/cluster.sh down     stop the daemons this script started (pid files under $STATE)
#   tests/slurm/cluster.sh status   sinfo + squeue
#
# Needs root (daemons, /etc/hosts, /etc/slurm/slurm.conf). Both nodes share the file system and 127.0.0.1, so
# n1 and n2 are added to /etc/hosts. Exit codes: 0 ok, 1 failure, 3 the packages could not be installed.
# It never overwrites a slurm.conf it did not write (the marker line below), so it is harmless on a real cluster
# machine: it refuses instead.
set -euo pipefail

STATE=${DICO_SLURM_STATE:-/run/dico-slurm-test}
CONF=/etc/slurm/slurm.conf
MARKER="# dico-scale local test cluster (tests/slurm/cluster.sh)"
NODES=(n1 n2)
HOST=$(hostname -s 2>/dev/null || hostname)
CPUS=${DICO_SLURM_CPUS:-$(nproc)}
UP_TIMEOUT=${DICO_SLURM_UP_TIMEOUT:-60}

log() { echo "cluster.sh: $*" >&2; }

need_root() {
    [[ $(id -u) -eq 0 ]] || { log "must run as root"; exit 1; }
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    log "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >&2; then
        log "apt-get could not install slurm-wlm/munge"
        exit 3
    fi
}

start_munge() {
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        elif command -v create-munge-key >/dev/null; then
            create-munge-key -f
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already answering (ours from an earlier `up`, or the system's)
    fi
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || pgrep -u munge -x munged | head -n1 > "$STATE/munged.pid"
            return 0
        fi
        sleep 0.1
    done
    log "munged did not start (see /var/log/munge/munged.log)"
    exit 1
}

add_hosts() {
    local n
    for n in "${NODES[@]}"; do
        grep -Eq "^[[:space:]]*127\.0\.0\.1([[:space:]].*)?[[:space:]]$n([[:space:]]|\$)" /etc/hosts \
            || echo "127.0.0.1 $n  # dico-scale test cluster" >> /etc/hosts
    done
}

write_conf() {
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        log "$CONF exists and was not written by this script: refusing to replace it"
        exit 1
    fi
    mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm
    local n
    for n in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd/$n"; done
    # MinJobAge=0 (records never purged): `sbatch --wait` then polls every 2 s; it waits 2, 8, 32, 32... s between
    # polls while MinJobAge/3 allows, so a 12 s job took 42 s to be seen finished.
    cat > "$CONF" <<CONF
$MARKER
ClusterName=dicotest
SlurmctldHost=$HOST
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
# CPUs are the consumable resource; memory is not tracked, so no job is rejected for memory.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdLogFile=/var/log/slurm/slurmd.%n.log
SlurmdPidFile=$STATE/slurmd.%n.pid
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=0
SchedulerType=sched/backfill
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

both_idle() {
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mix|alloc)\$" <<<"$states" || return 1
    done
}

up() {
    need_root
    install_packages
    mkdir -p "$STATE"
    start_munge
    add_hosts
    write_conf
    alive "$STATE/slurmctld.pid" || slurmctld
    local n
    for n in "${NODES[@]}"; do
        alive "$STATE/slurmd.$n.pid" || slurmd -N "$n"
    done
    local t0=$SECONDS
    until both_idle; do
        if (( SECONDS - t0 > UP_TIMEOUT )); then
            log "nodes not idle after ${UP_TIMEOUT}s:"; sinfo -N >&2 || true
            tail -n 20 /var/log/slurm/slurmctld.log >&2 || true
            exit 1
        fi
        # nodes left DOWN by an earlier run come back once their slurmd is up again
        scontrol update NodeName=n[1-2] State=RESUME >/dev/null 2>&1 || true
        sleep 1
    done
    sinfo -N
}

stop_pids() {  # stop_pids PIDFILE...: TERM to all at once, then KILL what is left after 10 s; only processes this
    local f pid pids=()  # script recorded (each daemon takes ~2 s to stop: at once, not one after the other)
    for f in "$@"; do
        [[ -s $f ]] && pid=$(cat "$f") && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$f"
    done
    for _ in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        (( alive )) || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

down() {
    need_root
    stop_pids "$STATE"/slurmd.*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"
}

status() {
    sinfo -N && squeue
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
