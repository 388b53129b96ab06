"""What keeps a run from outliving its launcher or sharing its output directory.

- StopFlag: the preemption signal, SIGTERM, a first Ctrl-C (SIGINT) and the death of the launcher (the `deepspeed`
  runner, its `deepspeed.launcher.launch` child, torchrun) all ask the ranks to checkpoint at the next step and stop;
  a rank that has not exited stop_timeout_s later exits anyway; a second Ctrl-C exits at once. The `deepspeed`
  runner dies of SIGTERM or SIGUSR1 without telling its children, so the ranks watch it themselves.
- OutputDirLock: rank 0 holds an flock on <output_dir>/.lock for the whole run; the kernel drops it when the process
  dies (even of SIGKILL), so a lock left by a crash never blocks a resume.
"""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import ConfigError
from .exit_codes import FAILED, INTERRUPTED

LAUNCHER_MARKERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torchrun", "bin/deepspeed",
                    "slurm/torchrun.py")
_launchers: list[tuple[int, str, str]] | None = None  # (pid, start time, what) recorded at process start
# A SIGINT this soon after the first is the same Ctrl-C: a terminal signals the whole process group, and a launcher
# (torchrun) forwards it to the ranks at once as well.
SAME_CTRL_C_S = 0.5


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, start time, state) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name in parentheses may hold spaces
    return int(fields[1]), fields[19], fields[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def record_launchers() -> list[tuple[int, str, str]]:
    """The chain of launcher processes above this one (parent first), read once at start: once the runner has
    died, the chain can no longer be read from /proc."""
    global _launchers
    if _launchers is None:
        _launchers, pid = [], os.getppid()
        while pid > 1 and (info := _stat(pid)) is not None:
            cmd = _cmdline(pid)
            if not any(m in cmd for m in LAUNCHER_MARKERS):
                break
            _launchers.append((pid, info[1], cmd[:80]))
            pid = info[0]
    return _launchers


def _alive(pid: int, start: str) -> bool:
    info = _stat(pid)
    return info is not None and info[1] == start and info[2] not in ("Z", "X")  # same process, not a zombie


def _say(line: str) -> None:
    """One write: several ranks may share the launcher's pipe."""
    sys.stderr.write(f"dico_scale: {line}\n")
    sys.stderr.flush()


class StopFlag:
    """Set by a signal handler or the launcher watchdog, which do nothing else (saving inside a handler has hung
    trainers). The loop reads it after each optimizer step; the ranks agree on it so they all checkpoint together."""

    def __init__(self, preempt_signal: str, timeout_s: float, watch_every_s: float = 1.0, before_exit=None):
        """before_exit: called just before a rank exits without a checkpoint (the tracker keeps its queue)."""
        self.raised, self.reason, self.timeout_s = False, "", timeout_s
        self._before_exit = before_exit or (lambda: None)
        self._deadline: threading.Timer | None = None
        self._closed = threading.Event()
        self._previous, self._first_ctrl_c = {}, None
        for name in {preempt_signal, "SIGTERM", "SIGINT"} - {""}:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._handler)
        launchers = record_launchers()
        if launchers:
            threading.Thread(target=self._watch, args=(launchers, watch_every_s), daemon=True,
                             name="launcher-watchdog").start()

    def request(self, reason: str) -> None:
        if self.raised:
            return
        self.raised, self.reason = True, reason
        self._deadline = threading.Timer(self.timeout_s, self._give_up)
        self._deadline.daemon = True
        self._deadline.start()

    def _handler(self, signum, frame):
        # A repeated signal changes nothing: a signal sent to the process group reaches the ranks, and then
        # deepspeed's launch.py forwards it to them once more at once. Ctrl-C pressed again does.
        if signum == signal.SIGINT:
            self._ctrl_c()
        self.request(signal.Signals(signum).name)

    def _ctrl_c(self) -> None:
        now, first = time.monotonic(), self._first_ctrl_c
        if first is None:
            self._first_ctrl_c = now
            if os.environ.get("RANK", "0") == "0":
                _say("Ctrl-C: stopping with a checkpoint after this step (Ctrl-C again to exit at once without one)")
        elif now - first > SAME_CTRL_C_S:
            _say("Ctrl-C again: exiting now, without a checkpoint")
            self._before_exit()
            os._exit(INTERRUPTED)  # no traceback, no waiting for collectives the other ranks may never enter

    def _watch(self, launchers, every: float) -> None:
        while not self._closed.wait(every):
            gone = next((what for pid, start, what in launchers if not _alive(pid, start)), None)
            if gone:
                self.request(f"the launcher is gone ({gone})")
                return

    def _give_up(self) -> None:
        _say(f"asked to stop ({self.reason}) {self.timeout_s:g} s ago and not done: exiting without a checkpoint "
             "(train.stop_timeout_s)")
        self._before_exit()
        os._exit(FAILED)

    def agreed_reason(self, device) -> str | None:
        """A collective: None while no rank was asked to stop, else why (the lowest such rank's reason). A rank's
        watchdog may see the launcher gone a second after another's, so rank 0 alone would often not know why."""
        flag = torch.tensor([float(self.raised)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return None
        reasons = [""] * dist.get_world_size()
        dist.all_gather_object(reasons, self.reason)
        rank, reason = next(((r, why) for r, why in enumerate(reasons) if why), (0, "another rank was asked to stop"))
        return reason if rank == 0 else f"{reason} (rank {rank})"

    def close(self) -> None:
        """The run is over (returned or raised): the handlers as they were, the watchdog stopped. The deadline stays
        armed while a stop is in progress, so a rank stuck on its way out still exits."""
        self._closed.set()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class OutputDirLock:
    """An exclusive flock on <output_dir>/.lock; the file names the holder for the error a second run gets."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"train.output_dir '{self.path.parent}': cannot create its lock file ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            raise ConfigError(f"train.output_dir '{self.path.parent}' is in use by another run ({holder}): wait for "
                              "it to end or choose another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (removing it would race a new holder)
            self.fd = None
