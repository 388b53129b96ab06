"""Decoder-only vision-language captioners (MODELS row `hf_vlm`): an `AutoModelForImageTextToText` (Idefics3 /
SmolVLM, Qwen2-VL / Qwen2.5-VL, LLaVA) read from a local folder (`captioner.hf_path`) with its processor and chat
template, asked `captioner.prompt` about each image.

The prompt (chat template, image tokens and all) is one row per image, left-padded in a batch. Its last token, the
one after which the answer starts ("Assistant:", "<|im_start|>assistant\\n"), plays the built-in captioner's BOS: the
prompt before it is prefilled once per image (`image_context`, a `Prompt` of key/value states) and that cache is
expanded to the k candidates, and everything after it ([BOS, w1, ..., EOS]) is the caption the stages generate and
score. So log-probs and losses cover the continuation only, EOS included, the prompt and the image never; XE is
supervised fine-tuning with the prompt masked out. Positions are given explicitly (left padding must not shift them;
Qwen2-VL's multimodal rotary positions come from the model's own `get_rope_index`), so an image's candidates and
log-probs in a mixed batch equal those of the image alone.

`captioner.gradient_checkpointing` recomputes each text decoder layer in backward (torch's non-reentrant checkpoint
around the layer's forward). The layers write the key/value cache, so the passes that train (the prompt's prefill and
the teacher-forced continuation) run on `ReplayableLayer` caches, whose update is a function of its inputs: a layer
replayed in backward gets the tensors it got the first time (transformers' own checkpointing switches the cache off).
"""
from __future__ import annotations

import os
import shutil
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..errors import ConfigError
from .captioner import CaptionerModel
from .folders import checked_config, from_folder, vlm_problem
from .hf_encoder_decoder import HFTokenizer

