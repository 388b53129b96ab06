"""Ranks never outlive their launcher, and two runs never share an output directory (2 real DeepSpeed CPU ranks)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import launch_xe, wait_for, xe_args

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parent.parent


# SIGUSR1 through the launcher is Slurm's --signal: test_slurm's preempted job sends it.
@pytest.mark.parametrize("sig,target", [(signal.SIGTERM, "launcher"), (signal.SIGTERM, "ranks")],
                         ids=["TERM-launcher", "TERM-ranks"])
def test_signal_to_the_launcher_alone_checkpoints_and_stops_every_rank(tmp_path, sig, target):
    """The launcher's PID alone (a supervisor, a container runtime) or SIGTERM forwarded to the ranks (torchrun)."""
    from mlflow.tracking import MlflowClient  # here, not above: mp.spawn's ranks below import this module

    out, db, log = tmp_path / "xe", tmp_path / "mlflow.db", tmp_path / "launcher.log"
    launcher, tree = launch_xe(tmp_path, out, log)
    try:
        ranks = [p for p in tree if "--local_rank" in " ".join(p.cmdline())]
        assert len(ranks) == 2, [p.cmdline() for p in tree]

        if target == "launcher" and sig == signal.SIGTERM:  # a second run on the same output directory fails in seconds, with one line
            start = time.time()
            second = subprocess.run([sys.executable, "dico_scale/train.py", *xe_args(tmp_path, out)], cwd=REPO,
                                    capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr[-3000:]
            line = second.stderr.strip().splitlines()[-1]
            assert line.startswith(f"dico_scale: config error: train.output_dir '{out}' is in use by another run "
                                   f"(pid {ranks_pid0(ranks)} on "), line
            assert line.endswith("wait for it to end or choose another train.output_dir")
            assert time.time() - start < 60

        if target == "launcher":
            os.kill(launcher.pid, sig)  # the launcher's PID only, as a supervisor or container runtime does
            launcher.wait(timeout=30)
        else:
            for rank in ranks:
                os.kill(rank.pid, sig)
            assert launcher.wait(timeout=300) == 3  # PREEMPTED, passed on by deepspeed's launch.py and runner
        wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 120,
                 "every rank and launch.py to exit")
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
        for p in psutil.Process(os.getpid()).children(recursive=True):
            if "--local_rank" in " ".join(p.cmdline()):
                p.kill()
    text = log.read_text()
    tags = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "complete").is_file())
    assert tags, f"no complete checkpoint after the stop:\n{text[-3000:]}"
    reason = "the launcher is gone" if target == "launcher" else "SIGTERM"
    # rank 0's line names why, whichever rank saw it
    stopping = [l for l in text.splitlines() if "stopping at step" in l]
    assert stopping and all(f": {reason}" in l for l in stopping), text[-3000:]
    assert "preempted: checkpoint saved at step" in text, text[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id])
    assert run.info.status == "KILLED"  # preempted: a resume sets it back to RUNNING
    assert int(tags[-1].name.split("_")[1]) >= 2


def ranks_pid0(ranks) -> int:
    """The pid of local rank 0, which holds the output directory's lock."""
    return next(p.pid for p in ranks if "--local_rank=0" in p.cmdline())


def _agree(rank: int, init: str, out: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    from dico_scale.supervision import StopFlag

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    flag = StopFlag("", timeout_s=120)
    before = flag.agreed_reason(torch.device("cpu"))
    if rank == 1:  # only rank 1's watchdog has seen it yet
        flag.request("the launcher is gone (test)")
    after = flag.agreed_reason(torch.device("cpu"))
    flag.close()
    Path(out, f"{rank}.json").write_text(json.dumps([before, after]))
    dist.destroy_process_group()


def test_every_rank_agrees_on_the_stop_and_learns_the_reason_of_the_rank_that_saw_it(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_agree, args=(f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [None, "the launcher is gone (test) (rank 1)"]
