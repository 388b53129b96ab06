"""Hugging Face encoder-decoder captioners (MODELS row `hf_encoder_decoder`): a `VisionEncoderDecoderModel` (ViT /
CLIP / Swin ... vision tower + GPT-2 or BERT-style decoder with cross-attention) or a `BlipForConditionalGeneration`,
read from a local `save_pretrained` folder (`captioner.hf_path`) with its own tokenizer and image processor.

The transformers model is kept whole as `self.model`, so our state dict is "model." + its own keys and an export
is one `save_pretrained` away. Teacher forcing, the cached decode step and the head are taken apart here so that
generation, the fused log-prob kernel and ZeRO-3 see the same pieces as for the built-in captioner.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..data.tokenizer import TokenLayout
from .captioner import CaptionerModel, checkpoint_layers
from .export_folder import write_folder
from .generation import exported_search
from .folders import (FREEZE_PARTS, PROCESSOR_FILES, TOKENIZER_FILES, check_token_ids, checked_config,
                      from_folder, hf_problem, load_model)

class HFTokenizer(TokenLayout):
    """A transformers tokenizer under the trainer's token layout [BOS, w..., EOS, PAD...]: BOS is the decoder's start
    token, EOS the model's end token, PAD the tokenizer's pad token or EOS when it has none. BOS may equal EOS
    (GPT-2): only the first position is read as BOS."""

    def __init__(self, tok, bos: int, eos: int, vocab_size: int, lead: str = ""):
        self.tok, self.bos, self.eos, self.vocab_size, self.lead = tok, bos, eos, vocab_size, lead
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else eos

    def words(self, text: str) -> list[int]:
        """A caption's tokens after BOS, as the model writes them: `lead` (a chat template's space after
        "Assistant:") first. A caption is text: "<image>" or "<|im_end|>" in it are characters, never the image
        token or an end of turn inside the caption (split_special_tokens)."""
        return self.tok(self.lead + text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        ids = ids[1:] if ids and ids[0] == self.bos else ids
        for i, t in enumerate(ids):
            if t in (self.eos, self.pad):
                ids = ids[:i]
                break
        return self.tok.decode(ids, skip_special_tokens=True).strip()



class HFPreprocess:
    """A PIL image -> the [3, H, W] pixel_values the folder's image processor gives."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def __repr__(self):
        return f"HFPreprocess({self.processor!r})"


def freeze_parts(spec: str) -> set[str]:
    parts = {p.strip() for p in spec.split(",") if p.strip()}
    if bad := parts - set(FREEZE_PARTS):
        raise ConfigError(f"captioner.freeze: unknown part(s) {', '.join(sorted(bad))} "
                          f"(parts: {', '.join(FREEZE_PARTS)})")
    return parts


