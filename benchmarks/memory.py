"""Per-rank memory of the three models (captioner, reference, evaluator) under ZeRO-2 vs ZeRO-3, and the DiCO step
time, measured side by side at world size 2 on the CPU; then the per-GPU figures projected for larger runs.

    python benchmarks/memory.py --json runs/bench/memory.json                 # demo config, 2 CPU ranks
    python benchmarks/memory.py --config configs/coco/dico.yaml --steps 2     # the COCO model sizes (slow on a CPU)
    python benchmarks/memory.py --vlm --json runs/bench/memory_vlm.json      # vision-language captioners, projected
    python benchmarks/memory.py --vlm --folder /models/my-vlm [--prompt P --images 8 --candidates 5 --caption-tokens 30
                                --lora-r 16 --lora-targets q_proj,k_proj,v_proj,o_proj]

--vlm projects a DiCO step of 2B- to 10B-class vision-language captioners (SmolVLM, Qwen2-VL, Qwen3-VL, Gemma 3,
LLaVA-NeXT, PaliGemma 2; full or LoRA, separate or adapter-disabled reference, ZeRO-2 or 3, 1 x 8 or 8 x 8 GPUs)
against 80 and 141 GB GPUs: benchmarks/vlm_memory.py. --folder projects your own model folder (captioner.hf_path)
instead, at your images per GPU (train.micro_batch_size), candidates (generation.candidates) and caption length
(generation.max_len), with your prompt (captioner.prompt) and LoRA rank and targets (captioner.lora).

Measured: the dico stage built as train.py builds it (build_stage, build_engine, build_frozen), trained on random
images; after the backward of the last step, before its optimizer step, every live tensor of the process is found
(gc) and its storage counted once: the models' parameters (a ZeRO-3 parameter's local shard, plus the whole of the
small ones ZeRO-3 keeps on every rank: stage3_param_persistence_threshold), the gradient partitions, the optimizer's
state (Adam m and v, the fp32 master partitions), and the rest (DeepSpeed's communication buckets, mostly). Settings:
zero2 (frozen models replicated) and zero3 (frozen models sharded), each timed over the same steps.
Projected: dico_scale.memory's accounting with the parameter counts of the real models (built on the meta device):
the COCO config at 8 nodes x 8 GPUs, and a larger captioner (width 1024, 12 + 12 layers, ViT-H-14 evaluator).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"zero2": "configs/deepspeed/zero2.json", "zero3": "configs/deepspeed/zero3.json"}
RANDOM_WEIGHTS = ["train.init_from=", "captioner.image_encoder_weights=", "evaluator.weights=",
                  "tracking.enabled=false"]


# ---- measured (runs under `deepspeed --num_gpus 2`) ----------------------------------------------------------------

def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if t is not None and t.numel():
            s = t.untyped_storage()
            out[s.data_ptr()] = max(out.get(s.data_ptr(), 0), s.nbytes())
    return out


def _param_tensors(module):
    for p in module.parameters():
        yield p.data
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the local shard; p.data is empty outside a forward
            yield p.ds_tensor


def _optimizer_tensors(engine):
    opt = engine.optimizer
    for state in getattr(getattr(opt, "optimizer", opt), "state", {}).values():
        yield from (v for v in state.values() if hasattr(v, "untyped_storage"))
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # fp32 master partitions
        yield from getattr(opt, name, [])


def _gradient_tensors(engine):
    """The gradients after the backward of an accumulation boundary (DeepSpeed 0.19 names): ZeRO-3's flat partition
    buffer, ZeRO-2's contiguous partition (grads_in_partition) or averaged_gradients, ZeRO-0/1's p.grad."""
    opt = engine.optimizer
    for name in ("grad_partitions_flat_buffer", "grads_in_partition"):
        if getattr(opt, name, None) is not None:
            yield getattr(opt, name)
    for grads in (getattr(opt, "averaged_gradients", None) or {}).values():
        yield from (grads or [])
    yield from (p.grad for p in engine.module.parameters() if p.grad is not None)


def live_bytes() -> dict[int, int]:
    import torch

    gc.collect()
    with warnings.catch_warnings():  # isinstance on some library objects warns of deprecations
        warnings.simplefilter("ignore")
        return _storages(o for o in gc.get_objects() if isinstance(o, torch.Tensor))


def measure(setting: str, config: str, steps: int, overrides: list[str]) -> dict:
    import torch
    import torch.distributed as dist
    from PIL import Image

    from dico_scale.config import load_config
    from dico_scale.engine import build_engine, build_frozen, init_distributed, setup_environment
    from dico_scale.memory import engine_memory
    from dico_scale.models.clip import register_model_configs
    from dico_scale.stages import build_stage

    cfg = load_config(config, RANDOM_WEIGHTS + [f"train.deepspeed_config={SETTINGS[setting]}", "train.stage=dico",
                                                "train.output_dir=runs/bench/memory", *overrides])
    setup_environment(cfg)
    device = init_distributed()
    register_model_configs(cfg.clip_model_configs)
    torch.manual_seed(0)
    stage = build_stage(cfg, device)
    engine = build_engine(cfg, stage.module, on_gpu=device.type == "cuda")
    frozen = {n: build_frozen(cfg, m, p, w, device.type == "cuda") for n, (m, p, w) in stage.frozen_models().items()}
    stage.setup(engine, frozen)
    shape = stage.module.preprocess(Image.new("RGB", (640, 480))).shape  # whatever the row's transform makes
    pixels = torch.randn(cfg.train.micro_batch_size, *shape, generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(steps + 1):  # the first step creates Adam's state: not timed
        dist.barrier()
        t0 = time.perf_counter()
        out = stage.step(engine, {"pixels": pixels})
        engine.backward(out.loss)
        if i == steps:
            live = live_bytes()  # parameters, gradients and optimizer state all exist now
        engine.step()
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    models = {stage.model_name: engine, **frozen}
    params = {n: sum(_storages(_param_tensors(e.module)).values()) for n, e in models.items()}
    optimizer = sum(_storages(_optimizer_tensors(engine)).values())
    grads = sum(_storages(_gradient_tensors(engine)).values())
    return {"setting": setting, "rank": dist.get_rank(), "world_size": dist.get_world_size(),
            "median_step_s": statistics.median(times), "params_bytes": params, "optimizer_bytes": optimizer,
            "grads_bytes": grads, "live_bytes": sum(live.values()),
            "accounting": {n: engine_memory(n, e).__dict__ for n, e in models.items()}}


def worker(args) -> None:
    import torch.distributed as dist

    rows = [measure(s, args.config, args.steps, args.overrides) for s in args.settings]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    if dist.get_rank() == 0:
        with open(args.worker_out, "w") as f:
            json.dump([r for part in parts for r in part], f)
    dist.barrier()
    dist.destroy_process_group()


# ---- projected -----------------------------------------------------------------------------------------------------

def parameter_counts(overrides: list[str], config: str) -> dict[str, tuple[int, int]]:
    """{model: (parameters, trainable)} of the dico stage's three models, built on the meta device (no memory): the
    captioner is the reference's layers plus its (frozen) open_clip tower. The projections are of builtin configs:
    an HF row's tower is inside its folder's model, not an open_clip name."""

    import open_clip
    import torch

    from dico_scale.config import load_config
    from dico_scale.models import build_captioner
    from dico_scale.models.clip import register_model_configs

    cfg = load_config(config, RANDOM_WEIGHTS + overrides)
    if cfg.captioner.model != "builtin":
        raise SystemExit(f"benchmarks/memory.py: projections count builtin captioners, not {cfg.captioner.model}")
    register_model_configs(cfg.clip_model_configs)
    with torch.device("meta"):
        reference = sum(p.numel() for p in build_captioner(cfg, image_encoder=False).parameters())
    tower = sum(p.numel() for p in open_clip.create_model(cfg.captioner.image_encoder, device="meta").visual.parameters())
    evaluator = sum(p.numel() for p in open_clip.create_model(cfg.evaluator.model, device="meta").parameters())
    trainable = reference + (0 if cfg.captioner.freeze_image_encoder else tower)
    return {"captioner": (reference + tower, trainable), "reference": (reference, 0), "evaluator": (evaluator, 0)}


def project(name: str, counts: dict, world: int, dtype_bytes: int = 2) -> dict:
    from dico_scale.memory import account

    out = {}
    for setting, (train_zero_stage, frozen_zero_stage) in {"zero2": (2, 0), "zero3": (3, 3)}.items():
        models = [account(m, n, t, train_zero_stage if m == "captioner" else frozen_zero_stage, world, dtype_bytes)
                  for m, (n, t) in counts.items()]
        out[setting] = {m.name: m.total for m in models} | {"total": sum(m.total for m in models)}
    return {"name": name, "world_size": world, "counts": counts, **out}


# ---- driver --------------------------------------------------------------------------------------------------------

def gib(n: float) -> str:
    from dico_scale.memory import human

    return human(int(n))


def check_measured(p, args) -> None:
    """The measured run's config and --steps before the 2-rank job: each rank would print its own traceback."""
    from dico_scale.config import load_config
    from dico_scale.errors import ConfigError

    if args.steps < 1:
        p.error(f"--steps {args.steps} must be at least 1")
    try:
        for s in args.settings:  # as measure() loads it
            load_config(args.config, RANDOM_WEIGHTS + [f"train.deepspeed_config={SETTINGS[s]}", "train.stage=dico",
                                                       "train.output_dir=runs/bench/memory", *args.overrides])
    except ConfigError as e:
        p.error(str(e).splitlines()[0])


