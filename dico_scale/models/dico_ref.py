"""The DiCO reference code's captioner (aimagelab/DiCO, MODELS row `dico_ref`), exactly: a Hugging Face CLIP vision
transformer (frozen, its last hidden states before post-LN) -> Linear to the encoder width -> a BertModel fed through
`inputs_embeds` (position and token-type embeddings, post-LN) -> GPT-2 with cross-attention, the CLIP BPE vocabulary
plus one pad token (BOS 49406, EOS 49407, PAD 49408).

The architecture and weights come from a `save_pretrained` folder of the reference's own VisionEncoderDecoderModel
fork (`captioner.hf_path`): config.json with an encoder of model type "vision-encoder-encoder", weights in
pytorch_model.bin or model.safetensors under the reference's key names (`REF_PREFIXES`). The head is untied or tied
to the token embedding as the decoder config's tie_word_embeddings says.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ConfigError, first_line
from ..data.tokenizer import CaptionTokenizer
from .captioner import CaptionerModel, checkpoint_layers
from .folders import checked_config, from_folder, ref_problem

# the reference's state-dict prefixes -> ours
REF_PREFIXES = {"encoder.vision_encoder.": "vision.", "encoder.vis_enc_to_enc_proj.": "proj.",
                "encoder.encoder.": "encoder.", "enc_to_dec_proj.": "enc_to_dec.", "decoder.": "decoder."}
# keys the reference saves that no forward reads: BERT's pooler, position-id buffers of older transformers
UNUSED = ("encoder.encoder.pooler.", "position_ids")
# each stack's part of config.json, its layer count (transformers' config attribute) and its layers' prefix in our
# names: compared with the weights before building (a million layers would take minutes to build, even on meta)
LAYERS = (("encoder.vision_encoder", "num_hidden_layers", "vision.encoder.layers."),
          ("encoder.encoder", "num_hidden_layers", "encoder.encoder.layer."),
          ("decoder", "n_layer", "decoder.transformer.h."))


def _sub(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")}


def sub_configs(config: dict, path: str = "") -> tuple:
    """transformers' configs of the tower, the encoder and the decoder (config.json as ref_problem checked it); one
    that does not build (a string where transformers wants a bool) is a ConfigError naming it."""
    from transformers import BertConfig, CLIPVisionConfig, GPT2Config

    enc, out = config["encoder"], []
    for (name, _, _), make, sub in zip(LAYERS, (CLIPVisionConfig, BertConfig, GPT2Config),
                                       (enc["vision_encoder"], enc["encoder"], config["decoder"])):
        try:
            out.append(make(**_sub(sub)))
        except Exception as e:  # huggingface_hub's strict-field error, TypeError, ValueError: one cause
            raise ConfigError(f"captioner.hf_path '{path}': config.json's {name} is not a valid "
                              f"{make.__name__} ({first_line(e)})") from None
    return tuple(out)


class DicoRef(CaptionerModel):
    tower_prefix = "vision."

    def __init__(self, config: dict, image_encoder: bool = True, freeze_vision: bool = True,
                 gradient_checkpointing: bool = False):
        super().__init__()
        from transformers import BertModel, CLIPVisionModel, GPT2LMHeadModel

        vision_cfg, bert_cfg, gpt_cfg = sub_configs(config)
        self.vision = CLIPVisionModel(vision_cfg) if image_encoder else None
        self.proj = nn.Linear(vision_cfg.hidden_size, bert_cfg.hidden_size) \
            if vision_cfg.hidden_size != bert_cfg.hidden_size else nn.Identity()
        self.encoder = BertModel(bert_cfg, add_pooling_layer=False)
        # transformers 5 configs lack cross_attention_hidden_size unless config.json sets it
        cross = getattr(gpt_cfg, "cross_attention_hidden_size", None)
        self.enc_to_dec = nn.Linear(bert_cfg.hidden_size, gpt_cfg.n_embd) \
            if bert_cfg.hidden_size != gpt_cfg.n_embd and cross is None else nn.Identity()
        self.decoder = GPT2LMHeadModel(gpt_cfg)
        self.tied = gpt_cfg.tie_word_embeddings
        if not self.tied:  # a weight of its own (transformers ties it at construction otherwise)
            self.decoder.lm_head.weight = nn.Parameter(self.decoder.lm_head.weight.detach().clone())
        self.width, self.frozen_vision = gpt_cfg.n_embd, freeze_vision
        self.tokenizer = CaptionTokenizer()
        self.preprocess = None
        if image_encoder:
            import open_clip  # CLIP's eval transform: bicubic resize, centre crop, OpenAI mean / std

            self.preprocess = open_clip.image_transform(vision_cfg.image_size, is_train=False)
            self.vision.requires_grad_(not freeze_vision)
        if gradient_checkpointing:  # the decoder's, the encoder's and a trainable tower's layers
            for m in (self.decoder, self.encoder) + ((self.vision,) if image_encoder and not freeze_vision else ()):
                checkpoint_layers(m)

    @classmethod
    def build(cls, cfg, image_encoder: bool = True) -> "DicoRef":
        from .hf_encoder_decoder import freeze_parts

        c = cfg.captioner
        parts = freeze_parts(c.freeze)
        config, configs = ref_configs(c.hf_path)
        vision_cfg, bert_cfg, _ = configs
        if "projection" in parts and vision_cfg.hidden_size == bert_cfg.hidden_size:  # model.proj is an Identity
            raise ConfigError("captioner.freeze: 'projection' names nothing in this reference: its tower's width is "
                              "the encoder's, which it feeds without one")
        state = checked_weights(c.hf_path, config, configs)
        check_finite(state, c.hf_path)
        model = cls(config, image_encoder, "vision" in parts, c.gradient_checkpointing)
        if not image_encoder:
            state = {k: v for k, v in state.items() if not k.startswith(cls.tower_prefix)}
        model.load_state_dict(state, strict=True)
        for m in ([model.proj] if "projection" in parts else []) + \
                ([model.decoder.transformer.wte, model.decoder.transformer.wpe] if "embeddings" in parts else []):
            m.requires_grad_(False)
        return model

    def frozen_towers(self) -> list[nn.Module]:
        return [self.vision] if self.frozen_vision and self.vision is not None else []

    @property
    def head_weight(self) -> torch.Tensor:
        return self.decoder.lm_head.weight

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_vision):
            return self.vision(pixel_values=pixels).last_hidden_state

    def image_context(self, features: torch.Tensor) -> torch.Tensor:
        return self.enc_to_dec(self.encoder(inputs_embeds=self.proj(features)).last_hidden_state)

    def decoder_hidden(self, tokens: torch.Tensor, context: torch.Tensor, cache=None) -> torch.Tensor:
        out = self.decoder.transformer(input_ids=tokens, encoder_hidden_states=context, cache=cache,
                                       use_cache=cache is not None)
        return out.last_hidden_state


def check_folder_weights(path: str) -> None:
    """The folder's weight names and shapes against its config.json's architecture, the weights memory-mapped:
    nothing is materialised (preflight)."""
    checked_weights(path, *ref_configs(path), mmap=True)


def ref_configs(path: str) -> tuple[dict, tuple]:
    """The folder's config.json (ref_problem checked it) and transformers' configs of its three parts."""
    config = checked_config(path, ref_problem)
    configs = sub_configs(config, path)
    if (vocab := config["decoder"].get("vocab_size")) != (ours := CaptionTokenizer().vocab_size):
        raise ConfigError(f"captioner.hf_path '{path}': decoder vocab_size {vocab} is not the CLIP BPE's "
                          f"{ours} (49,408 + pad)")
    return config, configs


def checked_weights(path: str, config: dict, configs: tuple, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The folder's weights in our names, checked against its config before anything is materialised: the layer
    counts first (cheap), then names, shapes and dtypes against the model built on the meta device. Any config.json
    that does not fit its weights is one ConfigError naming the folder."""
    state = convert_state(read_ref_weights(path, mmap=mmap), configs[2].tie_word_embeddings, path)
    check_layers(configs, state, path)
    try:  # what ref_problem does not check (heads that do not divide a default width): transformers' own line
        with torch.device("meta"):
            own = DicoRef(config, image_encoder=True).state_dict()
    except Exception as e:
        raise ConfigError(f"captioner.hf_path '{path}': config.json's model does not build ({first_line(e)})") from None
    check_keys(state, own, path)
    return state


