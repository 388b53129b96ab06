"""Best checkpoint and early stopping: train.select_best, select_floor and patience, decided on rank 0 after each
validation (the metrics live there) and broadcast, so every rank exports, stops or raises at the same step."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from .checks import parse_select_best, parse_select_floor
from .config import Config, to_yaml
from .errors import AgreedConfigError
from .engine import export_weights


class SelectionError(AgreedConfigError):
    """train.select_best / select_floor name a metric that the validation does not log; raised on every rank at
    the same step (exit 2)."""


@dataclass(frozen=True)
class Selection:
    """train.select_best, select_floor and patience: which validation is the best so far, and when to stop early."""
    metric: str  # the validation metric's name without 'val/'
    mode: str = "max"  # max | min
    floor: tuple[str, str, float] | None = None  # (metric without 'val/', '>=' or '<=', bound)
    patience: int = 0  # 0: never stop early

    @classmethod
    def from_config(cls, t) -> "Selection | None":
        if not t.select_best:
            return None
        floor = parse_select_floor(t.select_floor) if t.select_floor else None
        return cls(*parse_select_best(t.select_best), floor=floor, patience=t.patience)

    @property
    def name(self) -> str:
        return f"val/{self.metric}"

    def problem(self, metrics: dict, step: int) -> str | None:
        """One line when the validation did not log a metric that the selection reads, else None."""
        wanted = [("train.select_best", self.metric)] + ([("train.select_floor", self.floor[0])] if self.floor else [])
        for key, name in wanted:
            if name not in metrics:
                logged = ", ".join(f"val/{k}" for k in sorted(metrics)) or "no metric"
                return f"{key}: the validation at step {step} logged no val/{name} (it logged {logged})"
        return None

    def passes_floor(self, metrics: dict) -> bool:
        """metrics without the 'val/' prefix; nan never passes."""
        if self.floor is None:
            return True
        name, op, bound = self.floor
        value = float(metrics[name])
        return value >= bound if op == ">=" else value <= bound

    def better(self, value: float, than: float | None) -> bool:
        """Strictly better: a tie is no improvement, and nan never is."""
        if math.isnan(value):
            return False
        return than is None or (value > than if self.mode == "max" else value < than)

    def observe(self, best: dict | None, since_best: int, metrics: dict, step: int) -> tuple[dict | None, int, bool]:
        """(best, since_best, improved) after a validation (metrics without 'val/'). The patience count starts at
        the first selectable validation: before one passed the floor (and was not nan), nothing counts."""
        value = float(metrics[self.metric])
        if self.passes_floor(metrics) and self.better(value, None if best is None else best["value"]):
            record = {"metric": self.name, "mode": self.mode, "value": value, "step": step,
                      "metrics": {f"val/{k}": float(v) for k, v in sorted(metrics.items())}}
            return record, 0, True
        return best, since_best + (best is not None), False

    def should_stop(self, best: dict | None, since_best: int) -> bool:
        return bool(self.patience) and best is not None and since_best >= self.patience

    def fits(self, best: dict) -> bool:
        """Whether a saved best was selected as this selection would select it (metric, direction, floor)."""
        metrics = {k[len("val/"):]: v for k, v in best.get("metrics", {}).items() if k.startswith("val/")}
        return (best.get("metric"), best.get("mode", "max")) == (self.name, self.mode) and (
            self.floor is None or (self.floor[0] in metrics and self.passes_floor(metrics)))

    def none_selected_line(self, t) -> str:
        """Why a run that selects ends without best/: its validations never passed (train.select_floor, a nan)."""
        floor = f"none passed train.select_floor={t.select_floor} or " if self.floor else ""
        return (f"warning: train.select_best={t.select_best} selected no validation ({floor}its {self.name} was "
                "never a number): there is no best/model.pt, and model.pt holds the last step")

    def stop_line(self, step: int, best: dict) -> str:
        return (f"early stop at step {step}: no improvement of {self.name} for {self.patience} validations "
                f"(best {best['value']:.6g} at step {best['step']})")


def _broadcast(obj, device):
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def reconcile_best(sel: Selection, state, best_dir: Path, step: int, device) -> None:
    """A collective, before training: best/ must hold the best the (resumed) state knows. A best/ written after the
    checkpoint by a run that died, a best/ of an earlier run in this folder, or a selection that changed since the
    checkpoint: best/ is removed (one line), and the selection starts over when the state's best no longer fits."""
    line, reset = None, False
    if dist.get_rank() == 0:
        try:
            on_disk = json.loads((best_dir / "best.json").read_text())
        except (OSError, ValueError):
            on_disk = None
        if on_disk is not None and not (best_dir / "model.pt").is_file():
            on_disk = None
        held = (on_disk or {}).get("step")
        b = state.best
        if b is not None and not sel.fits(b):
            reset = True
            line = (f"best checkpoint: the checkpoint's best was selected by {b.get('metric')}:{b.get('mode', 'max')}, "
                    f"this run selects by {sel.name}:{sel.mode}{' with a floor' if sel.floor else ''}; the selection "
                    f"starts over at step {step}")
        elif b is not None and (on_disk is None or (held, on_disk.get("metric")) != (b["step"], b["metric"])):
            reset = True
            line = (f"best checkpoint: {best_dir} does not hold the resumed checkpoint's best (step {b['step']}); "
                    f"the selection starts over at step {step}")
        elif b is None and (best_dir / "best.json").exists():
            line = f"best checkpoint: removing {best_dir} (step {held}): not a best of this run (at step {step})"
        if line:
            tqdm.write(line)
            for name in ("model.pt", "best.json"):
                (best_dir / name).unlink(missing_ok=True)
    if _broadcast(reset, device):
        state.best, state.since_best = None, 0


def select_best(sel: Selection, cfg: Config, engine, tracker, state, metrics: dict, step: int,
                best_dir: Path, device) -> bool:
    """A collective after each validation (metrics are on rank 0): on an improvement every rank exports
    best/model.pt, rank 0 writes best/best.json and logs best/<metric>, best/step and the tag best_step. True when
    the patience ran out. SelectionError on every rank when the validation lacks a selected metric."""
    decision = None
    if dist.get_rank() == 0:
        problem = sel.problem(metrics, step)
        decision = ("error", problem) if problem else ("ok", *sel.observe(state.best, state.since_best, metrics, step))
    decision = _broadcast(decision, device)
    if decision[0] == "error":
        raise SelectionError(decision[1])
    _, state.best, state.since_best, improved = decision
    if improved:
        best = state.best
        if dist.get_rank() == 0:
            best_dir.mkdir(parents=True, exist_ok=True)
        export_weights(engine, best_dir / "model.pt",
                       {"config": to_yaml(cfg), "stage": cfg.train.stage, "step": step,
                        "mlflow_run_id": state.mlflow_run_id, "best": best}, cfg.generation)
        if dist.get_rank() == 0:  # after the weights: best.json never names weights that are not there yet
            _write_json(best_dir / "best.json", best)
            tqdm.write(f"best {sel.name}={best['value']:.6g} at step {step}: {best_dir / 'model.pt'}")
        tracker.log_metrics({f"best/{sel.metric}": best["value"], "best/step": step}, step)
        tracker.set_tags({"best_step": step, "best_metric": sel.name, "best_value": best["value"]})
    return sel.should_stop(state.best, state.since_best)
