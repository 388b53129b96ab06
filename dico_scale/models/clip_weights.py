"""CLIP weights from local files, in the formats users have, into an open_clip model built by name:

  torchscript  OpenAI's archives (the `clip` package's ~/.cache/clip/ViT-B-32.pt): torch.jit.load on the CPU, then
               its state dict, whose names are open_clip's (as open_clip's load_openai_model reads them)
  torch        torch.save state dicts: open_clip_pytorch_model.bin, the PAC-S release, dico_scale exports; a
               'state_dict' wrapper and a 'module.' prefix are unwrapped
  safetensors  open_clip_model.safetensors, dico_scale safetensors exports
  hf           a Hugging Face CLIPModel folder (config.json + model.safetensors or pytorch_model.bin), converted to
               open_clip's names after its architecture is checked against the open_clip model's config

sniff_weights_format reads only a zip directory, a header or config.json (and the run a dico_scale export records),
so config validation can reject a file of the wrong kind in seconds, before any process group starts. Every failure
is one ConfigError line naming the file.
"""
from __future__ import annotations

import json
import os
import struct
import warnings
import zipfile
from dataclasses import fields

import torch

from ..errors import ConfigError
from ..stages import captioner_stages
from .weights import recorded_stage

KNOWN = ("an OpenAI TorchScript archive (ViT-B-32.pt), an open_clip state dict (.bin/.pt/.pth, PAC-S, "
         "dico_scale export), a .safetensors file, or a Hugging Face CLIPModel folder (config.json + "
         "model.safetensors or pytorch_model.bin)")