def check_layers(configs: tuple, state: dict[str, torch.Tensor], path: str) -> None:
    """No stack of more layers than the weights hold (fewer: check_keys names the extra keys)."""
    for config, (name, attr, prefix) in zip(configs, LAYERS):
        index = (k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix))
        held = 1 + max((int(i) for i in index if i.isdigit()), default=-1)
        if (n := getattr(config, attr)) > held:
            raise ConfigError(f"captioner.hf_path '{path}': config.json's {name}.{attr} is {n} but its weights hold "
                              f"{held} layers")


def check_finite(state: dict[str, torch.Tensor], path: str) -> None:
    """nan or inf in a weight would train (or convert) silently into nan losses."""
    if bad := next((k for k, v in state.items() if not torch.isfinite(v).all()), None):
        raise ConfigError(f"captioner.hf_path '{path}': weight {bad} holds nan or inf values")


def read_ref_weights(path: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The folder's state dict; a file that does not read (truncated, corrupt, not a state dict) is one ConfigError."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = from_folder(lambda d: load_file(str(Path(d) / "model.safetensors")), path,
                              what="model.safetensors does not load")
    elif (p / "pytorch_model.bin").is_file():
        weights = from_folder(lambda d: torch.load(Path(d) / "pytorch_model.bin", map_location="cpu",
                                                   weights_only=True, mmap=mmap), path,
                              what="pytorch_model.bin does not load")
    else:
        raise ConfigError(f"captioner.hf_path '{path}' has neither model.safetensors nor pytorch_model.bin")
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        # torch.load reads any pickle of plain types: a list or {"state_dict": ...} would fail in convert_state
        raise ConfigError(f"captioner.hf_path '{path}': pytorch_model.bin holds a {type(weights).__name__}, "
                          "not a state dict of tensors")
    return weights


