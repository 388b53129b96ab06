"""Resuming a run: which tag, whether its frozen models are still the same, and, at another world size, its
universal conversion (universal.py); then the load and the data position. Collectives: every rank calls them.

    plan = plan_resume(cfg, log)                    # before anything heavy is built
    engine = build_engine(..., load_universal=plan.universal)
    state = resume_state(engine, plan, cfg, log)    # plan.tag is None: a fresh LoopState
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from .checkpoint import checkpoints_dir, load_checkpoint, read_marker, saved_world_size, select_resume_tag
from .config import RENAMED, Config, flatten
from .deepspeed_json import read_deepspeed_config, zero_stage
from .errors import AgreedConfigError, ConfigError, first_line
from .frozen import check_fingerprints, frozen_fingerprints
from .loop import LoopState
from .preflight import tag_setting
from .universal import finish_universal_load, universal_checkpoint


@dataclass
class ResumePlan:
    tag: Path | None  # the verified tag to resume from; None: a fresh start
    load_dir: Path | None  # the tag, or its universal conversion when it was written at another world size
    frozen: dict  # this run's fingerprints of its frozen models (frozen.py), recorded in its checkpoints

    @property
    def universal(self) -> bool:
        return self.tag is not None and self.load_dir != self.tag


NOT_SETTINGS = {"train.resume"}  # differs between a run and its resumption by design


def changed_settings(saved_yaml: str, cfg: Config, shown: int = 8) -> str | None:
    """The settings this run changes against the config the checkpoint recorded (its tag's config.yaml), as
    "key old -> new" in one line (the first `shown`, then a count), or None when none changed. A resumed run trains
    on with this run's config: an upgrade's new key or an edited learning rate changes the run from here on."""
    saved = {RENAMED.get(k, k): v for k, v in flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml))).items()}
    now = flatten(cfg)
    changes = [f"{key} {saved.get(key, '(not recorded)')!s} -> {now.get(key, '(no longer a key)')!s}"
               for key in sorted((set(saved) | set(now)) - NOT_SETTINGS) if saved.get(key) != now.get(key)]
    if not changes:
        return None
    more = f" and {len(changes) - shown} more" if len(changes) > shown else ""
    return f"{len(changes)} setting(s) differ from the checkpoint's: {', '.join(changes[:shown])}{more}"


def settings_note(tag: Path, cfg: Config) -> str | None:
    """The log line for resuming `tag` with cfg: the differing settings, or why they were not compared (a note: the
    verified tag resumes all the same); None when the tag's config.yaml matches or is absent."""
    saved = tag / "config.yaml"
    try:
        changes = changed_settings(saved.read_text(), cfg) if saved.is_file() else None
    except Exception as e:  # noqa: BLE001
        changes = f"its config.yaml was not compared ({first_line(e)})"
    return f"resuming {tag} with this run's config; {changes}" if changes else None


def _changes(tag: Path, cfg: Config) -> str | None:
    """changed_settings against the tag's config.yaml, None when it cannot be compared."""
    try:
        return changed_settings((Path(tag) / "config.yaml").read_text(), cfg)
    except Exception:  # noqa: BLE001 - no config.yaml, or one that does not parse: nothing to name
        return None


def check_zero_stage(tag: Path, saved: int | None, cfg: Config) -> None:
    """DeepSpeed resumes a tag only under the ZeRO stage it was saved at (else an empty AssertionError or a missing
    file, blamed on the model; its universal conversion does not cross stage 3 either), but for 1 <-> 2: one
    partitioned optimizer layout, the next step is bitwise the same. Every rank raises it (they read one marker)."""
    path = cfg.train.deepspeed_config
    now = zero_stage(read_deepspeed_config(path))
    if saved is None or saved == now or {saved, now} == {1, 2}:
        return
    was = tag_setting(tag, "deepspeed_config")
    again = f"train.deepspeed_config={was}" if was else f"a stage {saved} train.deepspeed_config"
    raise AgreedConfigError(f"checkpoint {tag} was saved under ZeRO stage {saved}, the run is configured for stage "
                            f"{now} (train.deepspeed_config {path}): DeepSpeed resumes a checkpoint only under its own "
                            f"stage (1 and 2 share one layout); resume it with {again}")


def plan_resume(cfg: Config, log) -> ResumePlan:
    """The tag (verified), the frozen models and its ZeRO stage checked against it (ConfigError, one line), then its
    universal conversion when the world size differs: nothing is built and the MLflow run is not touched before the
    checks."""
    tag = select_resume_tag(cfg.train.resume, str(checkpoints_dir(cfg.train.output_dir)), log)
    frozen = frozen_fingerprints(cfg, log)
    if tag is None:
        return ResumePlan(None, None, frozen)
    marker = read_marker(tag)
    check_fingerprints(marker, frozen, tag, log)
    check_zero_stage(tag, marker.get("zero_stage"), cfg)
    if note := settings_note(tag, cfg):
        log(note)
    # ZeRO-0 keeps the whole optimizer state in the model states file, which any world size loads as it is
    elastic = saved_world_size(tag) not in (None, dist.get_world_size()) and marker.get("zero_stage") != 0
    return ResumePlan(tag, universal_checkpoint(tag, log) if elastic else tag, frozen)


def rescale_position(batch_in_epoch: int, saved_ranks: int, saved_batch: int, ranks: int, batch: int) -> int:
    """Micro-batches per rank consumed in the epoch, from the saved world and micro-batch size to this run's: the
    samples consumed divided by those of one micro-step of this run, rounded down. A remainder (fewer than
    ranks * batch samples) is not counted, so the resumed epoch reads up to ranks * batch - 1 samples more than an
    uninterrupted one would have, never fewer; the same sizes give the position back unchanged."""
    return batch_in_epoch * saved_ranks * saved_batch // (ranks * batch)


def resume_state(engine, plan: ResumePlan, cfg: Config, log) -> LoopState:
    """Loads plan.load_dir into the engine (weights, optimizer, LR schedule, global step) and returns the loop state
    at the saved data position, its micro-batch count converted to this run's world size. Fresh: a new LoopState."""
    if plan.tag is None:
        return LoopState(frozen_models=plan.frozen)
    try:
        client = load_checkpoint(engine, plan.load_dir)
    except Exception as e:  # noqa: BLE001 - DeepSpeed's and torch's errors (a size mismatch, an assertion)
        lines = [line.strip() for line in str(e).strip().splitlines()[:2]]  # torch: a heading, then the 1st problem
        raise ConfigError(f"checkpoint {plan.tag} does not fit the configured model ({type(e).__name__}: "
                          f"{' '.join(lines)[:300]})"
                          + (f"; {changes}" if (changes := _changes(plan.tag, cfg)) else "")) from None
    if plan.universal:
        finish_universal_load(engine, plan.load_dir)
    state = LoopState.from_client_state(client)
    # DeepSpeed's own record of the saving run: its data-parallel size and micro-batch size
    saved_ranks = engine.loaded_checkpoint_dp_world_size or dist.get_world_size()
    saved_batch = client.get("ds_config", {}).get("train_micro_batch_size_per_gpu", cfg.train.micro_batch_size)
    state.batch_in_epoch = rescale_position(state.batch_in_epoch, saved_ranks, saved_batch, dist.get_world_size(),
                                            cfg.train.micro_batch_size)
    state.frozen_models = plan.frozen  # equal to the saved ones (checked), or first recorded now
    dist.barrier()  # every rank has loaded before the MLflow run is touched
    log(f"resumed from {plan.tag} at step {engine.global_steps} (epoch {state.epoch}, batch {state.batch_in_epoch}"
        + (f"; written by {saved_ranks} ranks)" if saved_ranks != dist.get_world_size() else ")"))
    step, last = engine.global_steps, cfg.train.max_steps
    if step >= last:  # the loop trains no step, and the run exports the checkpoint's model as it is
        log(f"resumed at step {step}, {'past' if step > last else 'at'} train.max_steps={last}: nothing to train; "
            f"exporting step {step} (raise train.max_steps to train on)")
    return state
