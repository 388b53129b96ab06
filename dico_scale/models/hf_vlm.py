"""Decoder-only vision-language captioners (MODELS row `hf_vlm`): an `AutoModelForImageTextToText` (Idefics3 /
SmolVLM, Qwen2-VL / Qwen2.5-VL / Qwen3-VL, InternVL, LLaVA / LLaVA-NeXT / LLaVA-OneVision, Gemma 3, PaliGemma) read
from a local folder (`captioner.hf_path`) with its processor and chat template, asked `captioner.prompt` about each
image (the processor side: models/vlm_processor.py).

The prompt (chat template, image tokens and all) is one row per image, left-padded in a batch. Its last token, the
one after which the answer starts ("Assistant:", "<|im_start|>assistant\\n"), plays the built-in captioner's BOS: the
prompt before it is prefilled once per image (`image_context`, a `Prompt` of key/value states) and that cache is
expanded to the k candidates, and everything after it ([BOS, w1, ..., EOS]) is the caption the stages generate and
score. So log-probs and losses cover the continuation only, EOS included, the prompt and the image never; XE is
supervised fine-tuning with the prompt masked out. Positions are given explicitly (left padding must not shift them;
Qwen2-VL's multimodal rotary positions come from the model's own `get_rope_index`), so an image's candidates and
log-probs in a mixed batch equal those of the image alone. A prefix-LM (PaliGemma: the prompt attends both ways, its
last token included) is prefilled whole, and BOS's states (`BOSState`) join the cache when the continuation starts.

`captioner.gradient_checkpointing` recomputes each text decoder layer in backward (torch's non-reentrant checkpoint
around the layer's forward). The layers write the key/value cache, so the passes that train (the prompt's prefill and
the teacher-forced continuation) run on `ReplayableLayer` caches, whose update is a function of its inputs: a layer
replayed in backward gets the tensors it got the first time (transformers' own checkpointing switches the cache off).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import DynamicCache, DynamicLayer

from .captioner import CaptionerModel
from .export_folder import write_folder
from .generation import exported_search
from .folders import check_token_ids, checked_config, load_model, logit_softcap, vlm_problem
from .hf_encoder_decoder import HFTokenizer
from .vlm_processor import (TEXT_KEYS, VLMImages, VLMPreprocess, answer_lead, answer_turn, checked_images_kwargs,
                            eos_token, load_processor, prompt_ids)

# Prefix-LM families (model_type -> their first position): the prompt attends both ways, its last token included
PREFIX_LM = {"paligemma": 1}


@dataclass
class Prompt:
    """The prefilled prompt of each row (image context): per layer (keys, values) [N, heads, P, d], its padding mask
    [N, P], its tokens [N, P] (-1: padding), and the position of the row's BOS (the prompt's last token) [N]."""
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    tokens: torch.Tensor
    bos_pos: torch.Tensor
    mrope: bool
    bos: "BOSState | None" = None  # prefix-LM families (PaliGemma): BOS was prefilled with the prompt

    def size(self, dim: int = 0) -> int:
        return self.mask.size(0)

    @property
    def device(self) -> torch.device:
        return self.mask.device

    @property
    def length(self) -> int:
        return self.mask.size(1)

    def repeat(self, k: int) -> "Prompt":
        return Prompt(_repeat_kv(self.kv, k), self.mask.repeat_interleave(k, 0), self.tokens.repeat_interleave(k, 0),
                      self.bos_pos.repeat_interleave(k, 0), self.mrope,
                      self.bos and BOSState(_repeat_kv(self.bos.kv, k), self.bos.hidden.repeat_interleave(k, 0)))


@dataclass
class BOSState:
    """A prefix-LM's BOS (the prompt's last token, which attends to the whole prompt and the prompt to it, both ways):
    its key/value states per layer [N, heads, 1, d] and its output state [N, H], from the prompt's prefill."""
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    hidden: torch.Tensor


def _repeat_kv(kv, k: int):
    return [(a.repeat_interleave(k, 0), b.repeat_interleave(k, 0)) for a, b in kv]


class ReplayableLayer(DynamicLayer):
    """A cache layer whose update returns prefix + the given states and keeps them, rather than appending to what it
    holds: called twice with the same states (a checkpointed layer replayed in backward) it gives the same result.
    With a prefix (the prompt's states) it serves teacher forcing after the prompt; without, the prompt's prefill."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self.prefix = (keys, values) if keys is not None else None
        if keys is not None:
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.prefix is not None:
            key_states = torch.cat([self.prefix[0], key_states], dim=-2)
            value_states = torch.cat([self.prefix[1], value_states], dim=-2)
        self.keys, self.values, self.device, self.is_initialized = key_states, value_states, key_states.device, True
        return key_states, value_states


def replayable_cache(kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """A cache of ReplayableLayers: empty (a prefill fills it), or holding the prompt's states `kv` as prefixes."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = ReplayableLayer
    cache.layers = [ReplayableLayer(k, v) for k, v in kv or []]
    return cache


