"""Training rewards: image batch + k captions per image + references -> rewards [B, k], shared by dico and scst.

A reward spec (`dico.reward`, `scst.reward`) is one name or a weighted sum of names: `evaluator`, `cider`,
`0.5*evaluator+1.0*cider`. A new reward is one class (a subclass of rewards.base.Reward) and one row of REWARDS.
Importable without torch: config validation parses specs before anything heavy is imported.
"""
from __future__ import annotations

import importlib
import math
import re

REWARDS = {
    "evaluator": "dico_scale.rewards.clip_score:ClipScoreReward",  # CLIP-S or PAC-S, as evaluator.metric says
    "cider": "dico_scale.rewards.cider:CiderReward",  # CIDEr-D, df from the training split's references
}

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch
_TERM = re.compile(r"(?:([^*]+?)\s*\*\s*)?([a-z_]+)")


class RewardSpecError(ValueError):
    """A reward spec that does not parse; the message says why, in a few words."""


def parse_reward(spec: str) -> list[tuple[float, str]]:
    """'0.5*evaluator+cider' -> [(0.5, 'evaluator'), (1.0, 'cider')]; RewardSpecError when it is not
    [w*]name(+[w*]name)* with known, distinct names and finite weights > 0."""
    terms = []
    for part in spec.split("+") if spec.strip() else [""]:
        m = _TERM.fullmatch(part.strip())
        if m is None:
            raise RewardSpecError(f"'{part.strip()}' is not [weight*]name")
        weight, name = m.group(1), m.group(2)
        try:
            w = float(weight) if weight is not None else 1.0
        except ValueError:
            raise RewardSpecError(f"weight '{weight}' is not a number") from None
        if not (math.isfinite(w) and 0 < w <= FLOAT32_MAX):
            raise RewardSpecError(f"weight {weight} must be a finite number > 0 (at most {FLOAT32_MAX:.4g}: rewards "
                                  "are float32)")
        if name not in REWARDS:
            raise RewardSpecError(f"unknown reward '{name}' (known: {', '.join(REWARDS)})")
        if name in (n for _, n in terms):
            raise RewardSpecError(f"'{name}' appears twice")
        terms.append((w, name))
    return terms


def build_reward(spec: str, cfg, evaluator=None, clamp: bool = False):
    """The Reward of a (validated) spec: one reward, or their WeightedSum. `evaluator`: the stage's frozen
    ClipScorer; `clamp`: whether the evaluator reward is w*max(cos, 0) (else w*cos)."""
    from .base import WeightedSum

    terms = []
    for w, name in parse_reward(spec):
        module, cls = REWARDS[name].split(":")
        terms.append((w, getattr(importlib.import_module(module), cls).build(cfg, evaluator=evaluator, clamp=clamp)))
    return terms[0][1] if len(terms) == 1 and terms[0][0] == 1.0 else WeightedSum(terms)


def needs_evaluator(spec: str) -> bool:
    return any(name == "evaluator" for _, name in parse_reward(spec))
