"""The captioner table: every captioner architecture the trainer knows, in one place. Config validation, the stages,
export, caption, the demo and the benchmarks build captioners only through `build_captioner`; a new architecture is
one module in this package (a `models.captioner.CaptionerModel`) and one row here.

Importable without torch (checks.py reads it): the classes are named as strings and imported by `build_captioner`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str  # captioner.model
    cls: str  # "module:Class", imported lazily; the class builds itself from the whole config (`build`)
    section: str  # the config section of its keys
    keys: tuple[str, ...]  # the keys of that section the row reads (the others must keep their defaults)
    hf: bool  # reads its weights, tokenizer and image processor from captioner.hf_path
    lora: bool = False  # takes LoRA adapters (captioner.lora.*, peft) on its transformers model


BUILTIN_KEYS = ("image_encoder", "image_encoder_weights", "freeze_image_encoder", "encoder_layers", "decoder_layers",
                "width", "heads", "dropout", "max_positions", "gradient_checkpointing")

MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("builtin", "dico_scale.models.builtin:Captioner", "captioner", BUILTIN_KEYS, hf=False),
    ModelSpec("hf_encoder_decoder", "dico_scale.models.hf_encoder_decoder:HFEncoderDecoder", "captioner",
              ("hf_path", "freeze", "gradient_checkpointing", "lora", "attn_implementation"), hf=True, lora=True),
    ModelSpec("dico_ref", "dico_scale.models.dico_ref:DicoRef", "captioner",
              ("hf_path", "freeze", "gradient_checkpointing"), hf=True),
    ModelSpec("hf_vlm", "dico_scale.models.hf_vlm:HFVLM", "captioner",
              ("hf_path", "freeze", "prompt", "images_kwargs", "gradient_checkpointing", "lora", "attn_implementation"),
              hf=True, lora=True),
]}


def build_captioner(cfg, weights: str | None = None, image_encoder: bool = True):
    """The captioner `cfg.captioner.model` names, built from the whole run config, with its tokenizer
    (`.tokenizer`) and image transform (`.preprocess`); `weights`: a dico_scale export or checkpoint tag to load
    (strict). image_encoder=False leaves the image tower out (a frozen reference reads the policy's features).
    With captioner.lora.r > 0 the adapters are added after the weights are loaded (exports are merged), or before
    when the weights hold adapters (a LoRA run's checkpoint tag)."""
    module, cls = MODELS[cfg.captioner.model].cls.split(":")
    captioner = getattr(importlib.import_module(module), cls).build(cfg, image_encoder=image_encoder)
    from ..errors import ConfigError
    from .lora import add_lora
    from .weights import load_state, read_weights, trained_as

    beams = {"generation.candidates": cfg.generation.candidates,  # validation's and caption's beam width
             "scst.candidates": cfg.scst.candidates if cfg.scst.strategy == "beam" else 0}
    for key, k in beams.items():  # e.g. caption --beam-size 100000: a beam search's first step has no more
        if k > captioner.tokenizer.vocab_size:  # distinct continuations, and its k x vocabulary logits fill memory
            raise ConfigError(f"{key}={k} is more than this captioner's vocabulary ({captioner.tokenizer.vocab_size} "
                              "tokens): a beam search's first step has no more distinct continuations")

    state = read_weights(weights) if weights else None
    adapted = state is not None and any(".lora_" in k for k in state)  # a LoRA run's checkpoint tag, not an export
    if adapted and not cfg.captioner.lora.r:
        raise ConfigError(f"weights '{weights}' hold LoRA adapters (a LoRA run's checkpoint tag): set "
                          "captioner.lora as that run did, or start from its export (merged)")
    if cfg.captioner.lora.r and adapted:
        add_lora(captioner, cfg.captioner.lora)
    if state is not None:
        try:
            load_state(captioner, state, weights)
        except ConfigError as e:  # weights of another row or folder: say so, the missing keys alone do not
            raise ConfigError(f"{e}{trained_as(weights, cfg.captioner)}") from None
    if cfg.captioner.lora.r and not adapted:
        add_lora(captioner, cfg.captioner.lora)
    return captioner
