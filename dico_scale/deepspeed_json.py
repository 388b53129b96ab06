"""The DeepSpeed JSON of a run (train.deepspeed_config): read, checked against what DeepSpeed would refuse later, and
the placement it implies for the frozen models (reference, evaluator)."""
from __future__ import annotations

import json

from .errors import ConfigError

# A frozen model (reference, evaluator) is a DeepSpeed engine without an optimizer: `replicate` (ZeRO stage 0, whole
# on every rank), `shard` (ZeRO-3 partitioned, gathered module by module in its forward), `shard_offload` (ZeRO-3
# with its parameters in CPU memory), `auto` (as the trainable model: shard under ZeRO-3, offloaded when its
# parameters are, else replicate).
PLACEMENTS = ("auto", "replicate", "shard", "shard_offload")
# Sections DeepSpeed (and engine.ds_config) read as objects: a scalar there fails deep inside them as an
# AttributeError or TypeError traceback. Their values are checked later by DeepSpeed's own models
# (engine.check_deepspeed_json).
SECTIONS = ("zero_optimization", "fp16", "bf16", "bfloat16", "checkpoint", "activation_checkpointing", "comms_logger",
            "flops_profiler", "autotuning", "tensorboard", "wandb", "csv_monitor", "comet", "hybrid_engine", "compile",
            "tensor_parallel", "timers", "weight_quantization", "aio", "data_types")
SECTION_EXAMPLES = {"zero_optimization": '{"stage": 2}', "fp16": '{"enabled": true}', "bf16": '{"enabled": true}'}
ZERO_BLOCKS = ("offload_optimizer", "offload_param")


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_deepspeed_config(path: str) -> dict:
    """The JSON object of train.deepspeed_config; ConfigError naming the file and the JSON fault."""
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config '{path}': invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except OSError as e:
        raise ConfigError(f"train.deepspeed_config '{path}': cannot read it ({e.strerror or e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config '{path}': not a JSON object")
    for key in SECTIONS:
        if key in ds and not isinstance(ds[key], dict):
            example = SECTION_EXAMPLES.get(key, "")
            raise ConfigError(f"train.deepspeed_config '{path}': {key} is {_shown(ds[key])}, not a JSON object"
                              + (f" (e.g. {example})" if example else ""))
    zero = ds.get("zero_optimization", {})
    for key in ZERO_BLOCKS:  # DeepSpeed takes null there as no block
        if zero.get(key) is not None and not isinstance(zero[key], dict):
            raise ConfigError(f"train.deepspeed_config '{path}': zero_optimization.{key} is {_shown(zero[key])}, "
                              'not a JSON object (e.g. {"device": "cpu"})')
    declared = zero.get("stage", 0)  # the ZeRO stage the JSON asks for (true == 1 to Python: not a stage)
    if isinstance(declared, bool) or declared not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed_config '{path}': zero_optimization.stage {declared!r} is not 0, 1, 2 or 3")
    for key, allowed in (("fp16", (True, False)), ("bf16", (True, False, "auto"))):  # "false" would enable it
        enabled = _enabled(ds, key)
        if isinstance(enabled, str) and enabled not in allowed or not isinstance(enabled, (bool, str)):
            raise ConfigError(f"train.deepspeed_config '{path}': {key}.enabled is {_shown(enabled)}, not "
                              + " or ".join(json.dumps(a) for a in allowed))
    return ds


def _offloaded(zero: dict, what: str) -> bool:
    block = zero.get(f"offload_{what}") or {}
    return isinstance(block, dict) and block.get("device", "none") not in ("none", None)


def _enabled(ds: dict, name: str):
    block = ds.get(name) or {}
    return block.get("enabled", False) if isinstance(block, dict) else False


