"""Run under `deepspeed --num_gpus 2`: the ZeRO-3 paths against ZeRO-2 on the same data, in one process group, each
run through dico_scale.train.run (the real loop, shards, checkpoints and MLflow store). Writes what the test asserts
to OUT_DIR/zero3.json (rank 0; the uneven-beams step from both ranks).
Usage: zero3_check.py OUT_DIR MODE key=value ...
MODE cpu: every run below (2 CPU ranks). MODE gpu: one CUDA process, the dico runs in the precision the overrides
set, without the gradient-checkpointing, bf16 and uneven-beams runs (test_gpu.py; its machine has no MLflow: each
run's last training metrics are written too).

Runs, in order: xe under zero2 / zero3 (and zero3 with gradient checkpointing); dico from the xe weights under zero2 /
zero3 / zero3 with gradient checkpointing / zero3 offloading parameters and optimizer / zero2 with sharded frozen
models / zero3 stopped at step 2 and
resumed to step 3; the evaluator stage under zero3; in cpu mode, xe and dico in bf16 under zero2 and zero3. Then, on the zero3 dico engines:
generation under gathered weights against a plain captioner holding the full weights, and a step whose ranks' beams
finish at different lengths."""
import dataclasses
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from dico_scale.config import load_config  # noqa: E402
from dico_scale.engine import gathered  # noqa: E402
from dico_scale.models import build_captioner  # noqa: E402
from dico_scale.train import run, shutdown  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
out, mode, common = args[0], args[1], args[2:]
cpu = mode == "cpu"
DS = "configs/deepspeed/{}.json"
result = {"runs": {}}


VALIDATED = ("xe_zero3", "dico_zero3", "evaluator_zero3")  # validation under ZeRO-3; the others skip it (time)


def train(name: str, config: str, *overrides: str) -> dict:
    skip = [] if name in VALIDATED else ["train.validate_at_end=false"]
    cfg = load_config(f"configs/demo/{config}.yaml", common + [f"train.output_dir={out}/{name}", *skip, *overrides])
    start = time.perf_counter()
    summary = run(cfg)
    result["runs"][name] = {"step": summary["step"], "mlflow_run_id": summary["mlflow_run_id"],
                            "seconds": time.perf_counter() - start, "val": summary["val"], "train": summary["train"]}
    return summary


