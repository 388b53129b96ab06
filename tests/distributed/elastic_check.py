"""Run under `torchrun --nproc_per_node 2` (1 rank: plain python): a tiny model (a frozen linear layer, then a
trained one) through the real resume path (resume.py: tag, universal conversion, load) and the real loop, on a fixed
sequence of global batches of 4 rows that each rank slices its share from, so that a step does the same arithmetic
at 1 or 2 ranks.

Usage: elastic_check.py OUT_DIR PHASE
  w (1 rank):  W = fresh, 2 steps, checkpoint; V = fresh, 3 steps uninterrupted.
  a (2 ranks): A = fresh, 2 steps, checkpoint; U = fresh, 3 steps uninterrupted; C = W resumed from its step-2 tag
               (1 -> 2), then one step.
  b (1 rank):  B = A resumed from its step-2 tag (2 -> 1), then one step (saved); B_reload = that save resumed at the
               same size; B_again, B_damaged, B_half, B_stale = the step-2 tag resumed again (no step) with its
               universal folder kept, damaged, half-written, converted from another tag.
Each phase runs ZeRO stage 2, then 3 (every parameter partitioned). Writes <OUT_DIR>/z<zero_stage>/<label>_loaded.pt
and <label>_final.pt (fp32 state dicts right after the load and at the end, by export_weights), and rank 0 what each
segment saw (steps, position, lr, log lines) to <OUT_DIR>/z<zero_stage>/<phase>.json."""
import json
import os
import sys
from pathlib import Path

import torch

from dico_scale.config import load_config  # noqa: E402
from dico_scale.engine import build_engine, export_weights, init_distributed, setup_environment  # noqa: E402
from dico_scale.loop import train_loop  # noqa: E402
from dico_scale.resume import plan_resume, resume_state  # noqa: E402
from dico_scale.stages.base import Stage, StepOutput  # noqa: E402
from dico_scale.tracking import Tracker  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
out, phase = args[0], args[1]
GLOBAL_BATCH, PER_EPOCH = 4, 8  # 2 global batches per epoch: the resumed steps cross an epoch boundary


class TinyStage(Stage):
    name = "elastic-check"

    def __init__(self, frozen_zero: bool):
        torch.manual_seed(0)
        self.module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
        self.module[0].requires_grad_(False)
        if frozen_zero:  # what the config would build now differs from the checkpoint: the load must restore it
            with torch.no_grad():
                self.module[0].weight.zero_()

    def step(self, engine, batch):
        loss = engine(batch["x"]).pow(2).mean()
        return StepOutput(loss, {}, images=batch["x"].size(0), tokens=0)


