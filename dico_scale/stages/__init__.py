"""Stages plug into the one training loop; each supplies a trainable module and `step(engine, batch)`."""


def build_stage(cfg, device):
    if cfg.train.stage == "xe":
        from .xe import XEStage as cls
    elif cfg.train.stage == "dico":
        from .dico import DicoStage as cls
    else:
        from .evaluator import EvaluatorStage as cls
    return cls(cfg, device)
