"""DiCO: k beam-search candidates per image, scored by the frozen evaluator, a DPO-style loss against a frozen
reference copy of the starting captioner (Direct CLIP-based Optimization, BMVC 2024)."""
from __future__ import annotations

import copy

import torch

from ..config import ConfigError
from ..kernels import dico_loss, fused_linear_sequence_logprobs, interpreting, sequence_logprobs
from ..models.captioner import disable_dropout
from ..models.generation import beam_search
from .base import CaptionerStage, StepOutput


class DicoStage(CaptionerStage):
    name = "dico"

    def __init__(self, cfg, device):
        super().__init__(cfg, device, need_evaluator=True)
        self.kernel = cfg.loss.kernel
        if self.kernel == "triton" and device.type != "cuda" and not interpreting():
            raise ConfigError("loss.kernel=triton needs CUDA (or TRITON_INTERPRET=1 to interpret the kernels on the CPU)")
        # The fused head + log-prob kernel never materialises [B*k, T, V] logits; the torch path does, as the
        # DiCO reference code.
        self.fused = self.kernel == "triton" or (self.kernel == "auto" and device.type == "cuda")
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

    def _candidates(self, policy, visual_tokens) -> torch.Tensor:
        """[B*k, L] beam-search candidates, generated in eval mode without gradients."""
        g, tok = self.cfg.generation, self.tokenizer
        policy.eval()
        with torch.no_grad():
            memory = policy.encode(visual_tokens)
            tokens, _ = beam_search(policy, memory, g.beam_size, g.max_len, tok.bos, tok.eos, tok.pad)
        policy.train()
        return tokens.flatten(0, 1)

    def _logprobs(self, forward, model, candidates, visual_tokens, labels, mask) -> torch.Tensor:
        """[B*k] summed log-probs of the candidates under `forward` (the engine or the reference model)."""
        k = self.cfg.generation.beam_size
        if self.fused:
            hidden = forward(candidates, visual_tokens=visual_tokens, repeats=k, return_hidden=True)
            return fused_linear_sequence_logprobs(hidden, model.lm_head_weight, labels, mask, kernel="triton")
        logits = forward(candidates, visual_tokens=visual_tokens, repeats=k)
        return sequence_logprobs(logits, labels, mask, kernel=self.kernel)

    def step(self, engine, batch) -> StepOutput:
        policy, k, pad = engine.module, self.cfg.generation.beam_size, self.tokenizer.pad
        with torch.no_grad():
            visual_tokens = policy.encode_image(batch["pixels"].to(self.device, self.dtype))
        candidates = self._candidates(policy, visual_tokens)
        B = visual_tokens.size(0)

        captions = self.tokenizer.decode_batch(candidates)
        eval_pixels = batch.get("eval_pixels", batch["pixels"]).to(self.device)
        image_features = self.evaluator.image_features(eval_pixels).repeat_interleave(k, dim=0)
        rewards = self.evaluator.score(image_features, captions, clamp=self.cfg.dico.reward_clamp).view(B, k)

        labels = candidates[:, 1:]
        mask = labels != pad  # tokens after BOS up to and including EOS
        policy_logps = self._logprobs(engine, policy, candidates, visual_tokens, labels, mask).view(B, k)
        with torch.no_grad():  # the reference's forward-only path saves nothing
            ref_logps = self._logprobs(self.reference, self.reference, candidates, visual_tokens, labels,
                                       mask).view(B, k)
        loss, metrics = dico_loss(policy_logps, ref_logps, rewards, beta=self.cfg.dico.beta, tau=self.cfg.dico.tau,
                                  kernel=self.kernel)
        metrics["dico/candidate_len"] = mask.sum(-1).float().mean()
        return StepOutput(loss, metrics, images=B, tokens=int(mask.sum()))
