"""XE: teacher-forced cross-entropy pre-training of the captioner on one reference caption per image."""
from __future__ import annotations

from ..models.captioner import scored_mask
from .base import CaptionerStage, StepOutput, log_prob_path


class XEStage(CaptionerStage):
    name = "xe"

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.kernel, self.fused = log_prob_path(cfg.loss.kernel, device)

    def step(self, engine, batch) -> StepOutput:
        tokens = batch["tokens"].to(self.device)
        # Cross-entropy over the scored tokens (up to and including EOS; PAD may equal EOS) from the summed
        # log-probs: the head never materialises the [B, T, V] logits (fused Triton kernel on CUDA, chunks on CPU)
        logps = engine(tokens, pixels=batch["pixels"].to(self.device, self.dtype), output="logprobs",
                       kernel=self.kernel, fused=self.fused)
        n_tokens = int(scored_mask(tokens[:, 1:], self.tokenizer.eos).sum())
        loss = -logps.sum() / max(1, n_tokens)
        return StepOutput(loss, {"xe/ppl": loss.detach().exp()}, images=tokens.size(0), tokens=n_tokens)
