"""Small helpers shared by tests (pytest puts tests/ on sys.path)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ok(proc):
    """The finished process, or a failure showing the tail of what it printed."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def poison_empty(monkeypatch) -> None:
    """torch.empty / empty_like hand out NaN (floats) or huge (ints) buffers, so an element a kernel never writes shows."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(2**30)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k)))


def demo_overrides(tmp: Path) -> list[str]:
    """A small synthetic data set under tmp and an MLflow store there: the overrides of the 2-rank runs."""
    return [f"data.root={tmp}/data", f"tracking.uri=sqlite:///{tmp}/mlflow.db", "data.synthetic.n_train=200",
            "data.synthetic.n_val=12", "data.synthetic.n_test=12", "data.synthetic.samples_per_shard=50",
            "train.log_every=1", "data.samples_per_epoch=64", "data.shuffle_buffer=50"]


def ranks_cmd(script: str, ranks: int = 2) -> list[str]:
    """`script` on `ranks` CPU ranks under torchrun (slurm/torchrun.py: the trainer's exit codes pass through), on a
    free port. The deepspeed runner and its launch.py child would import DeepSpeed twice before any rank starts (12-25
    s a launch here); test_supervision and the SIGUSR1 test in test_distributed keep it, where its own behaviour is
    what they check."""
    if ranks == 1:  # a plain process: the trainer sets RANK & co itself
        return [sys.executable, script]
    return [sys.executable, "slurm/torchrun.py", "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
            script]


def launch(script: str, config: str, overrides: list[str], timeout=600, ranks: int = 2, **kw):
    """`script --config config overrides` on 2 CPU ranks, from the repository; the finished process."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*ranks_cmd(script, ranks), "--config", config, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def kill_at(config: str, overrides: list[str], marker: Path, timeout: float = 300) -> None:
    """Trains with 2 ranks (torchrun) until `marker` exists, then SIGKILLs the whole job (launcher and ranks, no clean-up)."""
    cmd = [*ranks_cmd("dico_scale/train.py"), "--config", config, *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), f"no {marker} before the deadline"
