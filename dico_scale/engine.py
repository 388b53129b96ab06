"""DeepSpeed set-up (gloo on CPU, nccl on GPU), LR schedule and weight export (checkpoints: checkpoint.py).

Import order matters: `setup_environment` runs before deepspeed is first imported, since DeepSpeed picks its
accelerator (DS_ACCELERATOR) at import time.
"""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import torch

from .config import Config, ConfigError, read_deepspeed_config


def setup_environment(cfg: Config) -> None:
    """CPU accelerator when there is no CUDA; single-process defaults for RANK & co (else DeepSpeed tries mpi4py)."""
    use_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
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
        torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // local))


def init_distributed() -> torch.device:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    if on_cpu:
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


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
    bf16 = ds.get("bf16", {}).get("enabled", "auto")
    ds["bf16"] = {"enabled": on_gpu and torch.cuda.is_bf16_supported() if bf16 == "auto" else bool(bf16)}
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


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


def build_engine(cfg: Config, module: torch.nn.Module, on_gpu: bool, load_universal: bool = False):
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config(cfg, on_gpu, load_universal),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    return engine


def export_weights(engine, path: str | Path, extra: dict) -> None:
    """One fp32 state dict of the whole module (frozen parts included) on rank 0, written atomically.

    The file holds {'state_dict': ...}: the layout open_clip's loader and `load_weights` read.
    """
    import deepspeed
    import torch.distributed as dist

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=engine.zero_optimization_stage() == 3):
        if dist.get_rank() == 0:
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
            tmp = f"{path}.tmp"
            torch.save({"state_dict": state, **extra}, tmp)
            os.replace(tmp, path)
    dist.barrier()


def load_weights(module: torch.nn.Module, path: str) -> None:
    """Weights from an exported file (export_weights' model.pt, or `dico_scale.export --format safetensors`) or a
    DeepSpeed checkpoint tag folder; strict."""
    try:
        if os.path.isdir(path):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            p = Path(path)
            state = get_fp32_state_dict_from_zero_checkpoint(str(p.parent), tag=p.name)
        elif path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as e:
        raise ConfigError(f"cannot read weights '{path}': {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k} has shape {list(v.shape)}, model wants {list(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        raise ConfigError(f"weights '{path}' do not fit the configured model ({len(problems)} problems): "
                          + "; ".join(problems[:3]))
    module.load_state_dict(state, strict=True)