def full_state(engine) -> dict:
    """The module's fp32 weights, gathered on every rank."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                           enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


# ---- xe, then dico from its weights ------------------------------------------------------------------------------
train("xe_zero2", "xe", "train.max_steps=3", f"train.deepspeed_config={DS.format('zero2')}")
if cpu:
    train("xe_zero3", "xe", "train.max_steps=3", f"train.deepspeed_config={DS.format('zero3')}")
    train("xe_zero3_ckpt", "xe", "train.max_steps=3", f"train.deepspeed_config={DS.format('zero3')}",
          "captioner.gradient_checkpointing=true")
init = f"train.init_from={out}/xe_zero2/model.pt"
dico = [init, "train.max_steps=3"]
train("dico_zero2", "dico", *dico, f"train.deepspeed_config={DS.format('zero2')}")
z3 = train("dico_zero3", "dico", *dico, f"train.deepspeed_config={DS.format('zero3')}")
if cpu:
    train("dico_zero3_ckpt", "dico", *dico, f"train.deepspeed_config={DS.format('zero3')}",
          "captioner.gradient_checkpointing=true")
train("dico_offload", "dico", *dico, f"train.deepspeed_config={DS.format('zero3_offload_param')}")
train("dico_zero2_shard", "dico", *dico, f"train.deepspeed_config={DS.format('zero2')}", "evaluator.placement=shard",
      "dico.reference_placement=shard_offload")
first = train("dico_resume", "dico", init, "train.max_steps=2", f"train.deepspeed_config={DS.format('zero3')}")
result["dico_resume_first_id"] = first["mlflow_run_id"]
train("dico_resume", "dico", init, "train.max_steps=3", "train.resume=auto",
      f"train.deepspeed_config={DS.format('zero3')}")
if cpu:
    train("evaluator_zero3", "evaluator", "train.max_steps=2", f"train.deepspeed_config={DS.format('zero3')}")
    for stage, extra in (("xe", ["train.max_steps=2"]), ("dico", [init, "train.max_steps=2"])):
        for zero in ("zero2", "zero3"):
            train(f"{stage}_{zero}_bf16", stage, *extra, "train.precision=bf16",
                  f"train.deepspeed_config={DS.format(zero)}")
else:  # fp16 with loss scaling, which a CPU without oneDNN fp16 cannot run
    for zero in ("zero2", "zero3"):
        train(f"dico_{zero}_fp16", "dico", *dico, "train.precision=fp16", f"train.deepspeed_config={DS.format(zero)}")

# ---- the zero3 dico run's engines: frozen reference, generation, uneven beams --------------------------------------
engine, stage = z3["engine"], z3["stage"]
start = torch.load(f"{out}/xe_zero2/model.pt", weights_only=True)["state_dict"]
ref = full_state(stage.reference_engine)
# the reference runs in the stage's precision: unchanged means equal to the initial weights rounded to it
result["reference_unchanged"] = all(
    torch.equal(v.cpu(), (start[k].to(stage.dtype) if start[k].is_floating_point() else start[k]).float())
    for k, v in ref.items())
result["reference_sharded"] = stage.reference_engine.zero_optimization_stage() == 3
result["reference_requires_grad"] = any(p.requires_grad for p in stage.reference_engine.module.parameters())
result["evaluator_sharded"] = stage.evaluator_engine.zero_optimization_stage() == 3
# partitioned: each rank holds about half of every large parameter
result["reference_local_numel"] = sum(p.ds_tensor.numel() for p in stage.reference_engine.module.parameters())
result["reference_numel"] = sum(p.ds_numel for p in stage.reference_engine.module.parameters())

g = torch.Generator().manual_seed(5)
pixels = torch.randn(2, 3, 64, 64, generator=g).to(stage.device, stage.dtype)
with gathered(engine) as policy:
    with torch.no_grad():
        visual_tokens = policy.visual_tokens(pixels)
    candidates = stage.rollout.candidates(policy, visual_tokens)
with torch.no_grad():
    logps = stage.rollout.sequence_logprobs(engine, candidates, visual_tokens)  # partitioned, hooks back on
plain = build_captioner(stage.cfg)
plain.load_state_dict(full_state(engine))
plain.to(stage.device, stage.dtype).eval()  # the engine's dtype: the same arithmetic
with torch.no_grad():
    plain_candidates = stage.rollout.candidates(plain, plain.visual_tokens(pixels))
    plain_logps = stage.rollout.sequence_logprobs(plain, plain_candidates, visual_tokens)
result["generation_equal"] = torch.equal(candidates, plain_candidates)
result["logprobs_max_diff"] = float((logps - plain_logps).abs().max())

# Rank 0 stops generating after 2 tokens, rank 1 after 12: their loops and candidate lengths differ.
rank = dist.get_rank()
stage.rollout.cfg = dataclasses.replace(stage.cfg.generation, max_len=2 if rank == 0 else 12)
tick = time.perf_counter()
out_step = stage.step(engine, {"pixels": pixels})
engine.backward(out_step.loss)
engine.step()
uneven = {"rank": rank, "seconds": time.perf_counter() - tick, "loss": float(out_step.loss),
          "candidate_len": float(out_step.metrics["dico/candidate_len"])}
parts = [None] * dist.get_world_size()
dist.all_gather_object(parts, uneven)
result["uneven"] = parts  # hooks restored after the gathered generation: this step trained as any other

# the ZeRO-3 checkpoint consolidates to the weights the run exported at the same step
resumed = build_captioner(stage.cfg, f"{out}/dico_resume/checkpoints/step_00000003")
exported = torch.load(f"{out}/dico_resume/model.pt", weights_only=True)["state_dict"]
# (in bf16 the export is the bf16 working copy, the checkpoint holds its fp32 master: equal once rounded)
result["checkpoint_matches_export"] = all(torch.equal(v.to(stage.dtype).float(), exported[k])
                                          for k, v in resumed.state_dict().items())

if rank == 0:
    with open(os.path.join(out, "zero3.json"), "w") as f:
        json.dump(result, f, indent=1)
shutdown()

from dico_scale.exit_codes import leave  # noqa: E402

leave(0)  # as the entry points: no interpreter teardown, in which a thread's destructor once aborted a rank
