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
    declared = zero.get("stage", 0)  # the ZeRO stage the JSON asks for
    if declared not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed_config '{path}': zero_optimization.stage {declared!r} is not 0, 1, 2 or 3")
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
