"""Training a stage as a child process under the deepspeed launcher, with CPU ranks: what the demo and `compare`
run for each of their stages. The child is the real trainer (dico_scale/train.py), so these runs are what a user's
runs are."""
from __future__ import annotations

import os
import socket
import subprocess
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
    """One stage under the deepspeed launcher with `ranks` CPU ranks; SystemExit naming it when it fails."""
    # --log_level warning: the launcher's INFO lines (world info, each rank's command) are not for a person
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), "--log_level", "warning",
           os.path.join(REPO_ROOT, "dico_scale", "train.py"), "--config", config or demo_config(stage), *overrides]
    name = name or stage
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    code = subprocess.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"}).returncode
    if code != 0:
        raise SystemExit(f"{prog}: stage {name} failed with exit code {code} (its output is above)")
    print(f"=== {name} done in {time.time() - start:.0f} s", flush=True)
