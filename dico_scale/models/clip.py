"""open_clip models built offline: extra model configs registered from a folder, weights only from local files."""
from __future__ import annotations

import logging
import os

import open_clip
import torch

from ..errors import ConfigError
from .clip_weights import load_clip_weights

_registered: set[str] = set()


def register_model_configs(folder: str) -> None:
    """Registers the open_clip JSON model configs of `folder` (tiny demo models live in configs/clip/)."""
    if folder and folder not in _registered and os.path.isdir(folder):
        open_clip.add_model_config(folder)
        _registered.add(folder)


def create_clip(name: str, weights: str = ""):
    """(model, eval preprocess) for an open_clip model name; weights from a local file or folder (any format
    models/clip_weights.py knows: OpenAI TorchScript, open_clip .bin / .safetensors, PAC-S, Hugging Face CLIP) or
    random."""
    if name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model '{name}' (not built in, not in the registered config folder)")
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # open_clip warns 'initialized randomly' on every random init
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    finally:
        root.setLevel(level)
    # DeepSpeed broadcasts parameters as byte views, which 0-d tensors cannot give; load_clip_weights reshapes
    # a checkpoint's scalar logit_scale to the model's shape.
    model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1))
    if weights:
        load_clip_weights(model, name, weights)
    return model, preprocess


def save_clip(model: torch.nn.Module, path: str) -> None:
    """Writes weights in the layout create_clip reads back (as PAC-S does: a dict holding 'state_dict')."""
    tmp = f"{path}.tmp"
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, tmp)
    os.replace(tmp, path)