# One row per image, left-padded in a batch. The token types mark image tokens: Qwen-VL's rotary positions read them,
# Gemma 3's prefill lets image tokens attend to each other both ways.
TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class VLMImages:
    """A batch of images as the processor gives them, with the prompt: tensors by name. Text rows are left-padded
    (pad id / 0), image tensors zero-padded to the largest (Idefics3 drops all-zero tiles, masks padded pixels) and
    concatenated (Qwen2-VL's patches of all images in one list, their grids beside)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def size(self, dim: int = 0) -> int:
        assert dim == 0, "VLMImages has a batch size only"
        return self.tensors["input_ids"].size(0)

    def to(self, device, dtype: torch.dtype | None = None) -> "VLMImages":
        return VLMImages({k: v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
                          for k, v in self.tensors.items()})

    @staticmethod
    def collate(items: list[dict[str, torch.Tensor]], pad_id: int) -> "VLMImages":
        out = {}
        for key in items[0]:
            parts = [item[key] for item in items]
            if key in TEXT_KEYS:
                n = max(p.size(-1) for p in parts)
                fill = pad_id if key == "input_ids" else 0
                out[key] = torch.cat([F.pad(p, (n - p.size(-1), 0), value=fill) for p in parts])
            else:
                shape = [max(p.size(d) for p in parts) for d in range(1, parts[0].dim())]
                out[key] = torch.cat([F.pad(p, [x for d in reversed(range(1, p.dim()))
                                                for x in (0, shape[d - 1] - p.size(d))]) for p in parts])
        return VLMImages(out)


class VLMPreprocess:
    """A PIL image -> the processor's tensors for the prompt about it (one row); `collate` batches them.
    images_kwargs: the image call's options (captioner.images_kwargs), passed on every call: a processor's own
    defaults (Gemma 3's do_pan_and_scan=False) override what its image processor was saved with."""

    def __init__(self, processor, text: str, pad_id: int, images_kwargs: dict | None = None):
        self.processor, self.text, self.pad_id = processor, text, pad_id
        self.images_kwargs = dict(images_kwargs or {})
        # A chat template that writes the BOS itself (Gemma 3's) must not get a second one from the tokenizer.
        bos = processor.tokenizer.bos_token
        self.special_tokens = not (bos and text.startswith(bos))

    def __call__(self, image) -> dict[str, torch.Tensor]:
        out = self.processor(images=[image.convert("RGB")], text=[self.text], return_tensors="pt",
                             add_special_tokens=self.special_tokens, images_kwargs=dict(self.images_kwargs))
        return {k: v for k, v in out.items() if torch.is_tensor(v)}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> VLMImages:
        return VLMImages.collate(items, self.pad_id)

    def __repr__(self):
        return f"VLMPreprocess({type(self.processor).__name__}, {self.text!r})"


@dataclass
class Prompt:
    """The prefilled prompt of each row (image context): per layer (keys, values) [N, heads, P, d], its padding mask
    [N, P], and the position of the row's BOS (the prompt's last token) [N]."""
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    bos_pos: torch.Tensor
    mrope: bool

    def size(self, dim: int = 0) -> int:
        return self.mask.size(0)

    @property
    def device(self) -> torch.device:
        return self.mask.device

    @property
    def length(self) -> int:
        return self.mask.size(1)

    def repeat(self, k: int) -> "Prompt":
        return Prompt([(a.repeat_interleave(k, 0), b.repeat_interleave(k, 0)) for a, b in self.kv],
                      self.mask.repeat_interleave(k, 0), self.bos_pos.repeat_interleave(k, 0), self.mrope)


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


def text_model(model) -> torch.nn.Module:
    """The language model inside an AutoModelForImageTextToText (Idefics3 / SmolVLM: text_model; the others:
    language_model)."""
    return getattr(model.model, "text_model", None) or model.model.language_model


def user_turn(prompt: str) -> dict:
    """The chat message that asks about one image: the image, then `prompt`."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}


def prompt_text(processor, prompt: str, path: str) -> str:
    """The text of one image's prompt: the chat template of a user turn (the image, then `prompt`) and the start of
    the assistant's; without a chat template, `prompt` itself, which must then hold the processor's image token."""
    image_token = getattr(processor, "image_token", None) or "<image>"
    if getattr(processor, "chat_template", None):
        if image_token in prompt:
            raise ConfigError(f"captioner.prompt: holds the image token {image_token}; '{path}' has a chat template "
                              "that places the image itself")
        from jinja2 import TemplateError

        try:
            return processor.apply_chat_template([user_turn(prompt)], add_generation_prompt=True)
        except TemplateError as e:
            raise ConfigError(f"captioner.hf_path '{path}': its chat template does not render a user turn of an "
                              f"image and captioner.prompt ({type(e).__name__}: {e})") from None
    if image_token not in prompt:
        raise ConfigError(f"captioner.prompt: '{path}' has no chat template, so the prompt must hold the image "
                          f"placeholder {image_token} where the image goes")
    return prompt


ANSWER = "CAPTIONHERE"


def answer_turn(processor, prompt: str) -> tuple[str, str] | None:
    """The chat template's rendering of one exchange (the image and `prompt`, then an answer), split around the answer:
    (before, after); None without a chat template."""
    if not getattr(processor, "chat_template", None):
        return None
    full = processor.apply_chat_template([user_turn(prompt),
                                          {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}])
    before, found, after = full.partition(ANSWER)
    return (before, after) if found else None


def answer_lead(processor, prompt: str, text: str) -> str:
    """What the chat template writes between the start of the assistant's turn (the end of `text`) and its answer: a
    space for Idefics3 / SmolVLM ("Assistant: A cat") and LLaVA, nothing for Qwen2-VL. Captions are tokenized with it
    (XE's targets are the answers the model's own template renders); nothing without a chat template."""
    turn = answer_turn(processor, prompt)
    return turn[0][len(text):] if turn and turn[0].startswith(text) else ""


def answer_end(processor, prompt: str) -> list[int]:
    """The tokens the chat template writes right after an answer (Qwen2-VL: <|im_end|>, "\n"); none without one."""
    turn = answer_turn(processor, prompt)
    return processor.tokenizer(turn[1], add_special_tokens=False)["input_ids"] if turn else []


def load_processor(path: str):
    """The folder's processor (AutoProcessor): a tokenizer and an image processor, or a ConfigError naming the key."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # AttributeError: a token it names is missing
        raise ConfigError(f"captioner.hf_path '{path}': no processor that AutoProcessor reads "
                          f"({(str(e).splitlines() or [''])[0][:200]})") from None
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ConfigError(f"captioner.hf_path '{path}': its processor ({type(processor).__name__}) lacks a tokenizer "
                          "or an image processor")
    return processor


def prompt_ids(processor, prompt: str, path: str) -> tuple[str, list[int]]:
    """(text, token ids) of one image's prompt (prompt_text), checked: the tokenizer knows the image token."""
    text = prompt_text(processor, prompt, path)
    tok = processor.tokenizer
    image_token = getattr(processor, "image_token", None) or "<image>"
    known, ids = tok.convert_tokens_to_ids(image_token), tok(text, add_special_tokens=False)["input_ids"]
    if known is None or known == tok.unk_token_id or not ids:
        raise ConfigError(f"captioner.hf_path '{path}': its tokenizer does not know the image token {image_token} "
                          "(tokenizer files missing or of another model?)")
    return text, ids


def checked_images_kwargs(processor, images_kwargs: dict) -> dict:
    """captioner.images_kwargs, each key one the folder's image processor takes (its valid_kwargs), else a
    ConfigError naming the key and those it takes."""
    valid = set(getattr(getattr(processor.image_processor, "valid_kwargs", None), "__annotations__", {}))
    valid -= {"return_tensors", "device", "data_format", "input_data_format"}  # ours to set
    if bad := sorted(set(images_kwargs) - valid):
        raise ConfigError(f"captioner.images_kwargs: {', '.join(bad)} not among the options of "
                          f"{type(processor.image_processor).__name__} ({', '.join(sorted(valid))})")
    return dict(images_kwargs)


def check_folder(path: str, prompt: str, images_kwargs: dict | None = None) -> None:
    """Preflight of the hf_vlm row: the folder's config, processor and the prompt built from captioner.prompt; the
    image options on one small picture (a bad value fails here, not in a data worker)."""
    from PIL import Image

    checked_config(path, vlm_problem)
    processor = load_processor(path)
    text, _ = prompt_ids(processor, prompt, path)
    preprocess = VLMPreprocess(processor, text, 0, checked_images_kwargs(processor, images_kwargs or {}))
    try:
        preprocess(Image.new("RGB", (64, 48)))
    except Exception as e:  # the processor's own check of a value, whatever its type
        raise ConfigError(f"captioner.images_kwargs {preprocess.images_kwargs}: the processor of '{path}' refuses "
                          f"them ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from None


class HFVLM(CaptionerModel):
    tower_prefix = "\0"  # the frozen reference keeps its own tower: the prompt's prefill reads the image itself

    def __init__(self, model, processor, prompt: str, path: str, freeze: set[str],
                 gradient_checkpointing: bool = False, images_kwargs: dict | None = None):
        super().__init__()
        self.model, self.processor = model, processor
        self.text, ids = prompt_ids(processor, prompt, path)
        tok = processor.tokenizer
        eos = eos_token(model, processor, prompt, path)
        self.tokenizer = HFTokenizer(tok, bos=ids[-1], eos=eos, vocab_size=model.get_output_embeddings().out_features,
                                     lead=answer_lead(processor, prompt, self.text))
        self.preprocess = VLMPreprocess(processor, self.text, self.tokenizer.pad,
                                        checked_images_kwargs(processor, images_kwargs or {}))
        for key, value in self.preprocess.images_kwargs.items():  # recorded in exports' hf/ processor too
            setattr(processor.image_processor, key, value)
        self.mrope = hasattr(model.model, "get_rope_index")
        self.width = model.config.get_text_config().hidden_size
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
        model = from_folder(AutoModelForImageTextToText.from_pretrained, c.hf_path)
        return cls(model, processor, c.prompt, c.hf_path, {p.strip() for p in c.freeze.split(",") if p.strip()},
                   c.gradient_checkpointing, dict(c.images_kwargs))

    def parts(self) -> dict[str, list[torch.nn.Module]]:
        """captioner.freeze's parts: the image tower (Qwen2-VL's holds its patch merger), the connector to the text
        model (Idefics3's, LLaVA's projector), the text model's token embeddings."""
        inner = self.model.model

        def present(*names):
            return [getattr(inner, n) for n in names if getattr(inner, n, None) is not None]
        return {"vision": present("vision_model", "visual", "vision_tower"),
                "projection": present("connector", "multi_modal_projector"),
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
            prefill, bos_pos = pos[..., :-1], pos[0, :, -1]
        else:
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
            prefill, bos_pos = pos[:, :-1], pos[:, -1]
        cache = replayable_cache()
        rest = {k: v if k not in TEXT_KEYS else v[:, :-1] for k, v in images.tensors.items()
                if k not in ("input_ids", "attention_mask")}
        self.model.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=prefill, cache=cache,
                         use_cache=True, **rest)
        return Prompt([(layer.keys, layer.values) for layer in cache.layers], mask[:, :-1], bos_pos, self.mrope)

    def expand(self, context: Prompt, k: int) -> Prompt:
        return context.repeat(k) if k > 1 else context

    def new_cache(self):
        return DynamicCache()

    def decoder_hidden(self, tokens: torch.Tensor, context: Prompt, cache=None) -> torch.Tensor:
        """States of tokens [N, t] after the prompt (with a cache: the new tokens after those it holds). A fresh cache
        is filled with the prompt's states first; teacher forcing (no cache) reads them as its layers' prefixes."""
        if cache is None:
            cache = replayable_cache(context.kv)
        elif cache.get_seq_length() == 0:
            for i, (keys, values) in enumerate(context.kv):
                cache.update(keys, values, i)
        done = cache.get_seq_length() - context.length  # continuation tokens already in the cache
        N, t = tokens.shape
        pos = context.bos_pos[:, None] + done + torch.arange(t, device=tokens.device)
        if context.mrope:
            pos = pos[None].expand(3, N, t)
        mask = torch.cat([context.mask, context.mask.new_ones(N, done + t)], dim=1)
        out = self.model.model(input_ids=tokens, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        return out.last_hidden_state

    def save_pretrained(self, folder: str | Path, state: dict[str, torch.Tensor]) -> None:
        """A transformers folder of `state` (our state dict) with the processor, written beside and moved in."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        own = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        self.model.save_pretrained(tmp, state_dict=own)
        self.processor.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)


def eos_token(model, processor, prompt: str, path: str) -> int:
    """The token that ends the assistant's turn. Of the end tokens the generation config lists (else the text
    config's, else the tokenizer's), the one the chat template writes after an answer (Gemma 3 lists <eos> before
    <end_of_turn>, and its turns end with the latter); without a template, or where it writes none of them, the
    first."""
    tok = processor.tokenizer
    for source in (model.generation_config.eos_token_id, model.config.get_text_config().eos_token_id,
                   tok.eos_token_id):
        ends = [int(t) for t in (source if isinstance(source, (list, tuple)) else [source]) if t is not None]
        if ends:
            after = answer_end(processor, prompt)
            return next((t for t in after[:1] if t in ends), ends[0])
    raise ConfigError(f"captioner.hf_path '{path}': neither the generation config, the model config nor the "
                      "tokenizer names an EOS token")
