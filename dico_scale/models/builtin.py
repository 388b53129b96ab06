"""The built-in captioner (MODELS row `builtin`): open_clip visual tower (patch tokens) -> small transformer encoder
-> GPT-2 decoder with cross-attention, its output head tied to the token embedding, the CLIP BPE vocabulary."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import GPT2Config, GPT2Model

from ..config import CaptionerConfig
from ..errors import ConfigError
from ..data.tokenizer import CaptionTokenizer
from .captioner import CaptionerModel, checkpoint_layers
from .clip import create_clip, register_model_configs


class Captioner(CaptionerModel):
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
        self.width, self.tokenizer = cfg.width, tokenizer
        self.visual_proj = nn.Sequential(nn.Linear(visual_width, cfg.width), nn.LayerNorm(cfg.width))
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False)
        self.decoder = GPT2Model(GPT2Config(
            vocab_size=tokenizer.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.width, n_layer=cfg.decoder_layers,
            n_head=cfg.heads, add_cross_attention=True, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, bos_token_id=tokenizer.bos, eos_token_id=tokenizer.eos))
        # No pad_token_id: padding only ever follows EOS in this causal decoder, so no scored token attends to it, and
        # GPT2Model, seeing pad ids without an attention mask, would print a false alarm in every run.
        self.gradient_checkpointing = cfg.gradient_checkpointing
        if self.gradient_checkpointing:
            checkpoint_layers(self.decoder)
            if self.image_encoder is not None and not self.frozen_image_encoder:
                self.image_encoder.set_grad_checkpointing(True)

    def frozen_towers(self) -> list[nn.Module]:
        return [self.image_encoder] if self.frozen_image_encoder and self.image_encoder is not None else []

    @classmethod
    def build(cls, cfg, image_encoder: bool = True) -> "Captioner":
        register_model_configs(cfg.clip_model_configs)
        return cls(cfg.captioner, CaptionTokenizer(), image_encoder=image_encoder)

    @property
    def head_weight(self) -> torch.Tensor:
        """The tied output head. Under ZeRO-3 it is present only inside this module's forward (or `gathered`)."""
        return self.decoder.wte.weight

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, P, visual width]; no graph when the tower is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_image_encoder):
            return self.image_encoder(pixels)[1]

    def image_context(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """Memory for cross-attention [B, P, width]."""
        x = self.visual_proj(visual_tokens)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # what nn.TransformerEncoder does without masks (its norm is None), also with 0 layers (where its forward fails)
        for layer in self.encoder.layers:
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        return x

    def decoder_hidden(self, tokens: torch.Tensor, memory: torch.Tensor, cache=None) -> torch.Tensor:
        out = self.decoder(input_ids=tokens, encoder_hidden_states=memory, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state


def visual_tower_width(name: str) -> int:
    """Width of an open_clip model's visual transformer (its patch tokens), read from the model config."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown open_clip model '{name}' (not built in, not in the registered config folder)")
    return int(cfg["vision_cfg"]["width"])
