"""One CPU rank, a real DeepSpeed engine and the real loop; the stage's loss turns NaN on chosen calls.
Usage: python nonfinite_check.py OUT_DIR BAD_CALLS [key=value ...]
BAD_CALLS: comma-separated call indices, 'from:N' for all calls >= N, or 'none'."""
import json
import os
import sys

import torch

from dico_scale.config import load_config  # noqa: E402
from dico_scale.engine import build_engine, init_distributed, setup_environment  # noqa: E402
from dico_scale.loop import LoopState, NonFiniteLossError, train_loop  # noqa: E402
from dico_scale.stages.base import Stage, StepOutput  # noqa: E402
from dico_scale.tracking import Tracker  # noqa: E402

out, bad = sys.argv[1], sys.argv[2]
cfg = load_config("configs/demo/xe.yaml", [
    f"train.output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", "train.max_steps=6", "train.log_every=1",
    "train.max_nonfinite_steps=3", "train.micro_batch_size=4", "evaluator.weights=",
    "captioner.image_encoder_weights=", *sys.argv[3:]])


class LinearStage(Stage):
    name = "nonfinite-check"

    def __init__(self):
        self.module, self.calls = torch.nn.Linear(4, 1), 0

    def step(self, engine, batch):
        self.calls += 1
        is_bad = self.calls >= int(bad[5:]) if bad.startswith("from:") else str(self.calls) in bad.split(",")
        loss = engine(torch.ones(4, 4)).pow(2).mean() * (float("nan") if is_bad else 1.0)
        return StepOutput(loss, {}, images=4, tokens=0)


setup_environment(cfg)
init_distributed()
stage = LinearStage()
engine = build_engine(cfg, stage.module, on_gpu=False)
stage.setup(engine)
tracker = Tracker(cfg, rank=0)
result = {"run_id": tracker.run_id}
try:
    summary = train_loop(cfg, stage, engine, tracker, lambda epoch, start_batch: [{}] * 4, lambda: None, LoopState())
    result.update(step=summary["step"], skipped=summary["nonfinite_skipped"], calls=stage.calls)
except NonFiniteLossError as e:
    result.update(error=str(e), step=engine.global_steps)
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(result, f)
