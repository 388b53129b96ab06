"""The one training loop. Stages supply `step`; this file owns batching, backward/step through DeepSpeed,
non-finite guards, logging, validation, checkpoints and the data position."""
from __future__ import annotations

import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .config import Config, to_yaml
from .data.pipeline import faults as data_faults
from .engine import save_checkpoint


PREEMPTED_EXIT = 3  # exit code of a run that checkpointed because it was told to stop (slurm/launch.sh knows it)


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(Exception):
    """Raised after the checkpoint of a run asked to stop (signal or approaching time limit) has been written."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}; checkpoint saved")
        self.step = step


class StopFlag:
    """Set by a signal handler, which does nothing else: saving inside a handler has hung trainers.
    The loop reads it after each optimizer step; the ranks agree on it so they all checkpoint together."""

    def __init__(self, signal_name: str):
        self.raised = False
        if signal_name:
            signal.signal(signal.Signals[signal_name], self._handler)

    def _handler(self, signum, frame):
        self.raised = True

    def agreed(self, device) -> bool:
        flag = torch.tensor([float(self.raised)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class LoopState:
    """What a checkpoint must carry besides DeepSpeed's own state."""
    epoch: int = 0
    samples_seen: int = 0  # images, all ranks together
    nonfinite_skipped: int = 0
    mlflow_run_id: str | None = None

    def client_state(self, step: int) -> dict:
        return {"step": step, "epoch": self.epoch, "samples_seen": self.samples_seen,
                "nonfinite_skipped": self.nonfinite_skipped, "mlflow_run_id": self.mlflow_run_id}


def all_finite(loss: torch.Tensor) -> bool:
    """Every rank must agree, or one rank would skip a collective the others enter."""
    flag = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=loss.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class MetricWindow:
    """Sums of per-micro-step metrics between two log points, averaged across ranks when read."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.count, self.images, self.tokens, self.start = defaultdict(float), 0, 0, 0, time.perf_counter()

    def add(self, loss, metrics, images, tokens):
        self.sums["train/loss"] += float(loss)
        for k, v in metrics.items():
            self.sums[k] += float(v)
        self.count, self.images, self.tokens = self.count + 1, self.images + images, self.tokens + tokens

    def read(self, device) -> dict[str, float]:
        """Means over the window and the ranks, throughput and data faults summed over the ranks."""
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] / max(1, self.count) for k in keys]
                         + [self.images, self.tokens, sum(data_faults.values())], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        world, elapsed = dist.get_world_size(), max(1e-9, time.perf_counter() - self.start)
        out = {k: float(v) / world for k, v in zip(keys, t[:-3].tolist())}
        out["train/images_per_s"] = float(t[-3]) / elapsed
        out["train/tokens_per_s"] = float(t[-2]) / elapsed
        out["data/faults"] = float(t[-1])  # this process's loaders (workers keep their own counts)
        self.reset()
        return out


def run_validation(stage, engine, make_val_loader, tracker, step: int) -> dict[str, float]:
    loader = make_val_loader()
    if loader is None:
        return {}
    metrics, artifacts = stage.validate(engine, loader)
    tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)
    for name, obj in artifacts.items():
        tracker.log_dict(obj, f"val/step_{step:08d}/{name}")
    if metrics and dist.get_rank() == 0:
        tqdm.write(f"[val step {step}] " + " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return metrics


def train_loop(cfg: Config, stage, engine, tracker, make_train_loader, make_val_loader, state: LoopState) -> dict:
    t = cfg.train
    ckpt_dir = str(Path(t.output_dir) / "checkpoints")
    device, rank = next(engine.module.parameters()).device, dist.get_rank()
    step, last_saved, last_val, val_metrics = engine.global_steps, engine.global_steps, -1, {}
    consecutive_bad, window, stop = 0, MetricWindow(), StopFlag(t.preempt_signal)
    bar = tqdm(total=t.max_steps, initial=step, disable=rank != 0, desc=f"{stage.name}", dynamic_ncols=True)

    def save():
        save_checkpoint(engine, ckpt_dir, step, state.client_state(step), to_yaml(cfg), t.keep_checkpoints)

    while step < t.max_steps:
        batches = 0
        for batch in make_train_loader(state.epoch):
            batches += 1
            out = stage.step(engine, batch)
            if not all_finite(out.loss):
                state.nonfinite_skipped += 1
                consecutive_bad += 1
                tracker.log_metrics({"train/nonfinite_skipped": state.nonfinite_skipped}, step)
                if consecutive_bad >= t.max_nonfinite_steps:
                    raise NonFiniteLossError(f"{consecutive_bad} non-finite losses in a row at step {step} "
                                             f"(train.max_nonfinite_steps={t.max_nonfinite_steps})")
                continue
            consecutive_bad = 0
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside engine.step)
            engine.backward(out.loss)
            engine.step()
            window.add(out.loss.detach(), out.metrics, out.images, out.tokens)
            state.samples_seen += out.images * dist.get_world_size()
            if engine.global_steps == step:  # inside a gradient-accumulation window
                continue
            step = engine.global_steps
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                metrics = window.read(device)
                metrics.update({"train/lr": lr, "train/epoch": state.epoch,
                                "train/samples_seen": state.samples_seen})
                tracker.log_metrics(metrics, step)
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            if t.val_every and step % t.val_every == 0:
                val_metrics, last_val = run_validation(stage, engine, make_val_loader, tracker, step), step
            if t.save_every and step % t.save_every == 0:
                save()
                last_saved = step
            if stop.agreed(device):
                if last_saved != step:
                    save()
                bar.close()
                raise Preempted(step)
            if step >= t.max_steps:
                break
        else:
            if batches == 0:
                raise RuntimeError(f"epoch {state.epoch} of data.train_shards yielded no batch on rank {rank}")
            state.epoch += 1
    bar.close()
    if last_val != step:
        val_metrics = run_validation(stage, engine, make_val_loader, tracker, step)
    if last_saved != step:
        save()
    return {"step": step, "val": val_metrics, "epoch": state.epoch, "nonfinite_skipped": state.nonfinite_skipped}
