"""Rollouts for the sequence-level stages: k candidates per image (beam search or sampling, by
`generation.strategy`) and their summed log-probs under any captioner (the policy with gradients, or a frozen
reference), so that every stage scores candidates the same way."""
from __future__ import annotations

import torch

from .config import GenerationConfig
from .models.captioner import scored_mask
from .models.generation import beam_search, sample, search_options


class Rollout:
    """kernel: the loss.kernel of the log-prob path; fused: decoder states and the head weight (tied or not) go to the
    fused Triton kernel, which never materialises the [B*k, T, V] logits (the torch path does, as the DiCO reference).
    generator: for sampling only; None draws from the global RNG."""

    def __init__(self, cfg: GenerationConfig, tokenizer, kernel: str = "auto", fused: bool = False,
                 generator: torch.Generator | None = None):
        self.cfg, self.k = cfg, cfg.candidates
        self.bos, self.eos, self.pad = tokenizer.bos, tokenizer.eos, tokenizer.pad
        self.kernel, self.fused, self.generator = kernel, fused, generator

    def candidates(self, policy, visual_tokens: torch.Tensor) -> torch.Tensor:
        """[B*k, L] candidates, the k of an image in consecutive rows (BOS first, PAD after EOS). `policy` is a plain
        captioner with its parameters present (under ZeRO-3: inside engine.gathered).

        Generated in eval mode (no dropout noise in the search) without gradients: the loss recomputes the
        log-probs with a teacher-forced pass. The policy's train/eval mode is restored afterwards.
        """
        g, training = self.cfg, policy.training
        policy.eval()
        try:
            with torch.no_grad():
                memory = policy.image_context(visual_tokens)
                if g.strategy == "beam":
                    tokens, _ = beam_search(policy, memory, self.k, g.max_len, self.bos, self.eos, self.pad,
                                            **search_options(g))
                else:
                    tokens, _ = sample(policy, memory, self.k, g.max_len, self.bos, self.eos, self.pad,
                                       temperature=g.temperature, top_k=g.top_k, generator=self.generator)
        finally:
            policy.train(training)
        return tokens.flatten(0, 1)

    def labels(self, candidates: torch.Tensor) -> torch.Tensor:
        """[B*k, L-1] the tokens each position predicts (everything after BOS)."""
        return candidates[:, 1:]

    def mask(self, candidates: torch.Tensor) -> torch.Tensor:
        """[B*k, L-1] the scored tokens: after BOS up to and including EOS (PAD may equal EOS)."""
        return scored_mask(self.labels(candidates), self.eos)

    def sequence_logprobs(self, forward, candidates: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """[B*k] summed log-probs of the candidates under `forward`: a DeepSpeed engine (the policy with gradients,
        or a frozen reference under no_grad) or a captioner itself. The head and the log-probs are computed inside
        the captioner's forward, where ZeRO-3 has gathered the head weight."""
        return forward(candidates, visual_tokens=visual_tokens, repeats=self.k, output="logprobs", kernel=self.kernel,
                       fused=self.fused)
