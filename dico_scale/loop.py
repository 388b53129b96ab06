"""The one training loop. Stages supply `step`; this file owns batching, backward/step through DeepSpeed,
non-finite guards, logging, validation (the best checkpoint: selection.py), checkpoints and the data position."""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .config import Config, to_yaml
from .data.pipeline import KINDS
from .engine import PhaseClock
from .errors import DataError, NonFiniteLossError, Preempted
from .checkpoint import checkpoints_dir, save_checkpoint
from .frozen import KEY as FROZEN_KEY
from .selection import Selection, SelectionError, reconcile_best, select_best
from .supervision import StopFlag


DATA_FIELDS = ("read", "skipped", *KINDS)  # counts carried by batch["data_stats"]


@dataclass
class LoopState:
    """What a checkpoint must carry besides DeepSpeed's own state."""
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (the same on every rank)
    samples_seen: int = 0  # images, all ranks together
    nonfinite_skipped: int = 0
    data: Counter = field(default_factory=Counter)  # DATA_FIELDS summed over ranks and over the run's segments
    mlflow_run_id: str | None = None
    best: dict | None = None  # the best validation so far (Selection.observe's record), the same on every rank
    since_best: int = 0  # validations since `best` without an improvement (the patience count)
    frozen_models: dict | None = None  # fingerprints of the frozen models' weights (frozen.py), set by resume.py

    def client_state(self, step: int) -> dict:
        return {"step": step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "samples_seen": self.samples_seen, "nonfinite_skipped": self.nonfinite_skipped,
                "data": dict(self.data), "mlflow_run_id": self.mlflow_run_id, "best": self.best,
                "since_best": self.since_best, FROZEN_KEY: self.frozen_models}

    @classmethod
    def from_client_state(cls, cs: dict) -> "LoopState":
        """Continues the saved epoch where it stopped; a checkpoint without the position starts the next epoch."""
        known = "batch_in_epoch" in cs
        return cls(epoch=cs.get("epoch", 0) + (not known), batch_in_epoch=cs.get("batch_in_epoch", 0),
                   samples_seen=cs.get("samples_seen", 0), nonfinite_skipped=cs.get("nonfinite_skipped", 0),
                   data=Counter(cs.get("data", {})), mlflow_run_id=cs.get("mlflow_run_id"), best=cs.get("best"),
                   since_best=cs.get("since_best", 0))


