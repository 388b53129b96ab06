"""The stage table: every stage the trainer knows, in one place. Config validation, `build_stage`, export, evaluate,
the demo and `compare` read it; a new stage is one module in this package and one row here. What is particular to
a stage lives on its class (stages/base.py): its config checks (`check_config`, which checks.validate calls last)
and the frozen weight files a resume must find unchanged (`frozen_files`, which frozen.py fingerprints).

Importable without torch (checks.py reads it before anything heavy): the stage classes are named as strings and
imported only by `stage_class`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str  # train.stage
    cls: str  # "module:Class", imported lazily
    section: str | None  # the config section of the stage's own keys (None: no keys of its own)
    exports: str  # what <output_dir>/model.pt holds: "captioner" or "evaluator" (an open_clip CLIP)
    label: str  # how tables and figures name the stage's models
    starts_from: str | None  # the stage whose exported model this one starts from in the demo pipeline


STAGES: dict[str, StageSpec] = {s.name: s for s in [
    StageSpec("evaluator", "dico_scale.stages.contrastive:ContrastiveStage", None, "evaluator", "evaluator", None),
    StageSpec("xe", "dico_scale.stages.xe:XEStage", None, "captioner", "XE", "evaluator"),
    StageSpec("dico", "dico_scale.stages.dico:DicoStage", "dico", "captioner", "DiCO", "xe"),
    StageSpec("scst", "dico_scale.stages.scst:ScstStage", "scst", "captioner", "SCST", "xe"),
]}


def stage_overrides(overrides: list[str], stage: str) -> list[str]:
    """The key=value overrides a run of `stage` reads, of those given to every run (compare's, the demo's): another
    stage's section (scst.* in a dico run) would do nothing there but be warned about (checks.warn_unread_settings)."""
    others = tuple(f"{s.section}." for s in STAGES.values() if s.section and s.name != stage)
    return [o for o in overrides if not o.split("=", 1)[0].strip().startswith(others)]


def captioner_stages() -> tuple[str, ...]:
    """The stages whose model.pt holds a captioner, read when asked (a row added later counts too)."""
    return tuple(n for n, s in STAGES.items() if s.exports == "captioner")


def chain(name: str) -> list[str]:
    """The stages to train, in order, to get `name`'s model from scratch: e.g. dico -> [evaluator, xe, dico]."""
    out = [name]
    while STAGES[out[0]].starts_from:
        out.insert(0, STAGES[out[0]].starts_from)
    return out


def stage_class(name: str):
    """The class of a row (imported now: it brings torch)."""
    module, cls = STAGES[name].cls.split(":")
    return getattr(importlib.import_module(module), cls)


def build_stage(cfg, device):
    return stage_class(cfg.train.stage)(cfg, device)
