"""The exit codes of dico_scale's entry points: one table, which slurm/launch.sh, slurm/torchrun.py and the README
follow. `python -m dico_scale.exit_codes` prints it as shell assignments (`eval "$(...)"` in launch.sh)."""
from __future__ import annotations

import sys

OK = 0
FAILED = 1  # an unexpected error (a traceback on stderr)
CONFIG_ERROR = 2  # bad config, file, checkpoint or CLI input; one line on stderr, before training starts
PREEMPTED = 3  # told to stop (preemption signal, SIGTERM, launcher gone): checkpoint saved, resume with train.resume=auto
DATA_ERROR = 4  # too much bad data (data.max_skipped_share); one line on stderr; not worth a requeue
INTERRUPTED = 130  # Ctrl-C twice (no checkpoint), or once outside the training steps; the shell's code for SIGINT

TABLE = {"OK": OK, "FAILED": FAILED, "CONFIG_ERROR": CONFIG_ERROR, "PREEMPTED": PREEMPTED, "DATA_ERROR": DATA_ERROR,
         "INTERRUPTED": INTERRUPTED}


def shell() -> str:
    return "\n".join(f"{name}_EXIT={code}" for name, code in TABLE.items())


if __name__ == "__main__":
    print(shell())
    sys.exit(OK)
