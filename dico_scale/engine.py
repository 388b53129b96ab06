"""DeepSpeed set-up (gloo on CPU, nccl on GPU), LR schedule and weight export (checkpoints: checkpoint.py).

Import order matters: `setup_environment` runs before deepspeed is first imported, since DeepSpeed picks its
accelerator (DS_ACCELERATOR) at import time.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
import warnings
from pathlib import Path

import torch

from .config import Config
from .deepspeed_json import frozen_placement, read_deepspeed_config
from .errors import ConfigError


def setup_environment(cfg: Config) -> None:
    """CPU accelerator when there is no CUDA; single-process defaults for RANK & co (else DeepSpeed tries mpi4py)."""
    use_cpu = uses_cpu(cfg)
    if use_cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if use_cpu:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(cpu_threads(cfg.train.threads, local))


def cpu_threads(configured: int, local_ranks: int) -> int:
    """A CPU rank's torch threads: train.threads; else $OMP_NUM_THREADS where set (a launcher's or the user's share
    of the cores: more threads than cores makes OpenMP's waiting threads spin against each other); else the cores
    this process may run on (its affinity: a Slurm step's or a container's cores, not the machine's) over the
    machine's ranks."""
    if configured:
        return configured
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_ranks))


def init_distributed() -> torch.device:
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        skip_shm_allreduce_op()
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    if on_cpu:
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def skip_shm_allreduce_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce op at the first start of every install (~55 s
    of both cores here) and then maps a 64 MiB /dev/shm buffer per rank that it never unlinks. The op serves only
    inference_all_reduce (tensor-parallel inference layers), which training never calls: gloo does every collective.
    Marked incompatible, as on a machine without a compiler, DeepSpeed builds and maps nothing (its probe results are
    one cached dict, so the edit holds)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def uses_cpu(cfg: Config) -> bool:
    return cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())


def check_precision(cfg: Config) -> None:
    """fp16 where the device has no fp16 arithmetic, and values of the DeepSpeed JSON that DeepSpeed's own config
    models refuse (check_deepspeed_json), fail in DeepSpeed's engine after the models are built; say it now (after
    setup_environment, which picks DeepSpeed's accelerator)."""
    on_gpu = not uses_cpu(cfg)
    if precision(cfg, on_gpu) == "fp16" and not on_gpu:
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise ConfigError("train.precision=fp16 needs a GPU, or a CPU with oneDNN fp16 support (this one has none;"
                              " DeepSpeed refuses fp16 there): use bf16 or fp32")
    check_deepspeed_json(cfg, on_gpu)


def _deepspeed_sections() -> list:
    """(key prefix, parser) of the JSON's sections that deepspeed.initialize validates with pydantic models, each
    parser DeepSpeed's own (runtime/config.py DeepSpeedConfig._initialize_params) reading the whole JSON."""
    from deepspeed.comm.config import DeepSpeedCommsConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.inference.config import WeightQuantConfig
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.runtime.config import get_hybrid_engine_config
    from deepspeed.runtime.precision_config import get_bfloat16_config, get_float16_config
    from deepspeed.runtime.tensor_parallel import get_tensor_parallel_config
    from deepspeed.runtime.zero.config import get_zero_config
    from deepspeed.utils.config import get_timers_config

    return [("zero_optimization", get_zero_config), ("fp16", get_float16_config), ("bf16", get_bfloat16_config),
            ("", get_monitor_config),  # its models' fields are the sections: tensorboard, wandb, csv_monitor, comet
            ("comms_logger", DeepSpeedCommsConfig), ("hybrid_engine", get_hybrid_engine_config),
            ("compile", lambda ds: CompileConfig(**ds.get("compile", {}))),
            ("weight_quantization", lambda ds: WeightQuantConfig(**ds.get("weight_quantization", {}))),
            ("tensor_parallel", get_tensor_parallel_config), ("timers.throughput", get_timers_config)]


