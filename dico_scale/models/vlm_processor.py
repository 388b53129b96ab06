"""The processor side of the vision-language row (hf_vlm): a folder's processor, the prompt its chat template makes of
captioner.prompt, the answer's lead and end tokens, the image options (captioner.images_kwargs), and each image's
tensors batched (left-padded text, zero-padded images). models/hf_vlm.py drives the model with them.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from ..errors import ConfigError, first_line
from .folders import checked_config, from_folder, logit_softcap, vlm_problem

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
        return {k: v for k, v in out.items() if torch.is_tensor(v) and k != "labels"}  # PaliGemma's: not ours

    def collate(self, items: list[dict[str, torch.Tensor]]) -> VLMImages:
        return VLMImages.collate(items, self.pad_id)

    def __repr__(self):
        return f"VLMPreprocess({type(self.processor).__name__}, {self.text!r})"


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


def answer_lead(turn: tuple[str, str] | None, text: str) -> str:
    """What the chat template writes (answer_turn) between the start of the assistant's turn (the end of `text`) and
    its answer: a space for Idefics3 / SmolVLM ("Assistant: A cat") and LLaVA, nothing for Qwen2-VL. Captions are
    tokenized with it (XE's targets are the answers the model's own template renders); nothing without a template."""
    return turn[0][len(text):] if turn and turn[0].startswith(text) else ""


def load_processor(path: str):
    """The folder's processor (AutoProcessor): a tokenizer and an image processor, or a ConfigError naming the key."""
    from transformers import AutoProcessor

    processor = from_folder(AutoProcessor.from_pretrained, path, what="no processor that AutoProcessor reads")
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
    if not getattr(processor, "chat_template", None):  # the processor may complete it (PaliGemma's: "<bos>", "\n")
        from PIL import Image

        try:
            row = processor(images=[Image.new("RGB", (64, 48))], text=[text], add_special_tokens=False)
        except Exception as e:  # the processor's own refusal of the prompt, whatever its type
            raise ConfigError(f"captioner.prompt: the processor of '{path}' refuses {prompt!r} ({first_line(e)})") \
                from None
        ids = [int(t) for t in row["input_ids"][0]]
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


def _plain(value):
    """A config value as JSON would hold it (tuples and omegaconf lists as lists, anything else as its str), for
    comparing two sources."""
    return json.loads(json.dumps(value, default=lambda v: list(v) if hasattr(v, "__iter__") else str(v)))


def _idefics3_tokens(config: dict) -> int | None:
    """Image tokens a tile, as Idefics3 / SmolVLM compute them from config.json (their processors' docs)."""
    vision, scale = config.get("vision_config") or {}, config.get("scale_factor")
    if not (scale and vision.get("image_size") and vision.get("patch_size")):
        return None
    return int((vision["image_size"] // vision["patch_size"]) ** 2 / scale ** 2)


# Processor options the model's config.json spells another way: option -> (the model's spelling, its value or None)
DERIVED = {
    "image_seq_len": ("(vision_config.image_size // patch_size) ** 2 / scale_factor ** 2", _idefics3_tokens),
    "image_seq_length": ("mm_tokens_per_image", lambda c: c.get("mm_tokens_per_image")),  # Gemma 3
    "merge_size": ("vision_config.spatial_merge_size",  # Qwen-VL
                   lambda c: (c.get("vision_config") or {}).get("spatial_merge_size")),
}


def check_image_geometry(processor, config: dict, images_kwargs: dict, path: str) -> None:
    """The image options (the processor's and its image processor's own, captioner.images_kwargs over them) that the
    model's config.json holds too, under their name or another (DERIVED), must have its values: LLaVA-NeXT's
    image_grid_pinpoints, Qwen-VL's and LLaVA's patch sizes and Qwen-VL's merge size, the image tokens a tile of
    InternVL, Idefics3 and Gemma 3, LLaVA's vision_feature_select_strategy. Otherwise the processor writes image
    tokens or cuts tiles the model does not count the same way, and the first batch dies in the model."""
    own = {**processor.to_dict(), **processor.image_processor.to_dict()}
    options = {k: v for k, v in {**own, **images_kwargs}.items() if v is not None and not isinstance(v, dict)}
    vision = config.get("vision_config") or {}
    pairs = [(key, f"{where}{key}", held[key]) for key in sorted(options)
             for where, held in (("", config), ("vision_config.", vision)) if key in held]
    pairs += [(key, spelling, derive(config)) for key, (spelling, derive) in DERIVED.items() if key in options]
    for key, spelling, want in pairs:
        if want is None or _plain(options[key]) == _plain(want):
            continue
        source = (f"captioner.images_kwargs.{key}={_plain(options[key])}" if key in images_kwargs else
                  f"captioner.hf_path '{path}': its processor's {key} {_plain(options[key])}")
        raise ConfigError(f"{source} differs from the model's {spelling} {_plain(want)} in '{path}/config.json': "
                          "the model would not read the processor's tiles / patches")


def check_folder(path: str, prompt: str, images_kwargs: dict | None = None) -> None:
    """Preflight of the hf_vlm row: the folder's config, processor and the prompt built from captioner.prompt; the
    image options against the model's config and on one small picture (a bad value fails here, not in a data
    worker or the model)."""
    from PIL import Image

    from transformers import AutoConfig

    config = checked_config(path, vlm_problem)
    logit_softcap(AutoConfig.from_pretrained(path), path)
    processor = load_processor(path)
    text, _ = prompt_ids(processor, prompt, path)
    preprocess = VLMPreprocess(processor, text, 0, checked_images_kwargs(processor, images_kwargs or {}))
    check_image_geometry(processor, config, preprocess.images_kwargs, path)
    try:
        preprocess(Image.new("RGB", (64, 48)))
    except Exception as e:  # the processor's own check of a value, whatever its type
        raise ConfigError(f"captioner.images_kwargs {preprocess.images_kwargs}: the processor of '{path}' refuses "
                          f"them ({first_line(e)})") from None


def eos_token(model, tok, turn: tuple[str, str] | None, path: str) -> int:
    """The token that ends the assistant's turn. Of the end tokens the generation config lists (else the text
    config's, else the tokenizer's), the one the chat template writes right after an answer (answer_turn; Gemma 3
    lists <eos> before <end_of_turn>, and its turns end with the latter); without a template, or where it writes none
    of them, the first."""
    for source in (model.generation_config.eos_token_id, model.config.get_text_config().eos_token_id,
                   tok.eos_token_id):
        ends = [int(t) for t in (source if isinstance(source, (list, tuple)) else [source]) if t is not None]
        if ends:
            after = tok(turn[1], add_special_tokens=False)["input_ids"] if turn else []
            return next((t for t in after[:1] if t in ends), ends[0])
    raise ConfigError(f"captioner.hf_path '{path}': neither the generation config, the model config nor the "
                      "tokenizer names an EOS token")
