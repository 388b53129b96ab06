"""What every training reward is: pixels + k captions per image + each image's references -> [B, k] float32."""
from __future__ import annotations

import torch


class Reward:
    """Subclasses implement `__call__` and the classmethod `build(cfg, evaluator, clamp)` (what build_reward calls)."""
    name = "reward"

    @classmethod
    def build(cls, cfg, evaluator=None, clamp: bool = False) -> "Reward":
        raise NotImplementedError

    def __call__(self, pixels: torch.Tensor, captions: list[list[str]], refs: list[list[str]]) -> torch.Tensor:
        """pixels [B, ...] in the evaluator's transform (the batch's eval_pixels, else its pixels); captions[b]: the
        k candidates of image b; refs[b]: its reference captions. Returns [B, k] float32 on pixels' device."""
        raise NotImplementedError


class WeightedSum(Reward):
    """sum_i w_i * reward_i; e.g. `0.5*evaluator+1.0*cider`."""
    name = "mix"

    def __init__(self, terms: list[tuple[float, Reward]]):
        self.terms = terms

    def __call__(self, pixels, captions, refs):
        return sum(w * r(pixels, captions, refs) for w, r in self.terms)