def check_deepspeed_json(cfg: Config, on_gpu: bool) -> None:
    """The JSON that build_engine hands to deepspeed.initialize (ds_config), its sections parsed by DeepSpeed's own
    pydantic models: their ValidationError would come on every rank after the models are built, as a traceback; here
    it is one ConfigError naming the file, the key and DeepSpeed's reason. The JSON's shape (sections that must be
    objects, the ZeRO stage) was checked at config time (deepspeed_json.read_deepspeed_config), without DeepSpeed."""
    import_deepspeed()
    try:
        sections = _deepspeed_sections()
    except ImportError:  # a DeepSpeed that moved these: its engine validates as before, nothing is lost but the time
        return
    from deepspeed.utils import logger

    ds, path = ds_config(cfg, on_gpu), cfg.train.deepspeed_config
    level = logger.level
    logger.setLevel(logging.ERROR)  # its deprecated-key warnings: deepspeed.initialize prints them once, not twice
    try:
        _parse_sections(sections, ds, path)
    finally:
        logger.setLevel(level)


def _parse_sections(sections: list, ds: dict, path: str) -> None:
    from pydantic import ValidationError

    for prefix, parse in sections:
        try:
            parse(ds)
        except ValidationError as e:
            err, more = e.errors()[0], len(e.errors()) - 1
            key = ".".join(str(k) for k in (prefix, *err["loc"]) if k != "") or "tensorboard/wandb/csv_monitor/comet"
            value = f" {json.dumps(err['input'], default=str)[:60]}" if err["loc"] else ""  # loc (): the whole section
            raise ConfigError(f"train.deepspeed_config '{path}': {key}{value}: {err['msg']} (DeepSpeed's "
                              f"{e.title}{f'; {more} more' if more else ''})") from None
        except Exception:  # noqa: BLE001 - a parser this check misreads must not stop a run the engine accepts
            continue


def precision(cfg: Config, on_gpu: bool) -> str:
    """fp32 | bf16 | fp16: train.precision, or with `auto` what the JSON enables (bf16 "auto": on a GPU with bf16)."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    ds = read_deepspeed_config(cfg.train.deepspeed_config)
    if (ds.get("fp16") or {}).get("enabled") is True:
        return "fp16"
    bf16 = (ds.get("bf16") or {}).get("enabled", "auto")
    if bf16 == "auto":
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if bf16 else "fp32"


def ds_config(cfg: Config, on_gpu: bool, load_universal: bool = False) -> dict:
    """The JSON of train.deepspeed_config with batch, accumulation, clipping and precision filled from the config.
    load_universal: the engine will load a universal checkpoint (a resume at another world size: universal.py)."""
    ds = read_deepspeed_config(cfg.train.deepspeed_config)
    ds.update(train_micro_batch_size_per_gpu=cfg.train.micro_batch_size,
              gradient_accumulation_steps=cfg.optim.grad_accum,
              gradient_clipping=cfg.optim.grad_clip,
              steps_per_print=ds.get("steps_per_print", 10**9),
              zero_allow_untested_optimizer=True)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    dtype = precision(cfg, on_gpu)
    # the JSON's own fp16 settings (loss_scale, initial_scale_power, ...) are kept; only `enabled` is decided here
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": dtype == "bf16"}
    ds["fp16"] = {**(ds.get("fp16") or {}), "enabled": dtype == "fp16"}
    if offloads_optimizer(ds) and not on_gpu:
        # On the CPU accelerator "offloading" moves nothing; torch's AdamW there needs no C++ build (DeepSpeedCPUAdam,
        # what a GPU run uses, does), and DeepSpeed accepts a client optimizer with offload only when told.
        ds["zero_force_ds_cpu_optimizer"] = False
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


def offloads_optimizer(ds: dict) -> bool:
    block = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return block.get("device", "none") not in ("none", None)


def frozen_ds_config(train_ds: dict, placement: str, width: int) -> dict:
    """A frozen model's DeepSpeed config (no optimizer, as OpenRLHF's get_eval_ds_config and TRL's prepare_deepspeed):
    ZeRO-3 inference when sharded (TRL's thresholds for a model of hidden size `width`), else ZeRO stage 0; the
    trainable model's precision."""
    zero: dict = {"stage": 0}
    if placement in ("shard", "shard_offload"):
        zero = {"stage": 3, "stage3_param_persistence_threshold": 10 * width,
                "stage3_prefetch_bucket_size": int(0.9 * width * width)}
        if placement == "shard_offload":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": train_ds["train_micro_batch_size_per_gpu"],
            "gradient_accumulation_steps": train_ds.get("gradient_accumulation_steps", 1),
            "zero_optimization": zero, "bf16": {"enabled": train_ds["bf16"]["enabled"]},
            "fp16": {"enabled": train_ds["fp16"]["enabled"]}, "steps_per_print": 10**9}