def main(argv=None) -> int:
    from dico_scale.errors import OneLineParser
    from dico_scale.preflight import out_file_problem

    p = OneLineParser(prog="memory.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo/dico.yaml")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--json", default="")
    p.add_argument("--vlm", action="store_true", help="project vision-language captioners (benchmarks/vlm_memory.py)")
    p.add_argument("--folder", default="", help="--vlm: project this model folder (captioner.hf_path) alone")
    p.add_argument("--prompt", default="Describe this image in one sentence.", help="--folder: captioner.prompt")
    p.add_argument("--images", type=int, default=8, help="--vlm: images per GPU (train.micro_batch_size)")
    p.add_argument("--candidates", type=int, default=5, help="--vlm: candidates per image (generation.candidates)")
    p.add_argument("--caption-tokens", type=int, default=30, help="--vlm: caption tokens (generation.max_len)")
    p.add_argument("--lora-r", type=int, default=16, help="--vlm: the LoRA rows' rank (captioner.lora.r)")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="--vlm: the LoRA rows' targets, comma-separated or all-linear (captioner.lora.target_modules)")
    p.add_argument("--worker-out", default="")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    if args.worker_out:
        worker(args)
        return 0
    if args.json and (problem := out_file_problem(args.json)):  # before the work, not after it
        p.error(f"--json {problem}")
    if args.vlm:
        import vlm_memory  # beside this file
        from dico_scale.activations import run_lora
        from dico_scale.errors import ConfigError

        for flag in ("images", "candidates", "caption_tokens", "lora_r"):
            if getattr(args, flag) < 1:
                print(f"memory.py: error: --{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1",
                      file=sys.stderr)
                return 2
        lora = run_lora(argparse.Namespace(r=args.lora_r, target_modules=args.lora_targets))
        if not lora.targets:
            p.error("--lora-targets names no module")
        try:
            vlm_memory.main(args.json, args.folder, args.prompt,
                            vlm_memory.Shape(args.images, args.candidates, args.caption_tokens), lora)
        except ConfigError as e:
            print(f"memory.py: {e}", file=sys.stderr)
            return 2
        return 0
    check_measured(p, args)
    os.makedirs("runs/bench", exist_ok=True)
    tmp = os.path.abspath("runs/bench/memory_ranks.json")
    cmd = ["deepspeed", "--num_gpus", "2", os.path.abspath(__file__), "--config", args.config, "--steps",
           str(args.steps), "--settings", *args.settings, "--worker-out", tmp, *args.overrides]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    with open(tmp) as f:
        rows = json.load(f)
    by = {(r["setting"], r["rank"]): r for r in rows}
    print(f"\nmeasured per rank, world size 2, {args.config}, {platform.processor() or platform.machine()}")
    print("(parameters per model; the captioner's gradients and optimizer state; 'other': every other live tensor,"
          " mostly DeepSpeed's communication buckets)")
    print(f"{'setting':<7} {'rank':>4} {'captioner':>11} {'grads':>11} {'optimizer':>11} {'reference':>11} "
          f"{'evaluator':>11} {'other':>11} {'step s':>7}")
    for (s, rank), r in sorted(by.items()):
        pb = r["params_bytes"]
        other = r["live_bytes"] - sum(pb.values()) - r["grads_bytes"] - r["optimizer_bytes"]
        print(f"{s:<7} {rank:>4} {gib(pb['captioner']):>11} {gib(r['grads_bytes']):>11} "
              f"{gib(r['optimizer_bytes']):>11} {gib(pb.get('reference', 0)):>11} {gib(pb.get('evaluator', 0)):>11} "
              f"{gib(other):>11} {r['median_step_s']:>7.3f}")
    ratios = {}
    if {"zero2", "zero3"} <= {s for s, _ in by}:
        z2, z3 = by[("zero2", 0)], by[("zero3", 0)]

        def state(r):  # the captioner's parameters + gradients + optimizer state
            # ZeRO-2 keeps its gradient partition in its bucket buffers ('other'), where no name finds it: its
            # accounting stands in for it (ZeRO-3's measured flat buffer equals its accounting to the byte)
            grads = r["grads_bytes"] or r["accounting"]["captioner"]["grads"]
            return r["params_bytes"]["captioner"] + grads + r["optimizer_bytes"]
        frozen = lambda r: r["params_bytes"].get("reference", 0) + r["params_bytes"].get("evaluator", 0)  # noqa: E731
        ratios = {"captioner_state_zero3_over_zero2": state(z3) / state(z2),
                  "frozen_params_sharded_over_replicated": frozen(z3) / frozen(z2),
                  "step_time_zero3_over_zero2": z3["median_step_s"] / z2["median_step_s"]}
        for k, v in ratios.items():
            print(f"{k}: {v:.3f}")
    projections = [
        project("COCO config (ViT-L-14 tower, width 512, 3+3 layers, ViT-B-32 evaluator), bf16",
                parameter_counts([], "configs/coco/dico.yaml"), world=64),
        project("larger captioner (width 1024, 12+12 layers, ViT-H-14 evaluator), bf16",
                parameter_counts(["captioner.width=1024", "captioner.heads=16", "captioner.encoder_layers=12",
                                  "captioner.decoder_layers=12", "evaluator.model=ViT-H-14"],
                                 "configs/coco/dico.yaml"), world=64)]
    print("\nprojected per GPU, 8 nodes x 8 GPUs (dico_scale.memory accounting; activations not included)")
    for pr in projections:
        print(f"{pr['name']}: parameters {', '.join(f'{m} {n / 1e6:.1f} M' for m, (n, _) in pr['counts'].items())}")
        for s in ("zero2", "zero3"):
            print(f"  {s}: " + ", ".join(f"{k} {gib(v)}" for k, v in pr[s].items()))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"measured": rows, "ratios": ratios, "projected": projections,
                       "date": time.strftime("%Y-%m-%d"), "machine": platform.platform()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
