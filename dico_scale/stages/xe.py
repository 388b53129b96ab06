"""XE: teacher-forced cross-entropy pre-training of the captioner on one reference caption per image."""
from __future__ import annotations

import torch.nn.functional as F

from ..models.captioner import scored_mask
from .base import CaptionerStage, StepOutput


class XEStage(CaptionerStage):
    name = "xe"

    def __init__(self, cfg, device):
        super().__init__(cfg, device, need_evaluator=False)

    def step(self, engine, batch) -> StepOutput:
        tokens = batch["tokens"].to(self.device)
        logits = engine(tokens, pixels=batch["pixels"].to(self.device, self.dtype))
        labels = tokens[:, 1:]
        scored = scored_mask(labels, self.tokenizer.eos)  # up to and including EOS (PAD may equal EOS)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.masked_fill(~scored, -100).flatten())
        n_tokens = int(scored.sum())
        return StepOutput(loss, {"xe/ppl": loss.detach().exp()}, images=tokens.size(0), tokens=n_tokens)
