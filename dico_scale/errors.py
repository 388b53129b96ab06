"""The exceptions that cross layers: raised deep in data/, models/, checkpoint.py or loop.py and turned into an exit
code (dico_scale/exit_codes.py) by the entry points, and the entry points' one-line argument parser. They live here,
importing nothing of ours, so that any module can raise them without importing config.py (whose checks import the
model and stage tables: a circle otherwise)."""
from __future__ import annotations

import argparse
import sys


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line for a one-line error or warning: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:limit]}"


class OneLineParser(argparse.ArgumentParser):
    """The entry points' parser: a bad argument gives one line naming it and exit code 2, without argparse's usage
    block (`--help` still shows it). The line starts with `name`, else the prog."""
    name: str | None = None

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        # argparse's abbreviations (`--conf` for `--config`) would slip a second copy past the check below
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.name or self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        """argparse keeps the last of an option given twice: `--config a.yaml --config b.yaml` would run b alone."""
        argv = list(sys.argv[1:] if args is None else args)
        argv = argv[:argv.index("--")] if "--" in argv else argv
        for action in self._actions:
            if isinstance(action, argparse._StoreAction) and action.option_strings:
                given = [a for a in argv if a.split("=", 1)[0] in action.option_strings]
                if len(given) > 1:
                    self.error(f"{action.option_strings[-1]} given {len(given)} times: give it once")
        return super().parse_known_args(args, namespace)


class ConfigError(ValueError):
    """A bad config value or file; the message is one line and names the key."""


class AgreedConfigError(ConfigError):
    """Raised on every rank at the same point, after a collective (a checkpoint the ranks verified together): the
    ranks leave through a final barrier and tear the group down, instead of exiting with it up (which can abort)."""
    agreed = True


class CheckpointError(RuntimeError):
    """Saving a checkpoint failed; the message is one line naming the folder (disk full, unwritable)."""


class DataError(RuntimeError):
    """Too much bad data: the run stops with this one-line message."""

    def __init__(self, msg: str, agreed: bool = False):
        super().__init__(msg)
        self.agreed = agreed  # every rank raised it at the same step (decided on all-reduced numbers)


class NonFiniteLossError(RuntimeError):
    """train.max_nonfinite_steps consecutive losses were nan or inf."""


class Preempted(Exception):
    """Raised after the checkpoint of a run asked to stop (signal or approaching time limit) has been written."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}; checkpoint saved")
        self.step = step
