"""One CPU rank, a real DeepSpeed engine and the real loop; the stage's loss turns NaN on chosen calls.
Usage: python nonfinite_check.py OUT_DIR BAD_CALLS [key=value ...] [-- OUT_DIR BAD_CALLS [key=value ...] ...]
Each run (separated by --) gets a fresh engine, stage and MLflow run in a store of its own, OUT_DIR/mlflow.db, and
writes OUT_DIR/result.json; the process (imports, DeepSpeed's start-up) is shared.
BAD_CALLS: comma-separated call indices, 'from:N' for all calls >= N, or 'none'."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers
from helpers import mlflow_uri  # noqa: E402
from dico_scale.config import load_config  # noqa: E402
from dico_scale.engine import build_engine, init_distributed, setup_environment  # noqa: E402
from dico_scale.loop import LoopState, NonFiniteLossError, train_loop  # noqa: E402
from dico_scale.stages.base import Stage, StepOutput  # noqa: E402
from dico_scale.tracking import Tracker  # noqa: E402


def config(out: str, overrides: list[str]):
    return load_config("configs/demo/xe.yaml", [
        f"train.output_dir={out}", f"tracking.uri={mlflow_uri(os.path.join(out, 'mlflow.db'))}", "train.max_steps=6",
        "train.log_every=1", "train.max_nonfinite_steps=3", "train.micro_batch_size=4", "evaluator.weights=",
        "captioner.image_encoder_weights=", *overrides])


class LinearStage(Stage):
    name = "nonfinite-check"

    def __init__(self, bad: str):
        self.module, self.calls, self.bad = torch.nn.Linear(4, 1), 0, bad

    def step(self, engine, batch):
        self.calls += 1
        bad = self.bad
        is_bad = self.calls >= int(bad[5:]) if bad.startswith("from:") else str(self.calls) in bad.split(",")
        loss = engine(torch.ones(4, 4)).pow(2).mean() * (float("nan") if is_bad else 1.0)
        return StepOutput(loss, {}, images=4, tokens=0)


def check(out: str, bad: str, overrides: list[str]) -> None:
    cfg = config(out, overrides)
    stage = LinearStage(bad)
    engine = build_engine(cfg, stage.module, on_gpu=False)
    stage.setup(engine)
    tracker = Tracker(cfg, rank=0)
    result = {"run_id": tracker.run_id}
    try:
        summary = train_loop(cfg, stage, engine, tracker, lambda epoch, start_batch: [{}] * 4, lambda: None,
                             LoopState())
        result.update(step=summary["step"], skipped=summary["nonfinite_skipped"], calls=stage.calls)
    except NonFiniteLossError as e:
        result.update(error=str(e), step=engine.global_steps)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)


runs, args = [], sys.argv[1:]
while args:
    end = args.index("--") if "--" in args else len(args)
    runs.append((args[0], args[1], args[2:end]))
    args = args[end + 1:]
setup_environment(config(runs[0][0], runs[0][2]))
init_distributed()
for out, bad, overrides in runs:
    check(out, bad, overrides)

from dico_scale.exit_codes import leave  # noqa: E402

leave(0)  # as the entry points: no interpreter teardown, in which a thread's destructor once aborted a rank
