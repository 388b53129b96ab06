"""DiCO: k candidates per image (beam search by default; dico_scale/rollout.py), scored by `dico.reward` (the frozen
evaluator by default; dico_scale/rewards/), a DPO-style loss against a frozen reference copy of the starting
captioner (Direct CLIP-based Optimization, BMVC 2024). With LoRA adapters the reference is the policy itself with
its adapters disabled (captioner.lora.separate_reference=false, the default): no second copy of the weights."""
from __future__ import annotations

import contextlib

import torch

from ..checks import check, check_placement
from ..engine import PhaseClock
from ..kernels import dico_loss
from ..models import MODELS, build_captioner
from ..models.captioner import CaptionerModel, disable_dropout
from ..models.lora import adapters_disabled
from ..rewards import build_reward
from ..rollout import Rollout
from .base import CaptionerStage, StepOutput, log_prob_path


class DicoStage(CaptionerStage):
    name = "dico"
    reward_key = "dico.reward"

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        check(cfg.generation.candidates >= 2, "generation.candidates", "dico needs at least 2 candidates per image")
        check_placement(cfg.dico.reference_placement, "dico.reference_placement")

    @classmethod
    def builds_evaluator(cls, cfg) -> bool:
        return True  # whatever the reward: its validation scores the captions with it

    @classmethod
    def frozen_files(cls, cfg):
        """The reference is the starting captioner, besides the evaluator of the reward: train.init_from's, else
        the weights of the row's folder (captioner.hf_path), else drawn at random."""
        if not cfg.train.init_from and MODELS[cfg.captioner.model].hf:
            return {"reference weights (captioner.hf_path)": cfg.captioner.hf_path, **super().frozen_files(cfg)}
        return {"reference weights (train.init_from)": cfg.train.init_from, **super().frozen_files(cfg)}

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.kernel, self.fused = log_prob_path(cfg.loss.kernel, device)
        self.rollout = Rollout(cfg.generation, self.tokenizer, kernel=self.kernel, fused=self.fused)
        self.reward = build_reward(cfg.dico.reward, cfg, self.evaluator, clamp=cfg.dico.reward_clamp)
        if cfg.dico.disable_dropout:
            disable_dropout(self.module)
        lora = cfg.captioner.lora
        self.adapter_free = lora.r > 0 and not lora.separate_reference  # the policy without adapters is the reference
        self.reference = None if self.adapter_free else self.build_reference()
        self.reference_engine = self.reference

    def build_reference(self) -> CaptionerModel:
        """The starting captioner's weights (train.init_from, or the policy's initial ones) in a captioner of its own
        without the image tower (the policy's frozen tower serves both), built before DeepSpeed partitions
        anything: never a copy of a partitioned model. Eval mode (dropout off) unless dico.disable_dropout=false
        (the DiCO reference code), then train mode like the policy. No parameter requires a gradient."""
        reference = build_captioner(self.cfg, image_encoder=False)
        tower = self.module.tower_prefix
        start = {k: v for k, v in self.module.state_dict().items() if not k.startswith(tower)}
        reference.load_state_dict(start, strict=True)
        if self.cfg.dico.disable_dropout:
            disable_dropout(reference)
        return reference.requires_grad_(False).train(not self.cfg.dico.disable_dropout)

    def logprob_shape(self):  # the policy's pass over each image's k candidates (BOS .. max_len tokens)
        return self.cfg.train.micro_batch_size, self.cfg.generation.candidates, self.cfg.generation.max_len + 1

    def frozen_models(self):
        if self.reference is None:
            return super().frozen_models()
        return {**super().frozen_models(),
                "reference": (self.reference, self.cfg.dico.reference_placement, self.reference.width)}

    def setup(self, engine, frozen=None):
        super().setup(engine, frozen)
        if self.reference is None:
            self.reference_engine = engine
        elif frozen and "reference" in frozen:
            self.reference_engine = frozen["reference"]
        else:
            self.reference.to(self.device, self.dtype)

    def reference_logprobs(self, candidates, visual_tokens):
        """The reference's summed log-probs of the candidates, without gradients: a frozen model of its own, or the
        policy's engine with its adapters disabled (the same forward, so ZeRO-3 gathers as for the policy)."""
        with torch.no_grad(), adapters_disabled(self.module) if self.adapter_free else contextlib.nullcontext():
            return self.rollout.sequence_logprobs(self.reference_engine, candidates, visual_tokens)

    def step(self, engine, batch) -> StepOutput:
        k, rollout, clock = self.cfg.generation.candidates, self.rollout, PhaseClock(self.device)
        with clock("generate"):
            visual_tokens, (candidates,) = self.generate(engine, batch, rollout)
        B = visual_tokens.size(0)
        with clock("reward"):
            rewards = self.score_candidates(batch, candidates)

        mask = rollout.mask(candidates)
        with clock("policy"):
            policy_logps = rollout.sequence_logprobs(engine, candidates, visual_tokens).view(B, k)
        with clock("reference"):  # the reference's forward-only path saves nothing
            ref_logps = self.reference_logprobs(candidates, visual_tokens).view(B, k)
        # An image whose k rewards all tie (every cosine clamped to 0, a CIDEr of 0 for all) has no winner: the first
        # beam would win by its position alone and be reinforced. Such rows add no loss (a NaN row stays, and stops
        # the step as non-finite); with none left, the loss is zero and only its metrics are logged.
        spread = ~(rewards == rewards.amax(1, keepdim=True)).all(1)
        any_spread = bool(spread.any())  # one host sync, not two
        rows = spread if any_spread else torch.ones_like(spread)
        loss, metrics = dico_loss(policy_logps[rows], ref_logps[rows], rewards[rows], beta=self.cfg.dico.beta,
                                  tau=self.cfg.dico.tau, kernel=self.kernel)
        if not any_spread:
            loss = loss * 0.0
        metrics["dico/tied"] = (~spread).float().mean()
        metrics["dico/candidate_len"] = mask.sum(-1).float().mean()
        return StepOutput(loss, {**metrics, **clock.seconds}, images=B, tokens=int(mask.sum()))