def check_deepspeed_combination(path: str, ds: dict) -> None:
    """Combinations of the DeepSpeed JSON and the run config that DeepSpeed would refuse (or silently ignore) later,
    on every rank, after minutes of model building: one ConfigError line now instead."""
    zero, stage = ds.get("zero_optimization") or {}, zero_stage(ds)
    if _offloaded(zero, "param") and stage != 3:
        raise ConfigError(f"train.deepspeed_config '{path}': zero_optimization.offload_param needs ZeRO stage 3, "
                          f"not {stage}")
    if _offloaded(zero, "optimizer") and stage == 0:
        raise ConfigError(f"train.deepspeed_config '{path}': zero_optimization.offload_optimizer needs ZeRO "
                          "stage 1, 2 or 3")
    if _enabled(ds, "fp16") is True and _enabled(ds, "bf16") is True:
        raise ConfigError(f"train.deepspeed_config '{path}': fp16 and bf16 are both enabled; enable one")
    if "optimizer" in ds or "scheduler" in ds:  # engine.build_engine passes its own AdamW and schedule
        raise ConfigError(f"train.deepspeed_config '{path}': remove its '{'optimizer' if 'optimizer' in ds else 'scheduler'}' "
                          "block: the optimizer and schedule come from the optim.* keys")


# Keys the trainer sets from its own config (engine.ds_config): a value of the JSON's would be replaced unseen.
TRAINER_KEYS = {"train_micro_batch_size_per_gpu": "train.micro_batch_size", "gradient_clipping": "optim.grad_clip",
                "gradient_accumulation_steps": "optim.grad_accum",
                "train_batch_size": "train.micro_batch_size x optim.grad_accum x the ranks"}
# Top-level blocks DeepSpeed refuses beside ZeRO or a client optimizer, deep in deepspeed.initialize.
UNSUPPORTED = {"amp": "apex AMP does not combine with ZeRO (train.precision picks bf16 or fp16)",
               "sparse_gradients": "sparse gradients do not combine with ZeRO",
               "compression_training": "DeepSpeed's compression training is not part of this trainer"}
MONITORS = {"tensorboard": "tensorboard", "wandb": "wandb", "comet": "comet_ml"}  # block: the package it imports
DTYPES = ("fp32", "fp16", "bf16")


def check_trainer_keys(path: str, ds: dict, device: str) -> None:
    """What the JSON may not hold beside this trainer's config (`device`: train.device), each found by DeepSpeed only
    once the models are built (or silently replaced by ds_config): one ConfigError line naming the key."""
    import importlib.util

    def fail(why: str):
        raise ConfigError(f"train.deepspeed_config '{path}': {why}")

    for key, ours in TRAINER_KEYS.items():
        if key in ds and ds[key] != "auto":
            fail(f"remove {key} ({_shown(ds[key])}): it comes from {ours}")
    for key, why in UNSUPPORTED.items():
        if key in ds:
            fail(f"remove its '{key}' block: {why}")
    every = ds.get("steps_per_print", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        fail(f"steps_per_print {_shown(every)} is not a positive integer")
    dtype = (ds.get("data_types") or {}).get("grad_accum_dtype")
    if dtype is not None and dtype not in DTYPES:
        fail(f"data_types.grad_accum_dtype {_shown(dtype)} is not one of {', '.join(DTYPES)}")
    for block, package in MONITORS.items():
        if _enabled(ds, block) is True and importlib.util.find_spec(package) is None:
            fail(f"{block}.enabled needs the {package} package, which is not installed (MLflow tracks the run: "
                 "tracking.*)")
    zero = ds.get("zero_optimization") or {}
    for what in ("optimizer", "param"):
        block = zero.get(f"offload_{what}") or {}
        if block.get("device") == "nvme":
            if not block.get("nvme_path"):
                fail(f"zero_optimization.offload_{what}: device nvme needs an nvme_path")
            if device == "cpu" or device == "auto" and not _cuda():
                fail(f"zero_optimization.offload_{what}: device nvme needs DeepSpeed's async_io op on a GPU node, not "
                     "this CPU run")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def zero_stage(ds: dict) -> int:
    return (ds.get("zero_optimization") or {}).get("stage", 0)


def frozen_placement(placement: str, ds: dict) -> str:
    """`replicate`, `shard` or `shard_offload` for a frozen model (PLACEMENTS), given the trainable model's JSON."""
    if placement != "auto":
        return placement
    zero = ds.get("zero_optimization") or {}
    if zero.get("stage", 0) != 3:
        return "replicate"
    return "shard_offload" if _offloaded(zero, "param") else "shard"
