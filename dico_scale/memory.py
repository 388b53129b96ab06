"""Bytes per rank of each model's parameters, gradients and optimizer state under its ZeRO stage.

The accounting of the ZeRO paper (Rajbhandari et al., 2020, section 3), as DeepSpeed lays the tensors out:
  parameters  the working copy in the training dtype (2 bytes bf16/fp16, 4 fp32); partitioned under ZeRO stage 3
  gradients   one per trainable parameter in the training dtype; partitioned from ZeRO stage 2
  optimizer   Adam's fp32 m and v plus DeepSpeed's fp32 master copy of the trainable parameters (it keeps one in
              fp32 training too): 12 bytes per trainable parameter; partitioned from ZeRO stage 1
A partitioned tensor costs ceil(n / world) per rank. Frozen parameters (the captioner's image tower, the reference,
the evaluator) have no gradient and no optimizer state. Offloaded parts live in CPU memory, not on the accelerator;
`device_bytes` counts only what stays there. benchmarks/memory.py checks these numbers against the tensors the ranks
actually hold.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

OPTIMIZER_BYTES = 12  # fp32 master + Adam m + v


@dataclass
class ModelMemory:
    name: str
    zero_stage: int
    params: int  # bytes per rank
    grads: int
    optimizer: int
    params_offloaded: bool = False
    optimizer_offloaded: bool = False

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def device_bytes(self) -> int:
        """What stays in accelerator memory (offloaded parts are in CPU memory)."""
        return ((0 if self.params_offloaded else self.params) + self.grads
                + (0 if self.optimizer_offloaded else self.optimizer))

    def as_params(self) -> dict[str, str]:
        """MLflow params: memory/<model>/{zero_stage, params, grads, optimizer, device_bytes} (bytes per rank),
        *_offloaded."""
        out = {f"memory/{self.name}/{k}": str(v) for k, v in asdict(self).items() if k != "name"}
        out[f"memory/{self.name}/device_bytes"] = str(self.device_bytes)
        return out


def account(name: str, n_params: int, n_trainable: int, zero_stage: int, world: int, dtype_bytes: int,
            params_offloaded: bool = False, optimizer_offloaded: bool = False,
            local_params: int | None = None) -> ModelMemory:
    """Bytes per rank by the ZeRO paper's accounting (see the module docstring). local_params: the parameter elements
    a ZeRO-3 rank really holds, when known (its shards, plus the small parameters it keeps whole: DeepSpeed's
    stage3_param_persistence_threshold)."""
    def share(n: int, partitioned: bool) -> int:
        return math.ceil(n / world) if partitioned else n

    held = local_params if local_params is not None and zero_stage == 3 else share(n_params, zero_stage == 3)
    return ModelMemory(name, zero_stage, params=held * dtype_bytes,
                       grads=share(n_trainable, zero_stage >= 2) * dtype_bytes,
                       optimizer=share(n_trainable, zero_stage >= 1) * OPTIMIZER_BYTES,
                       params_offloaded=params_offloaded, optimizer_offloaded=optimizer_offloaded)


def _offloaded(zero: dict, what: str) -> bool:
    block = zero.get(f"offload_{what}") or {}
    return block.get("device", "none") not in ("none", None)


def engine_dtype_bytes(engine) -> int:
    """Bytes of a live DeepSpeed engine's training dtype: 2 under bf16 or fp16, else 4."""
    return 2 if engine.bfloat16_enabled() or engine.fp16_enabled() else 4


def engine_memory(name: str, engine) -> ModelMemory:
    """The accounting of a live DeepSpeed engine (a frozen one has no trainable parameters)."""
    import torch.distributed as dist

    params = list(engine.module.parameters())
    numel = [getattr(p, "ds_numel", p.numel()) for p in params]  # ZeRO-3 leaves empty placeholders in p.data
    n_trainable = sum(n for p, n in zip(params, numel) if p.requires_grad) if engine.optimizer is not None else 0
    zero = engine.config.get("zero_optimization", {}) if isinstance(engine.config, dict) else {}
    local = None
    if engine.zero_optimization_stage() == 3:  # the shard each rank holds, and the persistent parameters whole
        local = sum(p.ds_tensor.numel() + (p.ds_numel if getattr(p, "ds_persist", False) else 0) for p in params)
    return account(name, sum(numel), n_trainable, engine.zero_optimization_stage(), dist.get_world_size(),
                   engine_dtype_bytes(engine),
                   _offloaded(zero, "param"), _offloaded(zero, "optimizer"), local)


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def report(models: list[ModelMemory]) -> list[str]:
    """One line per model and one for the sum, for rank 0's log."""
    lines = []
    for m in models:
        where = "".join([", parameters offloaded to CPU" if m.params_offloaded else "",
                         ", optimizer offloaded to CPU" if m.optimizer_offloaded else ""])
        lines.append(f"memory per rank, {m.name} (ZeRO stage {m.zero_stage}{where}): parameters {human(m.params)}, "
                     f"gradients {human(m.grads)}, optimizer state {human(m.optimizer)}")
    total = sum(m.total for m in models)
    lines.append(f"memory per rank, all models: {human(total)} ({human(sum(m.device_bytes for m in models))} "
                 "on the accelerator)")
    return lines
