"""Ctrl-C in the one-process entry points (evaluate, caption): one line on stderr and exit 130, never a traceback nor a
hang. pycocoevalcap's Meteor, interrupted inside compute_score, kept its lock, and its __del__ then waited on that lock
forever (a zombie java beside it). Real processes, a real java METEOR, real signals to the whole process group."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def model(tiny_xe) -> Path:
    return tiny_xe


def _start(args: list[str]) -> subprocess.Popen:
    """`python -m args` in a session of its own: its process group is what a terminal's Ctrl-C signals. SIGINT as a
    terminal's foreground job has it: a suite started in the background (`make test &`) inherits SIGINT ignored, and
    Python then installs no KeyboardInterrupt for it."""
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=ENV, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_until(proc: subprocess.Popen, found, timeout: float, what: str):
    """found()'s first truthy value, polled while proc runs."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if value := found():
            return value
        time.sleep(0.02)
    out, err = proc.communicate() if proc.poll() is not None else ("", "")
    raise AssertionError(f"no {what} (exit {proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")


def _child_running(pid: int, marker: str):
    """pid's descendant whose command line holds `marker`, or None."""
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # exited meanwhile, or a zombie
            if any(marker in a for a in child.cmdline()):
                return child
    return None


def _ctrl_c(proc: subprocess.Popen, timeout: float = 20) -> tuple[str, str, float]:
    """SIGINT to proc's process group; (stdout, stderr, seconds until it exited). A hang fails, and is killed."""
    start = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"still running {timeout} s after Ctrl-C") from None
    return out, err, time.time() - start


def _alive(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    return False


def test_ctrl_c_during_meteor_exits_130_at_once_with_one_line(model, tmp_path):
    out_json = tmp_path / "eval.json"
    proc = _start(["dico_scale.evaluate", "--checkpoint", str(model), "--no-spice", "--train-shards", "none",
                   "--out", str(out_json), "tracking.enabled=false"])
    try:
        java = _wait_until(proc, lambda: _child_running(proc.pid, "meteor-1.5.jar"), 180, "METEOR java child")
        time.sleep(0.5)  # inside Meteor.compute_score, waiting for the jvm (which takes ~10 s to answer)
        assert proc.poll() is None and _alive(java)
        out, err, took = _ctrl_c(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and took < 5, (proc.returncode, took, err[-3000:])
    assert err.strip().splitlines()[-1] == "dico_scale.evaluate: interrupted (Ctrl-C)", err[-3000:]
    assert "Traceback" not in err and err.count("dico_scale") == 1, err[-3000:]  # java's PTBTokenizer lines aside
    assert not out_json.exists()
    psutil.wait_procs([java], timeout=5)
    assert not _alive(java)


def test_ctrl_c_while_captioning_exits_130_with_one_line(model, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(200):  # far more than are captioned before the signal lands
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
    proc = _start(["dico_scale.caption", "--checkpoint", str(model), str(tmp_path), "--batch-size", "1"])
    try:
        first = proc.stdout.readline()  # one caption out: it is captioning
        assert first.startswith(str(tmp_path / "000.png")), first + proc.stderr.read()[-3000:]
        out, err, _ = _ctrl_c(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip() == "dico_scale.caption: interrupted (Ctrl-C)", err[-3000:]
    assert len(out.splitlines()) < 199


@pytest.mark.parametrize("entry", ["dico_scale.evaluate", "dico_scale.caption", "dico_scale.export",
                                   "dico_scale.convert"])
def test_ctrl_c_while_importing_torch_exits_130_with_one_line(entry, model, tmp_path):
    """The signal lands while torch loads (its library mapped, its import a second or more from done)."""
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    args = {"dico_scale.evaluate": [entry, "--checkpoint", str(model), "--out", str(tmp_path / "eval.json")],
            "dico_scale.caption": [entry, "--checkpoint", str(model), str(tmp_path)],
            "dico_scale.export": [entry, "--checkpoint", str(model), "--out", str(tmp_path / "m.safetensors"),
                                  "--format", "safetensors"],
            "dico_scale.convert": [entry, "dico-ref", str(tmp_path), "--out", str(tmp_path.parent / "ref.pt")]}
    proc = _start(args[entry])

    def loading_torch():
        with contextlib.suppress(psutil.Error):
            return any("libtorch" in m.path for m in psutil.Process(proc.pid).memory_maps())

    try:
        _wait_until(proc, loading_torch, 60, "torch loading")
        out, err, _ = _ctrl_c(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and err.strip() == f"{entry}: interrupted (Ctrl-C)", (proc.returncode, err[-3000:])
