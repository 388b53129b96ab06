"""One CPU rank, real DeepSpeed engines, the real loop over real shards: for each STOP, run A stops after STOP steps
(checkpoint) and run B resumes it up to MAX steps; run C goes to MAX steps uninterrupted (once: it does not depend on
STOP). Writes each run's summary and the loaders the loop asked for, (epoch, start_batch, keys of each batch
consumed), to OUT_DIR/result.json: {"C": ..., "<STOP>": {"A": ..., "B": ...}, ...}.
Usage: python resume_check.py OUT_DIR SHARD_SPEC MAX STOP [STOP ...]"""
import json
import os
import sys

import torch
from torchvision import transforms

from dico_scale.config import load_config  # noqa: E402
from dico_scale.data.pipeline import Collate, train_loader  # noqa: E402
from dico_scale.data.tokenizer import CaptionTokenizer  # noqa: E402
from dico_scale.checkpoint import complete_tags, load_checkpoint  # noqa: E402
from dico_scale.engine import build_engine, init_distributed  # noqa: E402
from dico_scale.engine import setup_environment  # noqa: E402
from dico_scale.loop import LoopState, train_loop  # noqa: E402
from dico_scale.stages.base import Stage, StepOutput  # noqa: E402
from dico_scale.tracking import Tracker  # noqa: E402

out, spec, max_steps, stops = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(s) for s in sys.argv[4:]]
BATCH, PER_EPOCH = 4, 24  # 6 batches per epoch


class PixelStage(Stage):
    """A linear model on the mean colour of each image: every step consumes a real batch."""
    name = "resume-check"

    def __init__(self):
        self.module = torch.nn.Linear(3, 1)

    def step(self, engine, batch):
        loss = engine(batch["pixels"].mean(dim=(2, 3))).pow(2).mean()
        return StepOutput(loss, {}, images=len(batch["keys"]), tokens=0)


def segment(folder: str, steps: int, resume: bool) -> dict:
    cfg = load_config("configs/demo/xe.yaml", [
        f"train.output_dir={folder}", "tracking.enabled=false", f"train.max_steps={steps}", "train.log_every=1",
        f"train.micro_batch_size={BATCH}", "evaluator.weights=", "captioner.image_encoder_weights=",
        f"data.samples_per_epoch={PER_EPOCH}", "data.shuffle_buffer=8", "data.num_workers=2"])
    stage = PixelStage()
    engine = build_engine(cfg, stage.module, on_gpu=False)
    state = LoopState()
    if resume:
        state = LoopState.from_client_state(load_checkpoint(engine, complete_tags(f"{folder}/checkpoints")[-1]))
    collate = Collate(transforms.Compose([transforms.Resize(32), transforms.ToTensor()]), None, CaptionTokenizer(),
                      24, seed=0)
    loaders = []

    def make_train_loader(epoch, start_batch):
        loader, n = train_loader(spec, collate, BATCH, PER_EPOCH, 1, 2, 8, seed=epoch, start_batch=start_batch)
        loaders.append([epoch, start_batch, []])
        for batch in loader:
            loaders[-1][2].append(batch["keys"])
            yield batch

    summary = train_loop(cfg, stage, engine, Tracker(cfg, rank=0), make_train_loader, lambda: None, state)
    return {k: summary[k] for k in ("step", "epoch", "batch_in_epoch", "samples_seen", "data")} | {"loaders": loaders}


setup_environment(load_config("configs/demo/xe.yaml", ["evaluator.weights=", "captioner.image_encoder_weights="]))
init_distributed()
result = {}
for stop in stops:
    folder = f"{out}/stop_{stop}/A"
    result[str(stop)] = {"A": segment(folder, stop, False), "B": segment(folder, max_steps, True)}
result["C"] = segment(f"{out}/C", max_steps, False)
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(result, f)

from dico_scale.exit_codes import leave  # noqa: E402

leave(0)  # as the entry points: no interpreter teardown, in which a thread's destructor once aborted a rank