def convert_state(ref: dict[str, torch.Tensor], tied: bool, path: str) -> dict[str, torch.Tensor]:
    """The reference's keys renamed to ours; unknown prefixes are kept as they are (check_keys names them)."""
    out = {}
    for k, v in ref.items():
        if k.startswith(UNUSED[0]) or k.endswith(UNUSED[1]) or (tied and k == "decoder.lm_head.weight"):
            continue
        new = next((ours + k[len(theirs):] for theirs, ours in REF_PREFIXES.items() if k.startswith(theirs)), k)
        out[new] = v
    if tied:  # the head is the token embedding: one tensor under both names, as GPT2LMHeadModel holds it
        if "decoder.transformer.wte.weight" in out:
            out["decoder.lm_head.weight"] = out["decoder.transformer.wte.weight"]
    return out


def check_keys(state: dict, own: dict, path: str) -> None:
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {list(v.shape)} != {list(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    # an int64 or bool tensor would be cast into the float parameter silently
    dtypes = [f"{k} {v.dtype}" for k, v in state.items()
              if k in own and v.is_floating_point() != own[k].is_floating_point()]
    if missing or extra or shapes or dtypes:
        parts = [f"missing {', '.join(missing[:5])}" if missing else "",
                 f"extra {', '.join(extra[:5])}" if extra else "", f"shapes {'; '.join(shapes[:3])}" if shapes else "",
                 f"not floating {', '.join(dtypes[:3])}" if dtypes else ""]
        raise ConfigError(f"captioner.hf_path '{path}': weights do not fit its config.json: "
                          + "; ".join(p for p in parts if p))
