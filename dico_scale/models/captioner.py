"""The captioner: open_clip visual tower (patch tokens) -> small transformer encoder -> GPT-2 decoder with
cross-attention, its output head tied to the token embedding (so the fused log-prob kernels see one weight)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2Model

from ..config import CaptionerConfig
from ..data.tokenizer import CaptionTokenizer
from .clip import create_clip


class Captioner(nn.Module):
    def __init__(self, cfg: CaptionerConfig, tokenizer: CaptionTokenizer):
        super().__init__()
        clip, self.preprocess = create_clip(cfg.image_encoder, cfg.image_encoder_weights)
        self.image_encoder = clip.visual
        self.image_encoder.output_tokens = True
        self.frozen_image_encoder = cfg.freeze_image_encoder
        if self.frozen_image_encoder:
            self.image_encoder.requires_grad_(False)
        visual_width = self.image_encoder.ln_post.normalized_shape[0]
        self.visual_proj = nn.Sequential(nn.Linear(visual_width, cfg.width), nn.LayerNorm(cfg.width))
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False)
        self.decoder = GPT2Model(GPT2Config(
            vocab_size=tokenizer.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.width, n_layer=cfg.decoder_layers,
            n_head=cfg.heads, add_cross_attention=True, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, bos_token_id=tokenizer.bos, eos_token_id=tokenizer.eos,
            pad_token_id=tokenizer.pad))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_image_encoder and self.image_encoder is not None:
            self.image_encoder.eval()
        return self

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.decoder.wte.weight

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, P, visual width]; no graph when the tower is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_image_encoder):
            return self.image_encoder(pixels)[1]

    def encode(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """Memory for cross-attention [B, P, width]."""
        return self.encoder(self.visual_proj(visual_tokens))

    def decode(self, tokens: torch.Tensor, memory: torch.Tensor, cache=None) -> torch.Tensor:
        out = self.decoder(input_ids=tokens, encoder_hidden_states=memory, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight)

    def forward(self, tokens: torch.Tensor, pixels: torch.Tensor | None = None,
                visual_tokens: torch.Tensor | None = None, repeats: int = 1,
                return_hidden: bool = False) -> torch.Tensor:
        """Teacher-forced logits [N, T-1, V] predicting tokens[:, 1:]; each image serves `repeats` rows of tokens.

        Pass pixels, or visual_tokens already computed (the frozen tower's output, shared with the reference model).
        return_hidden: the decoder states [N, T-1, width] instead, for the fused head + log-prob kernel, which never
        materialises the logits.
        """
        if visual_tokens is None:
            visual_tokens = self.encode_image(pixels)
        memory = self.encode(visual_tokens)
        if repeats > 1:
            memory = memory.repeat_interleave(repeats, dim=0)
        hidden = self.decode(tokens[:, :-1], memory)
        return hidden if return_hidden else self.logits(hidden)


def disable_dropout(model: nn.Module) -> None:
    """Zeroes every dropout, including the float rate nn.MultiheadAttention keeps outside any Dropout module."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
