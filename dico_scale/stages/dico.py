"""DiCO: k candidates per image (beam search by default; dico_scale/rollout.py), scored by `dico.reward` (the frozen
evaluator by default; dico_scale/rewards/), a DPO-style loss against a frozen reference copy of the starting
captioner (Direct CLIP-based Optimization, BMVC 2024)."""
from __future__ import annotations

import copy

import torch

from ..kernels import dico_loss
from ..models.captioner import disable_dropout
from ..rewards import build_reward
from ..rollout import Rollout
from .base import CaptionerStage, StepOutput, log_prob_path


class DicoStage(CaptionerStage):
    name = "dico"

    def __init__(self, cfg, device):
        super().__init__(cfg, device, need_evaluator=True)
        self.kernel, self.fused = log_prob_path(cfg.loss.kernel, device)
        self.rollout = Rollout(cfg.generation, self.tokenizer, kernel=self.kernel, fused=self.fused)
        self.reward = build_reward(cfg.dico.reward, cfg, self.evaluator, clamp=cfg.dico.reward_clamp)
        if cfg.dico.disable_dropout:
            disable_dropout(self.module)
        # The reference is the starting captioner without its (frozen, shared) image tower.
        tower, self.module.image_encoder = self.module.image_encoder, None
        self.reference = copy.deepcopy(self.module).requires_grad_(False)
        self.module.image_encoder = tower
        # Dropout off: eval mode. Dropout kept on (the DiCO reference code): train mode, like the policy.
        self.reference.train(not cfg.dico.disable_dropout)

    def setup(self, engine):
        super().setup(engine)
        self.reference.to(self.device, self.dtype)

    def step(self, engine, batch) -> StepOutput:
        policy, k, rollout = engine.module, self.cfg.generation.beam_size, self.rollout
        with torch.no_grad():
            visual_tokens = policy.encode_image(batch["pixels"].to(self.device, self.dtype))
        candidates = rollout.candidates(policy, visual_tokens)
        B = visual_tokens.size(0)

        rewards = self.score_candidates(batch, candidates)

        mask = rollout.mask(candidates)
        policy_logps = rollout.sequence_logprobs(engine, policy, candidates, visual_tokens).view(B, k)
        with torch.no_grad():  # the reference's forward-only path saves nothing
            ref_logps = rollout.sequence_logprobs(self.reference, self.reference, candidates, visual_tokens).view(B, k)
        loss, metrics = dico_loss(policy_logps, ref_logps, rewards, beta=self.cfg.dico.beta, tau=self.cfg.dico.tau,
                                  kernel=self.kernel)
        metrics["dico/candidate_len"] = mask.sum(-1).float().mean()
        return StepOutput(loss, metrics, images=B, tokens=int(mask.sum()))
