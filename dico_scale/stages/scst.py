"""SCST: self-critical sequence training (Rennie et al., CVPR 2017) through the same loop, engine and checkpoints.

k candidates per image (`scst.strategy`: sampled by default, or beams), each rewarded by `scst.reward`; the baseline
is the mean reward of the image's other k-1 candidates ("new self-critical", self-critical.pytorch's default) or
the reward of the greedy caption (classic SCST); loss = -(r - b) * log pi(candidate), averaged over the tokens
(self-critical.pytorch) or over the candidates.
"""
from __future__ import annotations

import dataclasses

import torch

from ..checks import check
from ..engine import PhaseClock
from ..models.captioner import disable_dropout
from ..rewards import build_reward
from ..rollout import Rollout
from .base import CaptionerStage, StepOutput, log_prob_path


def advantages(rewards: torch.Tensor, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """[B, k] r - b. greedy None: b = mean of the image's other k-1 rewards, so each image's advantages sum to 0;
    greedy [B, 1]: b = the greedy caption's reward."""
    if greedy is not None:
        return rewards - greedy
    k = rewards.size(1)
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def scst_loss(logps: torch.Tensor, adv: torch.Tensor, lengths: torch.Tensor, average: str) -> torch.Tensor:
    """-(r - b) * log pi(y), logps [B, k] summed over each candidate's tokens. token: over every generated token
    (each token of a candidate carries its advantage), divided by the number of tokens; sequence: mean over the
    candidates of -(r - b) * (summed log-prob)."""
    weighted = -(adv.detach() * logps)
    if average == "token":
        return weighted.sum() / lengths.sum().clamp(min=1)
    return weighted.mean()


class ScstStage(CaptionerStage):
    name = "scst"
    reward_key = "scst.reward"

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        s = cfg.scst
        check(s.strategy in ("beam", "sample"), "scst.strategy", f"'{s.strategy}' is not beam or sample")
        check(s.baseline in ("mean", "greedy"), "scst.baseline", f"'{s.baseline}' is not mean or greedy")
        check(s.average in ("token", "sequence"), "scst.average", f"'{s.average}' is not token or sequence")
        check(s.baseline != "mean" or s.candidates >= 2, "scst.candidates",
              f"{s.candidates}: scst.baseline=mean needs at least 2 candidates per image")
        check(not (s.baseline == "greedy" and s.strategy == "beam" and s.candidates == 1), "scst.candidates",
              "1 with scst.strategy=beam is the greedy caption itself, scst.baseline=greedy: every advantage is 0")

    def __init__(self, cfg, device):
        s = cfg.scst
        super().__init__(cfg, device)
        self.kernel, self.fused = log_prob_path(cfg.loss.kernel, device)
        sampling = dataclasses.replace(cfg.generation, candidates=s.candidates, strategy=s.strategy)
        self.rollout = Rollout(sampling, self.tokenizer, kernel=self.kernel, fused=self.fused)
        self.greedy = None
        if s.baseline == "greedy":  # a beam of one is the greedy caption
            self.greedy = Rollout(dataclasses.replace(cfg.generation, candidates=1, strategy="beam"), self.tokenizer)
        self.reward = build_reward(s.reward, cfg, self.evaluator, clamp=s.reward_clamp)
        if s.disable_dropout:
            disable_dropout(self.module)

    def logprob_shape(self):  # the sampled candidates' pass (the greedy baseline's search keeps no gradients)
        return self.cfg.train.micro_batch_size, self.cfg.scst.candidates, self.cfg.generation.max_len + 1

    def step(self, engine, batch) -> StepOutput:
        s, rollout, clock = self.cfg.scst, self.rollout, PhaseClock(self.device)
        with clock("generate"):
            visual_tokens, generated = self.generate(engine, batch, rollout, *([self.greedy] if self.greedy else []))
        candidates, greedy_caption = generated[0], (generated[1] if self.greedy else None)
        B = visual_tokens.size(0)

        with clock("reward"):  # the reward's own cost (CIDEr-D must stay well under a step)
            rewards = self.score_candidates(batch, candidates)
            greedy = self.score_candidates(batch, greedy_caption) if self.greedy else None
        reward_s = clock.seconds["time/reward_s"]
        adv = advantages(rewards, greedy)

        lengths = rollout.mask(candidates).sum(-1).view(B, s.candidates)
        with clock("policy"):
            logps = rollout.sequence_logprobs(engine, candidates, visual_tokens).view(B, s.candidates)
        loss = scst_loss(logps, adv.to(logps.dtype), lengths, s.average)
        metrics = {"scst/reward": rewards.mean(), "scst/reward_max": rewards.max(1).values.mean(),
                   "scst/advantage_std": adv.std() if adv.numel() > 1 else 0.0,
                   "scst/candidate_len": lengths.float().mean(), "scst/logp": logps.detach().mean(),
                   "scst/reward_s": reward_s}
        if greedy is not None:
            metrics["scst/greedy_reward"] = greedy.mean()
        return StepOutput(loss, {**metrics, **clock.seconds}, images=B, tokens=int(lengths.sum()))
