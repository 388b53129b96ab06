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


def demo_config(stage: str) -> str:
    return os.path.join(REPO_ROOT, "configs", "demo", f"{stage}.yaml")


def free_port() -> int:
    """A port nobody listens on now: two demos (or tests) on one machine must not share deepspeed's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_stage(stage: str, ranks: int, overrides: list[str], config: str | None = None,
                prog: str = "dico_scale.demo", name: str | None = None) -> None:
    """One stage under torchrun with `ranks` ranks; SystemExit naming it when it fails."""
    # torchrun (slurm/torchrun.py: the trainer's exit codes pass through), not the deepspeed runner: the runner and
    # its launch.py child each import DeepSpeed before any rank starts (~7 s a stage here); the ranks are the same.
    cmd = [sys.executable, os.path.join(REPO_ROOT, "slurm", "torchrun.py"), "--nproc_per_node", str(ranks),
           "--master_port", str(free_port()), os.path.join(REPO_ROOT, "dico_scale", "train.py"),
           "--config", config or demo_config(stage), *overrides]
    # the cores (this process's affinity) shared by the ranks, set here: torchrun would set 1 and print a banner
    # about it; one the caller set is kept (the ranks take it, engine.cpu_threads). The device is the run's
    # train.device (the trainer picks DeepSpeed's accelerator from it): the demo's configs say cpu, a run of
    # another config on a GPU node trains on its GPUs, one per rank.
    env = {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // ranks)), **os.environ}
    name = name or stage
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise SystemExit(f"{prog}: stage {name} failed with exit code {code} (its output is above)")
    print(f"=== {name} done in {time.time() - start:.0f} s", flush=True)