def _checkpointed_forward(self, *args, **kwargs):
    """A decoder layer's forward, recomputed in backward when it trains (bound to the layer: a copy of the model
    rebinds it to the copy)."""
    forward = type(self).forward.__get__(self)
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def towers(model) -> list[torch.nn.Module]:
    """The image tower inside an AutoModelForImageTextToText (Idefics3: vision_model; Qwen-VL: visual, its patch
    merger included; InternVL, the LLaVAs, Gemma 3: vision_tower)."""
    return [getattr(model.model, n) for n in ("vision_model", "visual", "vision_tower")
            if getattr(model.model, n, None) is not None]


def image_tokens(config) -> set[int]:
    """The ids of the model's image (and video) placeholder tokens, under the names its config gives them."""
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return {int(t) for t in (getattr(config, n, None) for n in names) if isinstance(t, int)}


def text_model(model) -> torch.nn.Module:
    """The language model inside an AutoModelForImageTextToText (Idefics3 / SmolVLM: text_model; the others:
    language_model)."""
    return getattr(model.model, "text_model", None) or model.model.language_model


class HFVLM(CaptionerModel):
    tower_prefix = "\0"  # the frozen reference keeps its own tower: the prompt's prefill reads the image itself

    def __init__(self, model, processor, prompt: str, path: str, freeze: set[str],
                 gradient_checkpointing: bool = False, images_kwargs: dict | None = None):
        super().__init__()
        self.model, self.processor = model, processor
        self.text, ids = prompt_ids(processor, prompt, path)
        tok, turn = processor.tokenizer, answer_turn(processor, prompt)  # the template rendered once
        eos, vocab = eos_token(model, tok, turn, path), model.get_output_embeddings().out_features
        check_token_ids(path, vocab, {"EOS": eos}, image_tokens(model.config))
        self.tokenizer = HFTokenizer(tok, bos=ids[-1], eos=eos, vocab_size=vocab, lead=answer_lead(turn, self.text))
        self.preprocess = VLMPreprocess(processor, self.text, self.tokenizer.pad,
                                        checked_images_kwargs(processor, images_kwargs or {}))
        for key, value in self.preprocess.images_kwargs.items():  # recorded in exports' hf/ processor too
            setattr(processor.image_processor, key, value)
        self.mrope = hasattr(model.model, "get_rope_index")
        # PaliGemma: the prompt is a prefix that attends both ways, its last token (BOS) included, so the whole
        # prompt is prefilled at once (BOSState); its positions count from 1 (as its own forward and generate do)
        self.prefix_lm = model.config.model_type in PREFIX_LM
        self.first_position = PREFIX_LM.get(model.config.model_type, 0)
        self.width = model.config.get_text_config().hidden_size
        self.logit_softcap = logit_softcap(model.config, path)  # Gemma 2 text models (PaliGemma 2): 30.0
        self.frozen = freeze
        for part, modules in self.parts().items():
            for m in modules:
                m.requires_grad_(part not in freeze)
        if gradient_checkpointing:
            for layer in text_model(model).layers:
                layer.forward = types.MethodType(_checkpointed_forward, layer)

    @classmethod
    def build(cls, cfg, image_encoder: bool = True) -> "HFVLM":
        from transformers import AutoModelForImageTextToText

        c = cfg.captioner
        checked_config(c.hf_path, vlm_problem)
        processor = load_processor(c.hf_path)
        model = load_model(AutoModelForImageTextToText.from_pretrained, c.hf_path, c.attn_implementation)
        return cls(model, processor, c.prompt, c.hf_path, {p.strip() for p in c.freeze.split(",") if p.strip()},
                   c.gradient_checkpointing, dict(c.images_kwargs))

    def parts(self) -> dict[str, list[torch.nn.Module | torch.nn.Parameter]]:
        """captioner.freeze's parts: the image tower (towers), the connector to the text model (Idefics3's, LLaVA's,
        InternVL's and Gemma 3's projector; LLaVA-NeXT's and LLaVA-OneVision's too, with the feature they put after
        each row of tiles), the text model's token embeddings."""
        inner = self.model.model
        return {"vision": towers(self.model),
                "projection": [getattr(inner, n) for n in ("connector", "multi_modal_projector", "image_newline")
                               if getattr(inner, n, None) is not None],
                "embeddings": [self.model.get_input_embeddings()]}

    def frozen_towers(self) -> list[torch.nn.Module]:
        return self.parts()["vision"] if "vision" in self.frozen else []

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @property
    def head_bias(self) -> torch.Tensor | None:
        return self.model.get_output_embeddings().bias

    def banned_tokens(self, bos: int, eos: int, pad: int) -> list[int]:
        """BOS here is the prompt's last token (":", "\\n"), which a caption may contain: only PAD is never proposed."""
        return [] if pad == eos else [pad]

    def visual_tokens(self, pixels: VLMImages) -> VLMImages:
        """The images stay the processor's tensors: the prompt's prefill reads them (see image_context)."""
        return pixels

    def image_context(self, images: VLMImages) -> Prompt:
        """The prompt of each image but its last token, prefilled once: the image and text tokens' key/value states.
        Gradients flow through it when the model trains (the policy's log-probs depend on the prompt's states)."""
        ids, mask = images["input_ids"], images["attention_mask"]
        if not bool((ids[:, -1] == self.tokenizer.bos).all()):
            raise ValueError("every prompt row must end with the same token (the answer's start)")
        if self.mrope:
            extra = {k: images[k] for k in ("image_grid_thw", "mm_token_type_ids") if k in images.tensors}
            pos, _ = self.model.model.get_rope_index(ids, attention_mask=mask, **extra)  # [3, B, L]
            bos_pos = pos[0, :, -1]
        else:
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0) + self.first_position
            bos_pos = pos[:, -1]
        cache, n = replayable_cache(), ids.size(1) - (0 if self.prefix_lm else 1)  # the tokens prefilled
        rest = {k: v if k not in TEXT_KEYS else v[:, :n] for k, v in images.tensors.items()
                if k not in ("input_ids", "attention_mask")}
        out = self.model.model(input_ids=ids[:, :n], attention_mask=mask[:, :n], position_ids=pos[..., :n],
                               cache=cache, use_cache=True, **rest)
        kv, bos = [(layer.keys, layer.values) for layer in cache.layers], None
        if self.prefix_lm:  # BOS's states apart: the continuation appends them to the prompt's (decoder_hidden)
            bos = BOSState([(k[..., -1:, :], v[..., -1:, :]) for k, v in kv], out.last_hidden_state[:, -1])
            kv = [(k[..., :-1, :], v[..., :-1, :]) for k, v in kv]
        return Prompt(kv, mask[:, :-1], ids[:, :-1].masked_fill(mask[:, :-1] == 0, -1), bos_pos, self.mrope, bos)

    def context_tokens(self, context: Prompt) -> torch.Tensor:
        """The prompt before BOS, image tokens and chat template included: generate's input_ids hold it, and its
        repetition penalty and n-gram ban count it."""
        return context.tokens

    def expand(self, context: Prompt, k: int) -> Prompt:
        return context.repeat(k) if k > 1 else context

    def new_cache(self):
        return DynamicCache()

    def decoder_hidden(self, tokens: torch.Tensor, context: Prompt, cache=None) -> torch.Tensor:
        """States of tokens [N, t] after the prompt (with a cache: the new tokens after those it holds). A fresh cache
        is filled with the prompt's states first; teacher forcing (no cache) reads them as its layers' prefixes."""
        lead = None
        if cache is None:
            kv, done = context.kv, 0
            if context.bos is not None:  # teacher forcing from BOS: its states join the prompt's
                kv = [(torch.cat([k, bk], -2), torch.cat([v, bv], -2)) for (k, v), (bk, bv) in zip(kv, context.bos.kv)]
                lead, tokens, done = context.bos.hidden[:, None], tokens[:, 1:], 1
            cache = replayable_cache(kv)
        else:
            if cache.get_seq_length() == 0:
                for i, (keys, values) in enumerate(context.kv):
                    cache.update(keys, values, i)
            done = cache.get_seq_length() - context.length  # continuation tokens already in the cache
            if done == 0 and context.bos is not None:  # BOS, prefilled with the prompt: its states from there
                for i, (keys, values) in enumerate(context.bos.kv):
                    cache.update(keys, values, i)
                lead, tokens, done = context.bos.hidden[:, None], tokens[:, 1:], 1
        if tokens.size(1) == 0:
            return lead
        N, t = tokens.shape
        pos = context.bos_pos[:, None] + done + torch.arange(t, device=tokens.device)
        if context.mrope:
            pos = pos[None].expand(3, N, t)
        mask = torch.cat([context.mask, context.mask.new_ones(N, done + t)], dim=1)
        out = self.model.model(input_ids=tokens, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        return out.last_hidden_state if lead is None else torch.cat([lead, out.last_hidden_state], dim=1)

    def save_pretrained(self, folder: str | Path, state: dict[str, torch.Tensor], generation=None,
                        run: dict | None = None) -> None:
        """A transformers folder of `state` (our state dict) with the processor, written beside and moved in
        (models/export_folder.py); `generation`: the run's GenerationConfig, generate's default there; `run`: the
        export's fields, whose config, stage, step and MLflow run the folder's mark keeps (export_run)."""
        own = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, state_dict=own)
            if generation is not None:  # the run's search as the folder's default (models/generation.py)
                exported_search(self.model.generation_config, self, generation).save_pretrained(tmp)
            self.processor.save_pretrained(tmp)

        write_folder(folder, write, "a transformers save_pretrained folder", run)