def lr_lambda(cfg: Config):
    """Linear warmup from 0, then constant or cosine down to min_lr_ratio at max_steps."""
    o, total = cfg.optim, cfg.train.max_steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# DeepSpeed 0.19's ZeRO gathers partitions with torch.distributed.all_gather_into_tensor, which torch 2.14
# deprecates (a FutureWarning on every rank at every step before the console's "shown once" memory held): its
# call, not ours, so hidden by its exact message where we hand the model to DeepSpeed.
DEEPSPEED_DEPRECATION = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"


def hide_deepspeed_deprecation() -> None:
    warnings.filterwarnings("ignore", message=DEEPSPEED_DEPRECATION, category=FutureWarning)


# DeepSpeed imports its Muon optimizer (ZeRO checks the optimizer's type against it; 0.19.2 already with `import
# deepspeed`), whose module decorates its Newton-Schulz steps with torch.compile at import: that imports torch's
# compiler, ~1.5 s of CPU in every process that builds a ZeRO engine. The trainer's optimizer is AdamW (optim.*), never
# Muon: DeepSpeed and that module are imported once with torch.compile a no-op (the functions stay plain eager code).
# And DeepSpeed's autotuner imports MLflow at import (for its own autotuning runs, which the trainer never starts):
# ~1.1 s of CPU in every rank, where only rank 0 of a tracked run uses MLflow; it is hidden from that one import (the
# autotuner then logs nothing) and imported as usual by whoever needs it later.
# The trainer's processes import deepspeed through import_deepspeed.
MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def _no_compile(model=None, **kwargs):
    return model if model is not None else (lambda fn: fn)


def import_deepspeed():
    import importlib
    import sys

    if MUON_MODULE not in sys.modules:
        compile_ = torch.compile
        torch.compile = _no_compile
        hide_mlflow = "deepspeed" not in sys.modules and "mlflow" not in sys.modules
        if hide_mlflow:
            sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which the autotuner catches
        try:
            importlib.import_module("deepspeed")
            importlib.import_module(MUON_MODULE)
        except ImportError:  # a DeepSpeed without Muon
            pass
        finally:
            torch.compile = compile_
            if hide_mlflow:
                del sys.modules["mlflow"]
    return importlib.import_module("deepspeed")


def build_engine(cfg: Config, module: torch.nn.Module, on_gpu: bool, load_universal: bool = False,
                 decay_exempt=None):
    """decay_exempt(name, parameter): whether optim.weight_decay spares it (a group of its own with none)."""
    deepspeed = import_deepspeed()
    hide_deepspeed_deprecation()
    ds = ds_config(cfg, on_gpu, load_universal)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    spared = {n for n, p in named if decay_exempt and decay_exempt(n, p)}
    params = [p for n, p in named if n not in spared]
    if spared:
        params = [{"params": params}, {"params": [p for n, p in named if n in spared], "weight_decay": 0.0}]
    kw = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
              weight_decay=cfg.optim.weight_decay)
    if offloads_optimizer(ds) and on_gpu:  # the optimizer steps on the CPU: DeepSpeed's vectorised Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        optimizer = DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    else:
        optimizer = torch.optim.AdamW(params, **kw)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    return engine


