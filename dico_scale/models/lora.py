"""LoRA adapters through peft (`captioner.lora.*`) on a Hugging Face row's transformers model (`captioner.model`).

The adapters are injected into that model in place (peft's `get_peft_model`), so the captioner's state dict stays
"model." + the model's own keys, the LoRA layers' `base_layer` / `lora_A` / `lora_B` included; the PeftModel that
holds peft's utilities (disabling, adapter-only saving) is kept beside it, outside the module tree. Every base weight
is frozen; only the adapters train, and the modules named by captioner.lora.modules_to_save (peft's wrapper: a trained
copy beside the starting one, keys `...modules_to_save.default...` and `...original_module...`). Adapters are added
after the starting weights are loaded (an export is always merged: plain keys).

With adapters disabled the policy is exactly its starting captioner (the saved modules' starting copies act): DiCO's
reference without a second copy of the weights (`adapters_disabled`). Exports merge the adapters into the weights
(`merged_state`, peft's own delta; the saved modules' trained copies under their plain names);
`python -m dico_scale.export --adapters-only` writes peft's adapter folder instead (the saved modules in it).
"""
from __future__ import annotations

import contextlib
import re
import warnings

import torch

from ..errors import ConfigError
from .export_folder import write_folder

ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head


def target_modules(spec: str) -> list[str] | str:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    return ALL_LINEAR if names == [ALL_LINEAR] else names


def add_lora(captioner, lora) -> None:
    """Injects the adapters of `lora` (captioner.lora) into captioner.model, outside its frozen parts; the base
    weights stop training."""
    from peft import LoraConfig, get_peft_model

    targets, frozen = target_modules(lora.target_modules), frozen_names(captioner)
    saved, saved_keys = modules_to_save(captioner, lora.modules_to_save, frozen)
    if targets != ALL_LINEAR:
        # the losses read the output head's weight itself (captioner.head_weight), never the module: adapters there
        # would never act; peft's all-linear leaves the head out too
        head = captioner.model.get_output_embeddings()
        if names := sorted({n.rsplit(".", 1)[-1] for n, m in captioner.model.named_modules() if m is head} & set(targets)):
            raise ConfigError(f"bad value for config key 'captioner.lora.target_modules': {', '.join(names)} is the "
                              f"output head of {type(captioner.model).__name__}, which LoRA does not adapt (the "
                              "losses read its weight directly; all-linear leaves it out too)")
        linear = {name.rsplit(".", 1)[-1] for name, m in captioner.model.named_modules()
                  if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
                  and not any(name == f or name.startswith(f + ".") for f in frozen)}
        if missing := sorted(set(targets) - linear):
            raise ConfigError(f"bad value for config key 'captioner.lora.target_modules': {', '.join(missing)} "
                              f"match no linear layer of {type(captioner.model).__name__} outside its frozen parts "
                              f"(captioner.freeze); its linear layers: {', '.join(sorted(linear)[:12])}"
                              f"{', ...' if len(linear) > 12 else ''}")
    # no adapters in the frozen parts, nor in a module trained whole (its copy would carry them twice)
    exclude = "|".join(rf"{re.escape(f)}(\..*)?" for f in frozen + saved_keys) or None  # peft full-matches one regex
    # GPT-2's Conv1D stores its weight transposed: peft must be told (else it warns and sets it per layer itself)
    conv1d = any(type(m).__name__ == "Conv1D" and (targets == ALL_LINEAR or name.rsplit(".", 1)[-1] in targets)
                 for name, m in captioner.model.named_modules())
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        exclude_modules=exclude, fan_in_fan_out=conv1d, modules_to_save=saved or None)
    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated alias: a FutureWarning per rank
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        captioner.__dict__["peft"] = get_peft_model(captioner.model, config)  # plain attribute: not a submodule


def modules_to_save(captioner, spec: str, frozen: list[str]) -> tuple[list[str], list[str]]:
    """captioner.lora.modules_to_save's names, and the modules they match as peft matches them (every module whose
    name ends with one): each name matches, and no match is or holds a frozen part, the output head's weight (the
    losses read that weight directly; a tied input embedding is the same weight) or a module the row holds itself
    (hf_encoder_decoder's views of its decoder: they would go on running the starting copy peft keeps)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        return [], []
    modules = dict(captioner.model.named_modules(remove_duplicate=False))
    head = captioner.head_weight  # BLIP's transformers model names no output embeddings: the row does
    held = {id(v) for v in vars(captioner).values() if isinstance(v, torch.nn.Module)}  # plain attributes
    bad = "bad value for config key 'captioner.lora.modules_to_save'"
    matched = []
    for name in names:
        keys = [k for k in modules if k and k.endswith(name)]
        if not keys:
            raise ConfigError(f"{bad}: {name} matches no module of {type(captioner.model).__name__}")
        for k in keys:
            if any(k == f or k.startswith(f + ".") or f.startswith(k + ".") for f in frozen):
                raise ConfigError(f"{bad}: {name} matches {k}, which is or holds a frozen part (captioner.freeze)")
            if any(p is head for p in modules[k].parameters()):
                raise ConfigError(f"{bad}: {name} matches {k}, which holds the output head's weight (the losses "
                                  "read it directly)")
            if any(id(m) in held for m in modules[k].modules()):
                raise ConfigError(f"{bad}: {name} matches {k}, which {type(captioner).__name__} calls itself (it "
                                  "would run the starting copy, not the trained one); name a module inside it")
        matched += keys
    return names, matched


def frozen_names(captioner) -> list[str]:
    """Module names (relative to captioner.model) of the captioner's frozen parts (captioner.freeze): adapters
    there would train a tower the config keeps frozen."""
    parts = getattr(captioner, "parts", None)
    if parts is None:
        return []
    frozen = {id(m) for part, modules in parts().items() if part in captioner.frozen for m in modules}
    return [name for name, m in captioner.model.named_modules() if id(m) in frozen]


def has_lora(captioner) -> bool:
    return "peft" in captioner.__dict__


def adapters_disabled(captioner):
    """A context in which the captioner runs without its adapters (its starting weights); nothing without LoRA."""
    return captioner.peft.disable_adapter() if has_lora(captioner) else contextlib.nullcontext()


def merged_state(captioner, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the captioner's, adapters included) with each adapter merged into its base weight by peft's
    `get_delta_weight`: the keys of the captioner without LoRA. Reads the adapters from the live module (under
    ZeRO-3: inside a gather)."""
    if not has_lora(captioner):
        return state
    from peft.tuners.lora import LoraLayer

    # the saved modules' trained copies take their plain names; their starting copies go
    out = {k.replace(".base_layer.", ".").replace(".modules_to_save.default.", "."): v for k, v in state.items()
           if ".lora_" not in k and ".original_module." not in k}
    for name, m in captioner.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            key = f"{name}.weight"
            delta = m.get_delta_weight("default").detach().to(out[key].device, out[key].dtype)
            out[key] = out[key] + delta
    return out


def save_adapters(captioner, folder: str) -> None:
    """peft's adapter folder (adapter_config.json, adapter_model.safetensors) of the captioner's live adapters."""
    if not has_lora(captioner):
        raise ConfigError("--adapters-only: this run trained no LoRA adapters (captioner.lora.r=0)")
    write_folder(folder, captioner.peft.save_pretrained, "peft LoRA adapters")
