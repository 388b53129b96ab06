"""`torchrun` (torch.distributed.run) for the Slurm launcher, with three differences that preemption and job logs need.

1. It does not die of the preemption signal ($PREEMPT_SIGNAL, default USR1). Slurm delivers a signal sent to a job
   step to every process of it: the ranks get it directly and checkpoint; torchrun itself must outlive them (its
   default action for SIGUSR1 would be to terminate, killing the job step mid-checkpoint). Only torchrun's own
   disposition changes: the handler is reset when it starts the ranks.
2. Its exit code is the trainer's own (dico_scale/exit_codes.py); plain torchrun reports every rank failure as 1,
   with a failure banner that it prints here for FAILED alone (the trainer's other ends are one line each).
   PREEMPTED (3: "preempted, checkpoint saved") wins, so the job is requeued, then DATA_ERROR (4: too much bad
   data); otherwise the code the failed ranks share (CONFIG_ERROR, 2, when every rank refused the same input; ranks
   that torchrun itself stopped with SIGTERM after the first failure do not count), or FAILED.
3. Stopped by SIGTERM (scancel) or SIGINT, it says so in one line (exit 128 + the signal), not a traceback.

Usage: exactly torchrun's (python slurm/torchrun.py --nnodes ... script.py args).
"""
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

from dico_scale.exit_codes import DATA_ERROR, FAILED, PREEMPTED  # noqa: E402

PREEMPT_SIGNAL = "SIG" + os.environ.get("PREEMPT_SIGNAL", "USR1").upper().removeprefix("SIG")

if __name__ == "__main__":
    sig = getattr(signal, PREEMPT_SIGNAL, None)
    if sig is not None and sig not in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        signal.signal(sig, lambda signum, frame: None)  # torchrun handles TERM/INT itself (it stops the ranks)
    try:
        main(sys.argv[1:])
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        # Once a rank fails, torchrun SIGTERMs the others: those codes say nothing of the input (a rank that had not
        # reached the same check yet). Any other signal (< 0: -9 from the OOM killer, say) is a failure of its own.
        own = codes - {-signal.SIGTERM}
        shared = next(iter(own)) if len(own) == 1 and min(own) > 0 else FAILED
        code = next((c for c in (PREEMPTED, DATA_ERROR) if c in codes), shared)
        if code == FAILED:  # the others are the trainer's own ends, each said in its line: no failure banner below it
            print(e.format_msg() if hasattr(e, "format_msg") else str(e), file=sys.stderr, flush=True)
        sys.exit(code)
    except SignalException as e:  # scancel's SIGTERM (or SIGINT): torchrun stopped its ranks before it raised this
        print(f"torchrun: stopped by {e.sigval.name}, and its ranks with it", file=sys.stderr, flush=True)
        sys.exit(128 + e.sigval)
