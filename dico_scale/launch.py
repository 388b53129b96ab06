"""Training a stage as a child process under torchrun, with `ranks` processes (CPU ranks, or one per GPU where the
run's train.device trains on GPUs): what the demo and `compare` run for each of their stages. The child is the real
trainer (dico_scale/train.py), so these runs are what a user's runs are."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from .config import REPO_ROOT
from .exit_codes import CONFIG_ERROR, DATA_ERROR

# How the caller's command continues a stage that stopped (`again`), for the trainer to say in place of its own
# "train.resume=auto": the demo and compare set train.resume themselves and refuse it as an override.
CONTINUE = "DICO_SCALE_CONTINUE"


def demo_config(stage: str) -> str:
    return os.path.join(REPO_ROOT, "configs", "demo", f"{stage}.yaml")


def free_port() -> int:
    """A port nobody listens on now: two demos (or tests) on one machine must not share deepspeed's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_stage(stage: str, ranks: int, overrides: list[str], config: str | None = None,
                prog: str = "dico_scale.demo", name: str | None = None, again: str = "") -> None:
    """One stage under torchrun with `ranks` ranks; SystemExit naming it when it fails (with the trainer's code when
    it refused its input or data: its one line is above). `again`: how the caller's command continues after a
    Ctrl-C (said once the stage's ranks have stopped)."""
    # torchrun (slurm/torchrun.py: the trainer's exit codes pass through), not the deepspeed runner: the runner and
    # its launch.py child each import DeepSpeed before any rank starts (~7 s a stage here); the ranks are the same.
    cmd = [sys.executable, os.path.join(REPO_ROOT, "slurm", "torchrun.py"), "--nproc_per_node", str(ranks),
           "--master_port", str(free_port()), os.path.join(REPO_ROOT, "dico_scale", "train.py"),
           "--config", config or demo_config(stage), *overrides]
    # the cores (this process's affinity) shared by the ranks, set here: torchrun would set 1 and print a banner
    # about it; one the caller set is kept (the ranks take it, engine.cpu_threads). The device is the run's
    # train.device (the trainer picks DeepSpeed's accelerator from it): the demo's configs say cpu, a run of
    # another config on a GPU node trains on its GPUs, one per rank.
    env = {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // ranks)), **os.environ,
           **({CONTINUE: again} if again else {})}
    name = name or stage
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        wait_for_ranks(proc, prog, name, again)
        raise
    if code in (CONFIG_ERROR, DATA_ERROR):  # every rank stopped on the same one line, printed above
        print(f"{prog}: stage {name} stopped with exit code {code} (its error is above)", file=sys.stderr, flush=True)
        raise SystemExit(code)
    if code != 0:
        raise SystemExit(f"{prog}: stage {name} failed with exit code {code} (its output is above)")
    print(f"=== {name} done in {time.time() - start:.0f} s", flush=True)


def wait_for_ranks(torchrun: subprocess.Popen, prog: str, name: str, again: str) -> None:
    """After a Ctrl-C: the terminal's reached the ranks too (one process group), which save a checkpoint after their
    step and stop; one sent to this process alone reaches them through their launcher watchdog once torchrun is
    gone. torchrun goes now (its own shutdown would kill the ranks 30 s after telling them to stop, mid-checkpoint),
    and this process returns only once the ranks are gone: what continues the run must find their checkpoint, not a
    rank still writing it. Ctrl-C again stops the waiting (the ranks got it too: they exit at once)."""
    import psutil

    try:
        ranks = psutil.Process(torchrun.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ranks = []
    torchrun.kill()
    torchrun.wait()
    if live := [r for r in ranks if r.is_running()]:
        print(f"{prog}: Ctrl-C: waiting for {name}'s ranks to save a checkpoint and stop (Ctrl-C again: at once, "
              "without one)", file=sys.stderr, flush=True)
        psutil.wait_procs(live)
    if again:
        print(f"{prog}: {name} stopped; {again}", file=sys.stderr, flush=True)
