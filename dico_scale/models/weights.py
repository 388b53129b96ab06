"""Weights from local files: dico_scale's own exports and checkpoints (model.pt, safetensors exports, DeepSpeed tag
folders) into any of its models, and what a run recorded in them. CLIP weights in the formats users have are
clip_weights.py's. Every failure is one ConfigError line naming the file.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch

from ..errors import ConfigError, first_line
from .export_folder import sidecar


# ---- dico_scale's own exports and checkpoints ----------------------------------------------------------------

def load_weights(module: torch.nn.Module, path: str) -> None:
    """A dico_scale model's weights (strict): an exported file (engine.export_weights' model.pt, or
    `dico_scale.export --format safetensors`) or a DeepSpeed checkpoint tag folder."""
    load_state(module, read_weights(path), path)


def torch_file_problem(path: str) -> str | None:
    """Why `path` is not a file torch.save wrote (a zip archive, or a pre-1.6 pickle), asked before torch.load: its
    errors on other files ('KeyError: 101', a miniz message, a hint about mmap) name nothing a user can act on."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:  # no read permission: a traceback from the first open
        return f"cannot be read ({e.strerror or e})"
    if head[:1] == b"\x80":
        return None
    if head != b"PK\x03\x04":
        return "not a file torch.save wrote (a .pt zip archive)"
    try:
        zipfile.ZipFile(path).close()
    except (zipfile.BadZipFile, OSError) as e:
        return f"truncated or corrupt ({e})"
    return None


def load_torch_file(path: str, what: str, mmap: bool = False):
    """torch.load of a file torch.save wrote (tensors only); a ConfigError "cannot read <what> '<path>': ..." else."""
    if os.path.isfile(path) and (problem := torch_file_problem(path)):
        raise ConfigError(f"cannot read {what} '{path}': {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise ConfigError(f"cannot read {what} '{path}': {first_line(e)}") from None


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict of load_weights' `path`; a ConfigError naming the file when it cannot be read."""
    if not os.path.isdir(path) and not path.endswith(".safetensors"):  # a model.pt export
        blob = load_torch_file(path, "weights")
        if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
            raise ConfigError(f"weights '{path}' are not a dico_scale export (model.pt: a dict with 'state_dict')")
        return blob["state_dict"]
    if problem := tag_folder_problem(path):
        raise ConfigError(f"weights '{path}' are {problem}")
    try:
        if os.path.isdir(path):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            p = Path(path)
            return get_fp32_state_dict_from_zero_checkpoint(str(p.parent), tag=p.name)
        from safetensors.torch import load_file
        return load_file(path)
    except Exception as e:
        raise ConfigError(f"cannot read weights '{path}': {first_line(e)}") from None


def tag_folder_problem(path: str) -> str | None:
    """What a folder given as dico_scale weights is instead of a checkpoint tag (DeepSpeed's *_model_states.pt): a
    transformers folder or peft's adapter folder are read through other keys. None for a tag, or not a folder."""
    p = Path(path)
    if not p.is_dir() or any(p.glob("*_model_states.pt")):
        return None
    if (p / "adapter_config.json").is_file():
        return ("peft's adapter folder (export --adapters-only), the adapters alone: start from the run's checkpoint "
                "tag or its merged export (model.pt)")
    if (p / "config.json").is_file():
        return ("a transformers folder (an export's hf/, or a model's own): give it as captioner.hf_path (the row "
                "of its architecture), or start from the export's model.pt")
    return "a folder that is not a checkpoint tag (no *_model_states.pt in it)"


def check_export_file(path: str, what: str) -> None:
    """An export file that read_weights can read, checked before a job is launched on it: a model.pt's structure
    (mapped, not read, at any size) or a safetensors header; a ConfigError naming `what` otherwise."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as e:
            raise ConfigError(f"cannot read {what} '{path}': {first_line(e)}") from None
        return
    blob = load_torch_file(path, what, mmap=True)
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise ConfigError(f"{what} '{path}' is not a dico_scale export (model.pt: a dict with 'state_dict')")


def recorded_section(path: str, name: str) -> dict | None:
    """A section of the run config that dico_scale weights record (a checkpoint tag's config.yaml, a safetensors
    export's sidecar, a model.pt's "config"); None when they record none, or it cannot be read."""
    from omegaconf import DictConfig, OmegaConf

    try:
        if os.path.isdir(path):
            text = (Path(path) / "config.yaml").read_text()
        elif path.endswith(".safetensors"):
            text = json.loads(sidecar(path).read_text())["config"]
        else:
            text = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config", "")
        config = OmegaConf.create(text) if text else None
    except Exception:  # no record of the run, or one unreadable
        return None
    if not isinstance(config, DictConfig):
        return None
    section = config.get(name)
    return OmegaConf.to_container(section) if isinstance(section, DictConfig) else {}


def recorded_captioner(path: str) -> dict | None:
    return recorded_section(path, "captioner")


def recorded_stage(path: str) -> str | None:
    """train.stage of the run that wrote dico_scale weights; None when they do not record it."""
    return (recorded_section(path, "train") or {}).get("stage")


def trained_as(path: str, captioner) -> str:
    """Where dico_scale weights that do not fit come from another captioner row or folder than `captioner`
    (cfg.captioner): ' (trained as captioner.model=..., captioner.hf_path=...; configured: ...)', from the run config
    they record (recorded_captioner); '' when it records none or the same."""
    then = recorded_captioner(path)
    if not then:  # nothing to add to the load's own message
        return ""
    keys = [k for k in ("model", "hf_path") if str(then.get(k, "")) != str(getattr(captioner, k))]
    if not keys:
        return ""
    return (" (trained as " + ", ".join(f"captioner.{k}={then.get(k, '')}" for k in keys) + "; configured: "
            + ", ".join(f"captioner.{k}={getattr(captioner, k)}" for k in keys) + ")")


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """`state` into `module`, strictly; the first problems named otherwise."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k} has shape {list(v.shape)}, model wants {list(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        raise ConfigError(f"weights '{path}' do not fit the configured model ({len(problems)} problems): "
                          + "; ".join(problems[:3]))
    module.load_state_dict(state, strict=True)
