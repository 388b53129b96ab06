"""The reward named `evaluator` (dico.reward, scst.reward): the frozen CLIP scorer's score, CLIP-S (w = 2.5) or
PAC-S (w = 2.0) as evaluator.metric says; w*cos by default (the DiCO code's training reward, which keeps below-zero
candidates ranked), w*max(cos, 0) with clamp."""
from __future__ import annotations

import torch

from .base import Reward


class ClipScoreReward(Reward):
    name = "evaluator"

    def __init__(self, evaluator, clamp: bool = False):
        self.evaluator, self.clamp = evaluator, clamp

    @classmethod
    def build(cls, cfg, evaluator=None, clamp: bool = False):
        if evaluator is None:
            raise ValueError("the evaluator reward needs the stage's evaluator")
        return cls(evaluator, clamp)

    @torch.no_grad()
    def __call__(self, pixels, captions, refs):
        B, k = len(captions), len(captions[0])
        # Only image_features and score: the evaluator may sit behind an inference engine that exposes these two.
        image_features = self.evaluator.image_features(pixels).repeat_interleave(k, dim=0)
        flat = [c for cs in captions for c in cs]
        return self.evaluator.score(image_features, flat, clamp=self.clamp).float().view(B, k)
