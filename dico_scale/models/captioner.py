"""The captioner interface: what the stages, rollout, generation, validation, export, caption, the demo and the
benchmarks need from any captioner architecture (the rows of `dico_scale.models.MODELS`).

A captioner turns pixels into visual tokens (`visual_tokens`, frozen or not), those into the per-image context its
decoder attends to (`image_context`, computed once per image and `expand`ed to k candidates), and runs the decoder
over tokens, one step at a time with a cache (`new_cache`, `decoder_hidden`, `reorder_cache`); its output head is
`head_weight` / `head_bias` (tied or untied). None of these encodes or decodes text: its tokenizer does
(`.tokenizer`: bos, eos, pad, vocab_size, batch, decode_batch). Teacher forcing runs inside `forward`, because
ZeRO-3 gathers a parameter only inside the forward of the module that owns it. It carries that tokenizer and its
image transform (`.preprocess`).

Token layout everywhere: [BOS, w1, ..., wn, EOS, PAD, ...], where BOS is the decoder's start token and PAD may equal
EOS (tokenizers without a pad token): the scored tokens are those after BOS up to and including the first EOS.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from ..kernels import fused_linear_sequence_logprobs, sequence_logprobs


def scored_mask(labels: torch.Tensor, eos: int) -> torch.Tensor:
    """[N, T] True for the tokens a caption is scored on: everything up to and including the first EOS (what
    follows is padding, whatever its id: PAD may equal EOS)."""
    ended = (labels == eos).long()
    return (ended.cumsum(-1) - ended) == 0


def banned_tokens(bos: int, eos: int, pad: int) -> list[int]:
    """Tokens a search never proposes: BOS and PAD, unless they are EOS itself (GPT-2 style tokenizers)."""
    return sorted({bos, pad} - {eos})


class CaptionerModel(nn.Module):
    """Base class of the MODELS rows. Subclasses implement `build`, `visual_tokens`, `image_context`, `decoder_hidden` and
    `head_weight` (and `head_bias` for a biased head); the rest has defaults for encoder-decoder captioners."""

    tokenizer = None  # set by the subclass
    preprocess = None  # image transform of pixels (None without an image tower)
    width: int  # decoder hidden width (the frozen engines' bucket sizes)
    tower_prefix = "image_encoder."  # state-dict prefix of the image tower (left out of a frozen reference)
    logit_softcap: float | None = None  # logits are softcap * tanh(h @ W.T / softcap) (Gemma 2); None: plain

    @classmethod
    def build(cls, cfg, image_encoder: bool = True) -> "CaptionerModel":
        raise NotImplementedError

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Visual tokens [B, P, D]: the image tower's features (no graph when the tower is frozen)."""
        raise NotImplementedError

    def image_context(self, features: torch.Tensor) -> torch.Tensor:
        """Per-image context the decoder attends to [B, P, H], computed once per image."""
        raise NotImplementedError

    def context_tokens(self, context) -> torch.Tensor | None:
        """Tokens [B, P] the decoder has read before BOS (-1: padding): a decoder-only captioner's prompt, which
        generate's repetition penalty and n-gram ban count; None for an encoder-decoder (its decoder starts at BOS)."""
        return None

    def expand(self, context: torch.Tensor, k: int) -> torch.Tensor:
        """The context of each image repeated for its k candidates (consecutive rows)."""
        return context.repeat_interleave(k, dim=0) if k > 1 else context

    def new_cache(self):
        return EncoderDecoderCache(DynamicCache(), DynamicCache())

    def reorder_cache(self, cache, src: torch.Tensor) -> None:
        """Keeps the cache rows `src` (beam search's survivors), in that order."""
        cache.reorder_cache(src)

    def decoder_hidden(self, tokens: torch.Tensor, context: torch.Tensor, cache=None) -> torch.Tensor:
        """Decoder states [N, t, H] of tokens [N, t] (with a cache: the new tokens only)."""
        raise NotImplementedError

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head's [V, H] weight (tied or not). Under ZeRO-3 present only inside forward (or gathered)."""
        raise NotImplementedError

    @property
    def head_bias(self) -> torch.Tensor | None:
        return None

    def frozen_towers(self) -> list[nn.Module]:
        """Modules that stay in eval mode whatever the captioner's mode (a frozen image tower: no dropout, fixed
        norm statistics)."""
        return []

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_towers():
            m.eval()
        return self

    def banned_tokens(self, bos: int, eos: int, pad: int) -> list[int]:
        """Tokens generation never proposes (see the module function)."""
        return banned_tokens(bos, eos, pad)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.head_weight, self.head_bias)
        if self.logit_softcap is None:
            return logits
        return self.logit_softcap * torch.tanh(logits / self.logit_softcap)

    def forward(self, tokens: torch.Tensor | None = None, pixels: torch.Tensor | None = None,
                visual_tokens: torch.Tensor | None = None, repeats: int = 1, output: str = "logits",
                kernel: str = "auto", fused: bool = False) -> torch.Tensor:
        """Every computation that reads parameters goes through here (ZeRO-3 gathers inside a forward only; the
        head weight included: DeepSpeed registers it when this forward reads it).

        Teacher-forced over tokens[:, 1:], each image serving `repeats` rows of tokens; pass pixels, or the features
        already computed (the frozen tower's output, shared with the reference). output:
          logits    [N, T-1, V]
          hidden    [N, T-1, H] decoder states
          logprobs  [N] summed log-probs of the scored tokens (scored_mask), never through the [N, T, V]
                    logits: fused=True runs the fused head + log-prob Triton kernel, otherwise the torch head
                    runs in chunks of tokens (dico_scale.kernels.torch_path); kernel="triton" without fused
                    materialises the logits for the Triton log-prob kernel (kept to compare the paths)
          visual_tokens  [B, P, D] the features of `pixels` (tokens unused)
        """
        if output == "visual_tokens":
            return self.visual_tokens(pixels)
        if visual_tokens is None:
            visual_tokens = self.visual_tokens(pixels)
        hidden = self.decoder_hidden(tokens[:, :-1], self.expand(self.image_context(visual_tokens), repeats))
        if output == "hidden":
            return hidden
        if output == "logits":
            return self.logits(hidden)
        if output != "logprobs":
            raise ValueError(f"output must be logits, hidden, logprobs or visual_tokens, got {output!r}")
        labels = tokens[:, 1:]
        mask = scored_mask(labels, self.tokenizer.eos)
        if kernel == "triton" and not fused:  # the log-prob kernel over materialised logits (tests compare paths)
            return sequence_logprobs(self.logits(hidden), labels, mask, kernel=kernel)
        # fused: the Triton head kernel (under "auto" for gradient-free calls only, see fused_head_uses_triton);
        # otherwise the torch head in blocks of tokens x vocabulary. Neither holds [N, T, V].
        return fused_linear_sequence_logprobs(hidden, self.head_weight, labels, mask,
                                              kernel=kernel if fused else "torch", bias=self.head_bias,
                                              softcap=self.logit_softcap)


def checkpoint_layers(model) -> None:
    """transformers' activation checkpointing of a model's layers, non-reentrant (ZeRO-3's hooks need it, and inputs
    that need no grad: a frozen tower's tokens); activation_checkpointing_enable where transformers has it (5.25
    deprecates the older name with a warning), else gradient_checkpointing_enable."""
    if enable := getattr(model, "activation_checkpointing_enable", None):
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_dropout(model: nn.Module) -> None:
    """Zeroes every dropout, including the float rate nn.MultiheadAttention keeps outside any Dropout module and the
    rates Hugging Face attention keeps as floats (`attention_dropout`, `dropout`, `dropout_prob`)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
        for name in ("attention_dropout", "dropout", "dropout_prob"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