class DataCounts:
    """Reads and faults of this rank's batches since the last flush; flushed into the run totals, summed over ranks."""

    def __init__(self):
        self.pending = Counter()

    def add(self, batch) -> None:
        if isinstance(batch, dict):
            self.pending.update(batch.get("data_stats", {}))

    def flush(self, totals: Counter, device) -> None:
        """A collective: every rank calls it at the same step."""
        t = torch.tensor([float(self.pending[k]) for k in DATA_FIELDS], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        totals.update({k: int(v) for k, v in zip(DATA_FIELDS, t.tolist()) if v})
        self.pending.clear()


def data_metrics(totals: Counter) -> dict[str, float]:
    out = {"data/faults": float(sum(totals[k] for k in KINDS)), "data/skipped_share": skipped_share(totals)}
    out.update({f"data/faults/{k}": float(totals[k]) for k in KINDS})
    return out


def skipped_share(totals: Counter) -> float:
    return totals["skipped"] / max(1, totals["read"])


def check_data_bound(totals: Counter, bound: float, min_samples: int) -> None:
    """Raises DataError on every rank at once (totals are all-reduced) when too much data was skipped."""
    share = skipped_share(totals)
    if totals["read"] < min_samples or share <= bound:
        return
    kind = max(KINDS, key=lambda k: totals[k])
    raise DataError(f"skipped {share:.2%} of {totals['read']} samples read, past data.max_skipped_share={bound} "
                    f"(most common fault: {kind}, {totals[kind]} times)", agreed=True)


def data_summary(totals: Counter, bound: float, min_samples: int) -> list[str]:
    """The lines a run ends with: what was read and skipped, and a warning when the skipped share is past the bound
    that was not enforced because fewer than min_samples were read."""
    share = skipped_share(totals)
    faults = ", ".join(f"{k} {totals[k]}" for k in KINDS if totals[k]) or "none"
    lines = [f"data: {totals['read']} samples read, {totals['skipped']} skipped ({share:.2%}); faults: {faults}"]
    if share > bound and totals["read"] < min_samples:
        lines.append(f"warning: the skipped share {share:.2%} is past data.max_skipped_share={bound}, which is enforced "
                     f"only once data.skipped_share_min_samples={min_samples} samples were read")
    return lines


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
        t = torch.tensor([self.sums[k] / max(1, self.count) for k in keys] + [self.images, self.tokens],
                         dtype=torch.float64, device=device)
        dist.all_reduce(t)
        world, elapsed = dist.get_world_size(), max(1e-9, time.perf_counter() - self.start)
        out = {k: float(v) / world for k, v in zip(keys, t[:-2].tolist())}
        out["train/images_per_s"] = float(t[-2]) / elapsed
        out["train/tokens_per_s"] = float(t[-1]) / elapsed
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


def report_data(cfg: Config, totals: Counter) -> None:
    if dist.get_rank() == 0:
        for line in data_summary(totals, cfg.data.max_skipped_share, cfg.data.skipped_share_min_samples):
            tqdm.write(line)


def train_loop(cfg: Config, stage, engine, tracker, make_train_loader, make_val_loader, state: LoopState) -> dict:
    """make_train_loader(epoch, start_batch) yields the epoch's batches after its first start_batch ones."""
    stop = StopFlag(cfg.train.preempt_signal, cfg.train.stop_timeout_s, before_exit=tracker.spill)
    try:
        return _train(cfg, stage, engine, tracker, make_train_loader, make_val_loader, state, stop)
    finally:
        stop.close()


def _train(cfg: Config, stage, engine, tracker, make_train_loader, make_val_loader, state: LoopState, stop) -> dict:
    t = cfg.train
    ckpt_dir = str(checkpoints_dir(t.output_dir))
    device, rank = next(engine.module.parameters()).device, dist.get_rank()
    step, last_saved, last_val, val_metrics = engine.global_steps, engine.global_steps, -1, {}
    consecutive_bad, window, data, train_metrics = 0, MetricWindow(), DataCounts(), {}
    sel, best_dir, stopped_early = Selection.from_config(t), Path(t.output_dir) / "best", False
    if sel is not None:
        reconcile_best(sel, state, best_dir, step, device)
        if sel.should_stop(state.best, state.since_best):  # resumed after its early stop: nothing left to train
            stopped_early, last_val = True, step
            if rank == 0:
                tqdm.write(sel.stop_line(step, state.best) + " (before this resume)")
    bar = tqdm(total=t.max_steps, initial=step, disable=rank != 0, desc=f"{stage.name}", dynamic_ncols=True)

    def save():
        data.flush(state.data, device)  # the totals in the checkpoint include this rank's latest batches
        # the stage and what it started from: a resume by another stage is refused (preflight.check_stage)
        identity = {"stage": t.stage, "init_from": t.init_from}
        save_checkpoint(engine, ckpt_dir, step, {**state.client_state(step), **identity}, to_yaml(cfg),
                        t.keep_checkpoints)

    def validate() -> bool:
        """Validation, then the best checkpoint; True (on every rank) when the patience ran out."""
        nonlocal val_metrics, last_val
        val_metrics, last_val = run_validation(stage, engine, make_val_loader, tracker, step), step
        try:
            return sel is not None and select_best(sel, cfg, engine, tracker, state, val_metrics, step, best_dir,
                                                   device)
        except SelectionError:
            bar.close()  # the one-line error then starts a line of its own
            raise

    while step < t.max_steps and not stopped_early:
        batches = 0
        for batch in make_train_loader(state.epoch, state.batch_in_epoch):
            batches += 1
            state.batch_in_epoch += 1
            data.add(batch)
            out = stage.step(engine, batch)
            if not all_finite(out.loss):
                state.nonfinite_skipped += 1
                consecutive_bad += 1
                tracker.log_metrics({"train/nonfinite_skipped": state.nonfinite_skipped}, step)
                if consecutive_bad >= t.max_nonfinite_steps:
                    bar.close()  # the one-line error then starts a line of its own
                    raise NonFiniteLossError(f"{consecutive_bad} non-finite losses in a row at step {step} "
                                             f"(train.max_nonfinite_steps={t.max_nonfinite_steps})")
                continue
            consecutive_bad = 0
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside engine.step)
            clock = PhaseClock(device)
            with clock("backward"):  # and the optimizer step
                engine.backward(out.loss)
                engine.step()
            window.add(out.loss.detach(), {**out.metrics, **clock.seconds}, out.images, out.tokens)
            state.samples_seen += out.images * dist.get_world_size()
            if engine.global_steps == step:  # inside a gradient-accumulation window
                continue
            step = engine.global_steps
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                metrics = window.read(device)
                data.flush(state.data, device)
                metrics.update({"train/lr": lr, "train/epoch": state.epoch,
                                "train/samples_seen": state.samples_seen, **data_metrics(state.data)})
                tracker.log_metrics(metrics, step)
                train_metrics = metrics
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                check_data_bound(state.data, cfg.data.max_skipped_share, cfg.data.skipped_share_min_samples)
            if t.val_every and step % t.val_every == 0:
                stopped_early = validate()
            if t.save_every and step % t.save_every == 0:
                save()
                last_saved = step
            if stopped_early:  # every rank agrees (the decision is rank 0's, broadcast); saved below, exit 0
                if rank == 0:
                    tqdm.write(sel.stop_line(step, state.best))
                tracker.set_tags({"stopped_early_at": step})
                break
            reason = stop.agreed_reason(device)
            if reason is not None:
                if rank == 0:
                    tqdm.write(f"stopping at step {step}: {reason}; saving a checkpoint")
                if last_saved != step:
                    save()
                bar.close()
                report_data(cfg, state.data)
                raise Preempted(step)
            if step >= t.max_steps:
                break
        else:
            if batches == 0 and state.batch_in_epoch == 0:
                raise RuntimeError(f"epoch {state.epoch} of data.train_shards yielded no batch on rank {rank}")
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0  # also when a resume found the epoch complete
    bar.close()
    if last_val != step and t.validate_at_end:
        validate()  # the last validation competes for the best too
    if last_saved != step:
        save()
    report_data(cfg, state.data)
    return {"step": step, "val": val_metrics, "epoch": state.epoch, "nonfinite_skipped": state.nonfinite_skipped,
            "batch_in_epoch": state.batch_in_epoch, "samples_seen": state.samples_seen, "data": dict(state.data),
            "stopped_early": stopped_early, "best": state.best, "train": train_metrics}