class HFEncoderDecoder(CaptionerModel):
    def __init__(self, model, tokenizer: HFTokenizer, preprocess, freeze: set[str], image_encoder: bool = True,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        blip = type(model).__name__ == "BlipForConditionalGeneration"
        vision_name = "vision_model" if blip else "encoder"
        self.tower_prefix = f"model.{vision_name}."
        # views of the transformers model's parts, kept out of the module tree (plain attributes): our state dict
        # stays "model." + its own keys, each weight once
        view = {"decoder": model.text_decoder if blip else model.decoder}
        view["body"] = view["decoder"].base_model  # GPT2Model / BertModel / BlipTextModel
        # BERT-style heads transform the states before the vocabulary projection: part of "hidden" here
        view["transform"] = view["decoder"].cls.predictions.transform if hasattr(view["decoder"], "cls") else None
        view["projection"] = None if blip else getattr(model, "enc_to_dec_proj", None)
        self.__dict__.update(view)  # nn.Module.__setattr__ would register them
        self.body_kwargs = {"is_decoder": True} if blip else {}  # BLIP's text model is an encoder unless told
        if not image_encoder:
            setattr(model, vision_name, None)  # the frozen reference reads the policy's features
        self.width = self.decoder.config.hidden_size
        self.frozen = freeze
        parts = self.parts()
        if "projection" in freeze and not parts["projection"]:
            raise ConfigError(f"captioner.freeze: 'projection' names nothing in this {type(model).__name__}: its "
                              "tower feeds the decoder without one")
        for part, modules in parts.items():
            for m in modules:
                m.requires_grad_(part not in freeze)
        if gradient_checkpointing:
            self.checkpoint_activations()

    def checkpoint_activations(self) -> None:
        """captioner.gradient_checkpointing: the decoder's layers, and a trainable tower's (the encoder of a
        VisionEncoderDecoderModel), recomputed in backward; non-reentrant, as ZeRO-3's hooks need."""
        if not self.decoder.supports_gradient_checkpointing:
            raise ConfigError(f"captioner.gradient_checkpointing: transformers has none for "
                              f"{type(self.decoder).__name__} (this folder's text decoder): set it to false")
        checkpoint_layers(self.decoder)
        for tower in [] if "vision" in self.frozen else self.parts()["vision"]:
            if tower.supports_gradient_checkpointing:
                checkpoint_layers(tower)

    @classmethod
    def build(cls, cfg, image_encoder: bool = True) -> "HFEncoderDecoder":
        import transformers

        c = cfg.captioner
        config = checked_config(c.hf_path, hf_problem)
        arch = config["architectures"][0]
        model = load_model(getattr(transformers, arch).from_pretrained, c.hf_path, c.attn_implementation)
        tokenizer = load_tokenizer(c.hf_path, model)
        preprocess = None
        if image_encoder:
            preprocess = HFPreprocess(from_folder(transformers.AutoImageProcessor.from_pretrained, c.hf_path,
                                                  what="its image processor does not load", files=PROCESSOR_FILES))
        return cls(model, tokenizer, preprocess, freeze_parts(c.freeze), image_encoder, c.gradient_checkpointing)

    def parts(self) -> dict[str, list[nn.Module]]:
        vision = getattr(self.model, "vision_model", None) or getattr(self.model, "encoder", None)
        return {"vision": [vision] if vision is not None else [],
                "projection": [self.projection] if self.projection is not None else [],
                "embeddings": [getattr(self.body, "embeddings", None) or nn.ModuleList([self.body.wte, self.body.wpe])]}

    def frozen_towers(self) -> list[nn.Module]:
        return self.parts()["vision"] if "vision" in self.frozen else []

    @property
    def head(self) -> nn.Linear:
        return self.decoder.get_output_embeddings()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def head_bias(self) -> torch.Tensor | None:
        return self.head.bias

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        vision = self.parts()["vision"][0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and "vision" not in self.frozen):
            return vision(pixel_values=pixels).last_hidden_state

    def image_context(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.projection is None else self.projection(features)

    def decoder_hidden(self, tokens: torch.Tensor, context: torch.Tensor, cache=None) -> torch.Tensor:
        out = self.body(input_ids=tokens, encoder_hidden_states=context, cache=cache, use_cache=cache is not None,
                        **self.body_kwargs)
        hidden = out.last_hidden_state
        return hidden if self.transform is None else self.transform(hidden)

    def save_pretrained(self, folder: str | Path, state: dict[str, torch.Tensor], generation=None,
                        run: dict | None = None) -> None:
        """A transformers folder of `state` (our state dict) with the tokenizer and image processor, written beside
        and moved in (models/export_folder.py); `generation`: the run's GenerationConfig, generate's default there;
        `run`: the export's fields, whose config, stage, step and MLflow run the folder's mark keeps (export_run)."""
        own = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, state_dict=own)
            if generation is not None:  # the run's search as the folder's default (models/generation.py)
                exported_search(self.model.generation_config, self, generation).save_pretrained(tmp)
            self.tokenizer.tok.save_pretrained(tmp)
            if self.preprocess is not None:
                self.preprocess.processor.save_pretrained(tmp)

        write_folder(folder, write, "a transformers save_pretrained folder", run)


def load_tokenizer(path: str, model) -> HFTokenizer:
    """The folder's tokenizer with the model's BOS (decoder start) and EOS; a tokenizer without EOS is refused."""
    from transformers import AutoTokenizer

    tok = from_folder(AutoTokenizer.from_pretrained, path, what="its tokenizer does not load", files=TOKENIZER_FILES)
    if type(model).__name__ == "BlipForConditionalGeneration":
        t = model.config.text_config
        bos, eos = t.bos_token_id, t.sep_token_id
    else:
        bos = model.config.decoder_start_token_id
        eos = model.config.eos_token_id if model.config.eos_token_id is not None else tok.eos_token_id
    if eos is None:
        raise ConfigError(f"captioner.hf_path '{path}': neither the model config nor the tokenizer names an EOS token")
    if bos is None:
        raise ConfigError(f"captioner.hf_path '{path}': the model config names no decoder start token")
    vocab = model.decoder.get_output_embeddings().out_features if hasattr(model, "decoder") else \
        model.text_decoder.get_output_embeddings().out_features
    check_token_ids(path, vocab, {"EOS": int(eos), "decoder start": int(bos)})
    return HFTokenizer(tok, int(bos), int(eos), vocab)
