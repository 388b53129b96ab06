"""The exit codes of dico_scale's entry points: one table, which slurm/launch.sh, slurm/torchrun.py and the README
follow. `python -m dico_scale.exit_codes` prints it as shell assignments (`eval "$(...)"` in launch.sh)."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

OK = 0
FAILED = 1  # an unexpected error (a traceback on stderr)
CONFIG_ERROR = 2  # bad config, file, checkpoint or CLI input; one line on stderr, before training starts
PREEMPTED = 3  # told to stop (preemption signal, SIGTERM, launcher gone): checkpoint saved, resume with train.resume=auto
DATA_ERROR = 4  # too much bad data (data.max_skipped_share); one line on stderr; not worth a requeue
INTERRUPTED = 130  # Ctrl-C twice (no checkpoint), or once outside the training steps; the shell's code for SIGINT

TABLE = {"OK": OK, "FAILED": FAILED, "CONFIG_ERROR": CONFIG_ERROR, "PREEMPTED": PREEMPTED, "DATA_ERROR": DATA_ERROR,
         "INTERRUPTED": INTERRUPTED}


def leave(code: int | None) -> NoReturn:
    """Exit with `code` once the atexit handlers have run (the tracker's sender, logging, worker processes) and the
    output is flushed, without the interpreter's teardown of torch, DeepSpeed and their extension modules: ~3 s per
    process on the 2-core machines, to free memory the OS frees anyway. For entry points that closed what they wrote."""
    import atexit
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said there
            pass
    os._exit(OK if code is None else int(code))


def leave_main(main: Callable[[], int | None], prog: str) -> NoReturn:
    """leave(main()) for a one-process entry point, a Ctrl-C in it (its imports of torch & co included) being one
    line and INTERRUPTED instead of a traceback. Not for train.py: its ranks handle SIGINT themselves (supervision)."""
    try:
        code = main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        code = INTERRUPTED
    leave(code)


def shell() -> str:
    return "\n".join(f"{name}_EXIT={code}" for name, code in TABLE.items())


if __name__ == "__main__":
    print(shell())
    sys.exit(OK)