def loader(epoch, start_batch):
    """The global batches of the epoch from start_batch on, this rank's rows of each."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    per_rank = GLOBAL_BATCH // world
    for b in range(start_batch, PER_EPOCH // GLOBAL_BATCH):
        x = torch.randn(GLOBAL_BATCH, 8, generator=torch.Generator().manual_seed(1000 * epoch + b))
        yield {"x": x[rank * per_rank:(rank + 1) * per_rank]}


def segment(zero_stage: int, label: str, run: str, steps: int, resume: str = "none", frozen_zero: bool = False) -> dict:
    """One training run of `steps` steps in the folder `run`; its weights go to <label>_loaded.pt / <label>_final.pt."""
    world = torch.distributed.get_world_size()
    ds_json = f"{out}/zero{zero_stage}.json"
    cfg = load_config("configs/demo/xe.yaml", [
        f"train.output_dir={out}/z{zero_stage}/{run}", "tracking.enabled=false", f"train.max_steps={steps}",
        f"train.micro_batch_size={GLOBAL_BATCH // world}", f"data.samples_per_epoch={PER_EPOCH}", f"train.resume={resume}",
        "evaluator.weights=", "captioner.image_encoder_weights=", "optim.lr=0.05", "optim.warmup_steps=2",
        "optim.grad_clip=0", f"train.deepspeed_config={ds_json}", "train.log_every=1"])
    lines = []

    def log(msg):
        lines.append(msg)
        if torch.distributed.get_rank() == 0:
            print(msg, flush=True)

    plan = plan_resume(cfg, log)
    stage = TinyStage(frozen_zero)
    engine = build_engine(cfg, stage.module, on_gpu=False, load_universal=plan.universal)
    stage.setup(engine)
    state = resume_state(engine, plan, cfg, log)
    seen = {"start_step": engine.global_steps, "batch_in_epoch": state.batch_in_epoch, "epoch": state.epoch,
            "universal": plan.universal, "lr": engine.get_lr()[0],
            "universal_flag_after_load": engine.load_universal_checkpoint()}
    export_weights(engine, f"{out}/z{zero_stage}/{label}_loaded.pt", {})
    summary = train_loop(cfg, stage, engine, Tracker(cfg, rank=0), loader, lambda: None, state)
    export_weights(engine, f"{out}/z{zero_stage}/{label}_final.pt", {})
    return seen | {"step": summary["step"], "end_batch_in_epoch": summary["batch_in_epoch"], "log": lines}


def damaged(zero_stage: int, tag: str) -> dict:
    """A file of the kept universal folder cut short: not used, converted again."""
    moments = sorted(Path(tag + "_universal", "zero").glob("*/exp_avg.pt"))[0]
    os.truncate(moments, moments.stat().st_size // 2)
    name = str(moments.relative_to(tag + "_universal"))
    return segment(zero_stage, "B_damaged", "A", 2, resume=tag, frozen_zero=True) | {"damaged": name}


def half_written(zero_stage: int, tag: str) -> dict:
    """A universal folder without its marker, and a conversion's temporary folder left by a crash."""
    Path(tag + "_universal", "complete").unlink()
    Path(tag + "_universal.tmp", "junk").mkdir(parents=True)
    result = segment(zero_stage, "B_half", "A", 2, resume=tag, frozen_zero=True)
    return result | {"tmp_left": Path(tag + "_universal.tmp").exists()}


def stale(zero_stage: int, tag: str) -> dict:
    """A universal folder converted from an earlier tag of the same name (a run started over in the folder)."""
    marker = Path(tag, "complete")
    marker.write_text(marker.read_text() + "\n")
    return segment(zero_stage, "B_stale", "A", 2, resume=tag, frozen_zero=True)


setup_environment(load_config("configs/demo/xe.yaml", ["evaluator.weights=", "captioner.image_encoder_weights="]))
init_distributed()
for zero_stage in (2, 3):
    if torch.distributed.get_rank() == 0:
        os.makedirs(f"{out}/z{zero_stage}", exist_ok=True)
        with open(f"{out}/zero{zero_stage}.json", "w") as f:  # every parameter partitioned, however small
            json.dump({"zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0}}, f)
    torch.distributed.barrier()
    ckpt = f"{out}/z{zero_stage}/%s/checkpoints/step_00000002"
    if phase == "w":
        result = {"W": segment(zero_stage, "W", "W", 2), "V": segment(zero_stage, "V", "V", 3)}
    elif phase == "a":
        result = {"A": segment(zero_stage, "A", "A", 2), "U": segment(zero_stage, "U", "U", 3),
                  "C": segment(zero_stage, "C", "W", 3, resume=ckpt % "W", frozen_zero=True)}
    else:
        result = {"B": segment(zero_stage, "B", "A", 3, resume=ckpt % "A", frozen_zero=True),
                  "B_reload": segment(zero_stage, "B_reload", "A", 3, resume="auto"),
                  "B_again": segment(zero_stage, "B_again", "A", 2, resume=ckpt % "A", frozen_zero=True)}
        result["B_damaged"] = damaged(zero_stage, ckpt % "A")
        result["B_half"] = half_written(zero_stage, ckpt % "A")
        result["B_stale"] = stale(zero_stage, ckpt % "A")
    if torch.distributed.get_rank() == 0:
        with open(f"{out}/z{zero_stage}/{phase}.json", "w") as f:
            json.dump(result, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()

from dico_scale.exit_codes import leave  # noqa: E402

leave(0)  # as the entry points: no interpreter teardown, in which a thread's destructor once aborted a rank