HF_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Tensors an OpenAI archive holds that are not weights (open_clip's build_model_from_openai_state_dict drops them).
OPENAI_META = ("input_resolution", "context_length", "vocab_size")


def _fail(label: str, path: str, why: str):
    raise ConfigError(f"{label} '{path}': {why}")


# ---- format recognition ------------------------------------------------------------------------------------------

def sniff_weights_format(path: str, label: str = "CLIP weights") -> str:
    """'torchscript' | 'torch' | 'safetensors' | 'hf'; a ConfigError naming the file otherwise. label: the config key
    (or CLI option) that gave the file."""
    if not os.path.exists(path):
        _fail(label, path, "does not exist")
    fmt = "folder" if os.path.isdir(path) else _sniff_file(path, label)
    # a captioner's export is a torch file like an evaluator's: only the run it records tells them apart
    if fmt != "torchscript" and (problem := captioner_export_problem(path, label)):
        _fail(label, path, problem)
    return _sniff_folder(path, label) if fmt == "folder" else fmt


def captioner_export_problem(path: str, key: str) -> str | None:
    """Why dico_scale weights that record a captioner stage's run (model.pt, a safetensors export, a checkpoint tag)
    are no CLIP weights for the config key `key`, and what it takes instead; None for any other file."""
    stage = recorded_stage(path)
    if stage not in captioner_stages():
        return None
    wants = ("the evaluator stage's model.pt (a PAC-S / open_clip checkpoint goes in evaluator.weights)"
             if key == "train.init_from" else "the evaluator stage's model.pt or a PAC-S / open_clip checkpoint (a "
             "captioner starts from its export through train.init_from)")
    return f"a captioner's export (train.stage={stage}), not CLIP weights: give {wants}"


def _sniff_file(path: str, label: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:  # no read permission: a traceback from the first open
        _fail(label, path, f"cannot be read ({e.strerror or e})")
    size = os.path.getsize(path)
    if head.startswith(b"PK\x03\x04"):  # torch.save and torch.jit.save both write zip archives
        try:
            names = zipfile.ZipFile(path).namelist()
        except (zipfile.BadZipFile, OSError) as e:
            _fail(label, path, f"truncated or corrupt zip archive ({e})")
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") for n in names):
            return "torch"
        _fail(label, path, f"a zip archive that torch did not write; known formats: {KNOWN}")
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy (pre-1.6) format
        return "torch"
    if len(head) == 8:
        n = struct.unpack("<Q", head)[0]  # safetensors: u64 header length, then a JSON header
        if 2 <= n <= size - 8:
            with open(path, "rb") as f:
                f.seek(8)
                start = f.read(1)
            if start == b"{":
                return "safetensors"
    _fail(label, path, f"unknown format; known formats: {KNOWN}")


def _sniff_folder(path: str, label: str) -> str:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        _fail(label, path, f"a folder without config.json; known formats: {KNOWN}")
    try:
        with open(cfg_file) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        _fail(label, path, f"config.json is not a JSON object ({type(e).__name__})")
    if model_type != "clip":
        _fail(label, path, f"a Hugging Face '{model_type}' folder, not a CLIPModel (model_type 'clip')")
    if not any(os.path.isfile(os.path.join(path, n)) for n in HF_FILES):
        _fail(label, path, f"a Hugging Face CLIP folder without weights (one of {', '.join(HF_FILES)})")
    return "hf"


# ---- reading -----------------------------------------------------------------------------------------------------

def read_state_dict(path: str, fmt: str) -> dict:
    """The file's tensors as stored (no conversion), unwrapped from 'state_dict' and 'module.'."""
    if fmt == "torchscript":
        with warnings.catch_warnings():  # torch.jit is deprecated, and these archives exist all the same
            warnings.simplefilter("ignore", FutureWarning)
            sd = torch.jit.load(path, map_location="cpu").state_dict()
        sd = {k: v for k, v in sd.items() if k not in OPENAI_META}
    elif fmt == "safetensors":
        from safetensors.torch import load_file
        sd = load_file(path)
    elif fmt == "torch":
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    else:
        raise ValueError(fmt)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("no state dict of tensors in it")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def archive_activation(path: str) -> str | None:
    """'quick_gelu' | 'gelu' | None (unknown), from a TorchScript archive's code: the weights do not tell, and
    OpenAI's models all use QuickGELU (open_clip's '-quickgelu' names)."""
    with zipfile.ZipFile(path) as z:
        code = b"".join(z.read(n) for n in z.namelist() if "/code/" in n and n.endswith(".py"))
    return "quick_gelu" if b"QuickGELU" in code else "gelu" if b"torch.gelu(" in code else None


# ---- Hugging Face CLIPModel -> open_clip ---------------------------------------------------------------------------

def read_hf_folder(path: str) -> tuple[dict, dict]:
    """(config.json as a dict with transformers' defaults filled in, state dict as stored)."""
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(path, local_files_only=True)
    files = os.listdir(path)
    if "model.safetensors" in files:
        from safetensors.torch import load_file
        sd = load_file(os.path.join(path, "model.safetensors"))
    elif "model.safetensors.index.json" in files:  # sharded
        from safetensors.torch import load_file
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {k: v for s in shards for k, v in load_file(os.path.join(path, s)).items()}
    else:
        sd = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    return config, sd


# Options of open_clip's tower configs that change what the tower computes without changing any weight's shape;
# a Hugging Face CLIPModel has none of them, so each must keep its default.
_PLAIN_VISION = ("ls_init_value", "attentional_pool", "no_ln_pre", "pos_embed_type", "final_ln_after_pool",
                 "pool_type", "act_kwargs", "norm_kwargs", "qk_norm", "scaled_cosine_attn", "scale_heads",
                 "scale_attn_inner", "scale_attn", "scale_fc", "timm_model_name")
_PLAIN_TEXT = ("ls_init_value", "embed_cls", "no_causal_mask", "final_ln_after_pool", "pool_type", "proj_bias",
               "proj_type", "act_kwargs", "norm_kwargs", "qk_norm", "scaled_cosine_attn", "scale_heads",
               "scale_attn_inner", "scale_attn", "scale_fc", "hf_model_name")


def _square(size):
    """224 for 224, [224, 224] or (224, 224); other sizes as a tuple."""
    if isinstance(size, int):
        return size
    size = tuple(size)
    return size[0] if len(set(size)) == 1 else size


def _tower_cfg(cls, given: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in given.items() if k in names})


def hf_architecture_problems(name: str, hf) -> list[str]:
    """Where the open_clip model `name` and a transformers CLIPConfig disagree (empty: the weights compute the same)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    oc = open_clip.get_model_config(name) or {}
    if oc.get("custom_text") or not isinstance(oc.get("vision_cfg", {}).get("layers", 12), int) or "text_cfg" not in oc:
        return [f"open_clip model '{name}' is not a ViT CLIP with a CLIP text tower, as a Hugging Face CLIPModel is"]
    v, t = _tower_cfg(CLIPVisionCfg, oc["vision_cfg"]), _tower_cfg(CLIPTextCfg, oc["text_cfg"])
    problems = [f"vision_cfg.{k}={getattr(v, k)!r}" for k in _PLAIN_VISION if getattr(v, k, None) != getattr(
        CLIPVisionCfg, k, None)]
    problems += [f"text_cfg.{k}={getattr(t, k)!r}" for k in _PLAIN_TEXT if getattr(t, k, None) != getattr(
        CLIPTextCfg, k, None)]
    if problems:
        return [f"open_clip model '{name}' sets {', '.join(problems)}, which a Hugging Face CLIPModel has not"]
    act = "quick_gelu" if oc.get("quick_gelu", False) else "gelu"
    hv, ht = hf.vision_config, hf.text_config
    pairs = [
        ("embed dim", oc["embed_dim"], hf.projection_dim),
        ("vision width", v.width, hv.hidden_size), ("vision layers", v.layers, hv.num_hidden_layers),
        ("vision heads", v.width // v.head_width, hv.num_attention_heads),
        ("vision mlp width", int(v.width * v.mlp_ratio), hv.intermediate_size),
        ("patch size", _square(v.patch_size), _square(hv.patch_size)),
        ("image size", _square(v.image_size), _square(hv.image_size)),
        ("vision activation", act, hv.hidden_act), ("vision layer norm eps", 1e-5, hv.layer_norm_eps),
        ("text width", t.width, ht.hidden_size), ("text layers", t.layers, ht.num_hidden_layers),
        ("text heads", t.heads, ht.num_attention_heads), ("text mlp width", int(t.width * t.mlp_ratio),
                                                          ht.intermediate_size),
        ("context length", t.context_length, ht.max_position_embeddings), ("vocab size", t.vocab_size, ht.vocab_size),
        ("text activation", act, ht.hidden_act), ("text layer norm eps", 1e-5, ht.layer_norm_eps),
    ]
    return [f"{what} {a} (open_clip) vs {b} (Hugging Face)" for what, a, b in pairs if a != b]


def _hf_tower(sd: dict, src: str, dst: str, layers: int) -> dict:
    """One tower's transformer blocks: HF q/k/v projections -> open_clip's packed in_proj (rows q, k, v)."""
    out = {}
    for i in range(layers):
        s, d = f"{src}.encoder.layers.{i}.", f"{dst}.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{d}attn.in_proj_{part}"] = torch.cat([sd[f"{s}self_attn.{p}_proj.{part}"] for p in "qkv"])
            out[f"{d}attn.out_proj.{part}"] = sd[f"{s}self_attn.out_proj.{part}"]
            out[f"{d}ln_1.{part}"] = sd[f"{s}layer_norm1.{part}"]
            out[f"{d}ln_2.{part}"] = sd[f"{s}layer_norm2.{part}"]
            out[f"{d}mlp.c_fc.{part}"] = sd[f"{s}mlp.fc1.{part}"]
            out[f"{d}mlp.c_proj.{part}"] = sd[f"{s}mlp.fc2.{part}"]
    return out


def hf_to_open_clip(sd: dict, hf) -> dict:
    """A transformers CLIPModel state dict in open_clip's (OpenAI's) names; projections transposed."""
    v, t = "vision_model", "text_model"
    out = {
        "visual.class_embedding": sd[f"{v}.embeddings.class_embedding"],
        "visual.conv1.weight": sd[f"{v}.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd[f"{v}.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].t(),
        "token_embedding.weight": sd[f"{t}.embeddings.token_embedding.weight"],
        "positional_embedding": sd[f"{t}.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].t(),
        "logit_scale": sd["logit_scale"],
    }
    for part in ("weight", "bias"):
        out[f"visual.ln_pre.{part}"] = sd[f"{v}.pre_layrnorm.{part}"]  # sic: transformers' name
        out[f"visual.ln_post.{part}"] = sd[f"{v}.post_layernorm.{part}"]
        out[f"ln_final.{part}"] = sd[f"{t}.final_layer_norm.{part}"]
    out.update(_hf_tower(sd, v, "visual.transformer", hf.vision_config.num_hidden_layers))
    out.update(_hf_tower(sd, t, "transformer", hf.text_config.num_hidden_layers))
    return {k: x.contiguous() for k, x in out.items()}


# ---- loading into the model --------------------------------------------------------------------------------------

def _fit(model: torch.nn.Module, sd: dict) -> dict:
    """The state dict in the model's own layout: open_clip's custom-text names, logit_scale's shape, no buffers the
    model does not save (a traced archive keeps attn_mask)."""
    from open_clip.model import convert_to_custom_text_state_dict

    own = model.state_dict()
    transient = {n for n, _ in model.named_buffers()} - set(own)
    sd = {k: v for k, v in sd.items() if k not in transient}
    if "positional_embedding" in sd and "positional_embedding" not in own:
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):  # 0-d in OpenAI / open_clip files, [1] here (see create_clip)
        if key in sd and key in own and sd[key].numel() == own[key].numel():
            sd[key] = sd[key].reshape(own[key].shape)
    return sd


def _mismatches(own: dict, sd: dict) -> list[str]:
    problems = [f"missing {k}" for k in own if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in own]
    problems += [f"{k} has shape {list(v.shape)}, model wants {list(own[k].shape)}"
                 for k, v in sd.items() if k in own and v.shape != own[k].shape]
    return problems


def load_clip_weights(model: torch.nn.Module, name: str, path: str) -> str:
    """Loads `path` into the open_clip model `name` (strict: every weight, same shapes); returns the format."""
    fmt = sniff_weights_format(path)
    import open_clip

    quick = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    try:
        if fmt == "hf":
            config, raw = read_hf_folder(path)
            problems = hf_architecture_problems(name, config)
            if problems:
                _fail("Hugging Face CLIP folder", path, f"does not match open_clip model '{name}': "
                      + "; ".join(problems[:4]))
            sd = hf_to_open_clip(raw, config)
        else:
            sd = read_state_dict(path, fmt)
            act = archive_activation(path) if fmt == "torchscript" else None
            if act and act != ("quick_gelu" if quick else "gelu"):
                _fail("CLIP weights", path, f"a TorchScript archive with {act} activations, but open_clip model "
                      f"'{name}' uses {'quick_gelu' if quick else 'gelu'} (OpenAI's: the '-quickgelu' names, "
                      f"e.g. ViT-B-32-quickgelu)")
            if any(k.startswith("vision_model.") for k in sd):
                _fail("CLIP weights", path, "Hugging Face CLIPModel weights: give the folder that holds them "
                      "with its config.json")
    except ConfigError:
        raise
    except Exception as e:
        msg = (str(e).splitlines() or [""])[0][:200]
        _fail("cannot read CLIP weights", path, f"{fmt}: {type(e).__name__}: {msg}")
    sd = _fit(model, sd)
    problems = _mismatches(model.state_dict(), sd)
    if problems:
        _fail("CLIP weights", path, f"({fmt}) do not fit open_clip model '{name}' ({len(problems)} problems): "
              + "; ".join(problems[:3]))
    model.load_state_dict(sd, strict=True)
    return fmt
