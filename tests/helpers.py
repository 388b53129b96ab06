"""Small helpers shared by tests (pytest puts tests/ on sys.path)."""
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dico_scale.launch import free_port  # one free-port helper for the product and the tests

REPO = Path(__file__).resolve().parent.parent


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


MLFLOW_TEMPLATE = "DICO_SCALE_TEST_MLFLOW_TEMPLATE"  # the variable conftest sets to an empty store's file


def mlflow_uri(db: str | Path) -> str:
    """The sqlite URI of `db`. A missing `db` starts as a copy of the session's empty store (conftest makes it once):
    a new sqlite store spends ~1.1 s creating MLflow's tables, at the start of every run that would make one."""
    template = os.environ.get(MLFLOW_TEMPLATE)
    db = Path(db)
    if template and not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db)
    return f"sqlite:///{db}"


def demo_overrides(tmp: Path) -> list[str]:
    """A small synthetic data set under tmp and an MLflow store there: the overrides of the 2-rank runs."""
    return [f"data.root={tmp}/data", f"tracking.uri={mlflow_uri(tmp / 'mlflow.db')}", "data.synthetic.n_train=200",
            "data.synthetic.n_val=12", "data.synthetic.n_test=12", "data.synthetic.samples_per_shard=50",
            "train.log_every=1", "data.samples_per_epoch=64", "data.shuffle_buffer=50"]


def ranks_cmd(script: str, ranks: int = 2) -> list[str]:
    """`script` on `ranks` CPU ranks under torchrun (slurm/torchrun.py: the trainer's exit codes pass through), on a
    free port. The deepspeed runner and its launch.py child would import DeepSpeed twice before any rank starts (~7 s
    more a launch here); test_supervision and test_ctrl_c keep it, where its own behaviour is what they check."""
    if ranks == 1:  # a plain process: the trainer sets RANK & co itself
        return [sys.executable, script]
    return [sys.executable, "slurm/torchrun.py", "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
            script]


def launch(script: str, config: str, overrides: list[str], timeout=600, ranks: int = 2, env: dict | None = None,
           **kw):
    """`script --config config overrides` on 2 CPU ranks, from the repository, `env` added; the finished process."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([*ranks_cmd(script, ranks), "--config", config, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def kill_at(config: str, overrides: list[str], marker: Path, timeout: float = 300) -> None:
    """Trains with 2 ranks (torchrun) until `marker` exists, then SIGKILLs the whole job (launcher and ranks, no clean-up)."""
    cmd = [*ranks_cmd("dico_scale/train.py"), "--config", config, *overrides]
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if proc.poll() is not None and not marker.exists():  # the job failed by itself: its output says why
        log.seek(0)
        raise AssertionError(f"the job exited ({proc.returncode}) before {marker}:\n{log.read()[-4000:]}")
    # torchrun starts each rank in a session of its own: killing the launcher's group would leave them training
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=60)
    proc.wait()
    assert marker.exists(), f"no {marker} before the deadline"


def xe_args(tmp: Path, out: Path) -> list[str]:
    """A small 1-or-2-rank xe run that trains until it is stopped (no weights files, no validation, no saves)."""
    return ["--config", "configs/demo/xe.yaml", f"data.root={tmp}/data", f"tracking.uri={mlflow_uri(tmp / 'mlflow.db')}",
            "data.synthetic.n_train=100", "data.synthetic.n_val=8", "data.synthetic.n_test=8",
            "data.synthetic.samples_per_shard=25", "data.samples_per_epoch=32", "data.shuffle_buffer=10",
            "train.micro_batch_size=2", "train.log_every=1", "train.val_every=0", "train.save_every=1000",
            "train.max_steps=100000", "evaluator.weights=", "captioner.image_encoder_weights=",
            f"train.output_dir={out}"]


def steps_logged(db: Path) -> int:
    """Training steps whose loss is in the run's sqlite store."""
    try:
        with sqlite3.connect(db) as c:
            return c.execute("select count(distinct step) from metrics where key='train/loss'").fetchone()[0]
    except sqlite3.Error:
        return 0


def wait_for(cond, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def launch_xe(tmp: Path, out: Path, log: Path):
    """xe_args on 2 CPU ranks under `deepspeed`, in a session of its own, printing into `log` (a file, not a pipe
    nobody reads: the ranks must never block on it). Returns once 2 steps are logged: (launcher, its processes)."""
    import psutil

    with open(log, "w") as f:
        launcher = subprocess.Popen(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                                     "dico_scale/train.py", *xe_args(tmp, out)], cwd=REPO, start_new_session=True,
                                    env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"},
                                    stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: steps_logged(tmp / "mlflow.db") >= 2, 300, "2 training steps")
    except BaseException:
        os.killpg(launcher.pid, signal.SIGKILL)
        raise
    return launcher, psutil.Process(launcher.pid).children(recursive=True)


def caption_with_specials_as_text(tok, caption_decodes: bool = True) -> None:
    """A Hugging Face row's tokenizer (HFTokenizer) on a reference caption with its model's special tokens written
    in it (web text can hold "<image>" or "<|endoftext|>"): characters, so no image token or end of turn inside the
    XE target, EOS only at its end; and (byte-level BPE) it decodes back to the caption."""
    added = [t.content for t in tok.tok.added_tokens_decoder.values() if t.special]  # not PaliGemma's <loc0000>s
    specials = sorted({t for t in tok.tok.all_special_tokens + added if t.strip()})
    caption = "a sign reading " + " ".join(specials)
    row = tok.batch([caption], 4000)[0].tolist()  # one row: [BOS, w..., EOS], no padding
    assert len(row) < 4000 and row[-1] == tok.eos and tok.eos not in row[1:-1]
    assert not set(row[1:-1]) & set(tok.tok.convert_tokens_to_ids(specials))
    assert not caption_decodes or tok.decode(row) == caption