def build_frozen(cfg: Config, module: torch.nn.Module, placement: str, width: int, on_gpu: bool):
    """A frozen model as a DeepSpeed engine without an optimizer, in eval mode unless `module.training` was set
    (the reference with dropout kept on). placement: deepspeed_json.PLACEMENTS (auto resolved against the trainable
    model's JSON). Never given to an optimizer: requires_grad is off for every parameter."""
    deepspeed = import_deepspeed()

    hide_deepspeed_deprecation()
    train_ds = ds_config(cfg, on_gpu)
    training = module.training
    module.requires_grad_(False)
    config = frozen_ds_config(train_ds, frozen_placement(placement, train_ds), width)
    engine, _, _, _ = deepspeed.initialize(model=module, config=config)
    engine.train(training)
    return engine


class PhaseClock:
    """Seconds of each phase of one step, as the metrics `time/<phase>_s` (the stages' phases, the loop's `backward`).
    On CUDA a phase starts and ends with a synchronize: GPU work is asynchronous, and an unsynchronised clock would
    charge it to the phase that next waits for it."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda *_: None)
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            key = f"time/{phase}_s"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def gathered(model):
    """The plain module of `model` (a DeepSpeed engine or a module) with every parameter present, for work whose
    number of forward calls depends on the data (generation, validation): under ZeRO-3 the parameters are gathered
    once and the per-module hooks removed for the block (DeepSpeed's unwrap_model_for_generation, TRL's pattern),
    instead of a gather per module call per token, which would also deadlock when ranks make different numbers of
    calls. A collective under ZeRO-3: every rank enters it. Below ZeRO-3 nothing is gathered.

    Inside the block call methods of the module, never the module itself: its top-level start-of-forward hook stays
    (DeepSpeed keeps it) and may run a collective. A module that routes its calls through its engine (the
    models.clip_scorer.ClipScorer: `_engine`) is switched to direct calls for the block."""
    module = getattr(model, "module", model)  # an engine's (or a stand-in's) module, or the module itself
    bound = getattr(module, "_engine", None)
    ctx = contextlib.nullcontext()
    if getattr(model, "zero_optimization_stage", lambda: 0)() == 3:
        from deepspeed.runtime.zero import unwrap_model_for_generation

        ctx = unwrap_model_for_generation(model)
    with ctx:
        if bound is not None:
            module._engine = None
        try:
            yield module
        finally:
            if bound is not None:
                module._engine = bound


def export_weights(engine, path: str | Path, extra: dict, generation=None) -> None:
    """One fp32 state dict of the whole module (frozen parts included) on rank 0, written atomically.

    The file holds {'state_dict': ...}: the layout open_clip's loader and `models.weights.load_weights` read. A
    captioner with `save_pretrained` (the Hugging Face rows) also gets hf/ beside the file: a folder transformers
    loads, whose generate searches as `generation` (the run's config) does. LoRA adapters are merged into their
    weights (models/lora.py): the export has the plain model's keys.
    """
    deepspeed = import_deepspeed()
    import torch.distributed as dist

    from .checkpoint import agree, describe_save_failure
    from .models.lora import merged_state

    module, failure = engine.module, ""
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=engine.zero_optimization_stage() == 3):
        if dist.get_rank() == 0:
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
            state = merged_state(module, state)
            tmp = f"{path}.tmp"
            try:
                torch.save({"state_dict": state, **extra}, tmp)
                os.replace(tmp, path)
                if hasattr(module, "save_pretrained"):  # Hugging Face rows: a transformers folder beside it too
                    # extra (the run's config, stage, ...) in its mark: caption and evaluate read hf/ as this run's
                    module.save_pretrained(Path(path).parent / "hf", state, generation, extra)
            except Exception as e:  # noqa: BLE001 - a full disk, an unwritable folder: one line on every rank
                failure = describe_save_failure(e, Path(path), "export")
                if os.path.isfile(tmp):
                    os.unlink(tmp)
    agree(failure)  # the checkpoint it comes from is saved: a resume of the run exports it again
