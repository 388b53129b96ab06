"""The captioner: open_clip visual tower (patch tokens) -> small transformer encoder -> GPT-2 decoder with
cross-attention, its output head tied to the token embedding (so the fused log-prob kernels see one weight)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import GPT2Config, GPT2Model

from ..config import CaptionerConfig, ConfigError
from ..kernels import fused_linear_sequence_logprobs, sequence_logprobs
from ..data.tokenizer import CaptionTokenizer
from .clip import create_clip


class Captioner(nn.Module):
    """image_encoder=False builds it without the tower (the frozen reference reads the policy's visual tokens)."""

    def __init__(self, cfg: CaptionerConfig, tokenizer: CaptionTokenizer, image_encoder: bool = True):
        super().__init__()
        self.image_encoder, self.preprocess = None, None
        if image_encoder:
            clip, self.preprocess = create_clip(cfg.image_encoder, cfg.image_encoder_weights)
            self.image_encoder = clip.visual
            self.image_encoder.output_tokens = True
            visual_width = self.image_encoder.ln_post.normalized_shape[0]
        else:
            visual_width = visual_tower_width(cfg.image_encoder)
        self.frozen_image_encoder = cfg.freeze_image_encoder
        if self.frozen_image_encoder and self.image_encoder is not None:
            self.image_encoder.requires_grad_(False)
        self.width, self.pad = cfg.width, tokenizer.pad
        self.visual_proj = nn.Sequential(nn.Linear(visual_width, cfg.width), nn.LayerNorm(cfg.width))
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False)
        self.decoder = GPT2Model(GPT2Config(
            vocab_size=tokenizer.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.width, n_layer=cfg.decoder_layers,
            n_head=cfg.heads, add_cross_attention=True, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, bos_token_id=tokenizer.bos, eos_token_id=tokenizer.eos,
            pad_token_id=tokenizer.pad))
        self.gradient_checkpointing = cfg.gradient_checkpointing
        if self.gradient_checkpointing:
            # non-reentrant: works with ZeRO-3's hooks and with inputs that need no grad (a frozen tower's tokens)
            self.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.image_encoder is not None and not self.frozen_image_encoder:
                self.image_encoder.set_grad_checkpointing(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_image_encoder and self.image_encoder is not None:
            self.image_encoder.eval()
        return self

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The tied output head. Under ZeRO-3 it is present only inside this module's forward (or `gathered`)."""
        return self.decoder.wte.weight

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, P, visual width]; no graph when the tower is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_image_encoder):
            return self.image_encoder(pixels)[1]

    def encode(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """Memory for cross-attention [B, P, width]."""
        x = self.visual_proj(visual_tokens)
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return self.encoder(x)
        for layer in self.encoder.layers:  # what nn.TransformerEncoder does without masks (its norm is None)
            x = checkpoint(layer, x, use_reentrant=False)
        return x

    def decode(self, tokens: torch.Tensor, memory: torch.Tensor, cache=None) -> torch.Tensor:
        out = self.decoder(input_ids=tokens, encoder_hidden_states=memory, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight)

    def forward(self, tokens: torch.Tensor | None = None, pixels: torch.Tensor | None = None,
                visual_tokens: torch.Tensor | None = None, repeats: int = 1, output: str = "logits",
                kernel: str = "auto", fused: bool = False) -> torch.Tensor:
        """Every computation that reads parameters goes through here, because ZeRO-3 gathers a parameter only inside
        a forward (the tied head weight included: DeepSpeed registers it when this forward reads it).

        Teacher-forced over tokens[:, 1:], each image serving `repeats` rows of tokens; pass pixels, or the visual
        tokens already computed (the frozen tower's output, shared with the reference). output:
          logits    [N, T-1, V]
          hidden    [N, T-1, width] decoder states
          logprobs  [N] summed log-probs of the tokens after BOS up to and including EOS (PAD excluded): through
                    the [N, T-1, V] logits and `kernel` (dico_scale.kernels.sequence_logprobs), or with fused=True
                    the fused head + log-prob Triton kernel, which never materialises the logits
          visual_tokens  [B, P, D] the tower's patch tokens of `pixels` (tokens unused)
        """
        if output == "visual_tokens":
            return self.encode_image(pixels)
        if visual_tokens is None:
            visual_tokens = self.encode_image(pixels)
        memory = self.encode(visual_tokens)
        if repeats > 1:
            memory = memory.repeat_interleave(repeats, dim=0)
        hidden = self.decode(tokens[:, :-1], memory)
        if output == "hidden":
            return hidden
        if output == "logits":
            return self.logits(hidden)
        if output != "logprobs":
            raise ValueError(f"output must be logits, hidden, logprobs or visual_tokens, got {output!r}")
        labels = tokens[:, 1:]
        mask = labels != self.pad
        if fused:
            return fused_linear_sequence_logprobs(hidden, self.lm_head_weight, labels, mask, kernel="triton")
        return sequence_logprobs(self.logits(hidden), labels, mask, kernel=kernel)


def visual_tower_width(name: str) -> int:
    """Width of an open_clip model's visual transformer (its patch tokens), read from the model config."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown open_clip model '{name}' (not built in, not in the registered config folder)")
    return int(cfg["vision_cfg"]["width"])


def disable_dropout(model: nn.Module) -> None:
    """Zeroes every dropout, including the float rate nn.MultiheadAttention keeps outside any Dropout module."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
