"""Torch-free checks of a captioner row's folder (`captioner.hf_path`), run by config validation so that bad input
stops with one line before any model is built or process group started: not a transformers checkpoint, an
architecture the row does not support, no EOS token, captioner.* keys or lengths that contradict the folder's config.

Each check returns a problem as text (None when fine); checks.py turns it into a ConfigError naming the key.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, first_line

HF_ARCHITECTURES = ("VisionEncoderDecoderModel", "BlipForConditionalGeneration")
# hf_vlm: decoder-only vision-language models (AutoModelForImageTextToText) whose prefill and positions we drive
# (SmolVLM: Idefics3ForConditionalGeneration, SmolVLM2: SmolVLM...; each has a tiny family in models/tiny_vlm.py that
# the tests run)
VLM_ARCHITECTURES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration",
                     "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                     "Qwen3VLForConditionalGeneration", "LlavaForConditionalGeneration",
                     "LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
                     "InternVLForConditionalGeneration",
                     "Gemma3ForConditionalGeneration", "PaliGemmaForConditionalGeneration")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# a tokenizer's own files (fast, its config, or a slow tokenizer's vocabulary): a folder with none has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model")
HF_DECODERS = ("gpt2", "bert")  # VisionEncoderDecoderModel decoder model types whose head we can split off
# captioner.freeze: the vision tower, its projection to the decoder width, the decoder's token and position
# embeddings (with a tied head, the head too)
FREEZE_PARTS = ("vision", "projection", "embeddings")


def from_folder(load, path: str, attn_implementation: str = "", what: str = "its weights do not load",
                files: tuple[str, ...] = ()):
    """load(path) (a model's, tokenizer's or image processor's from_pretrained, a weights file's reader), its failure
    on a bad folder (missing, truncated or corrupt files, shapes that contradict config.json) a ConfigError naming
    captioner.hf_path and `what` in one line; `files`: those the load reads, named when none is there (transformers'
    own first line does not say so). attn_implementation: transformers' attention (captioner.attn_implementation),
    checked first (check_attention) so that its fault is named as such."""
    if attn_implementation:
        check_attention(path, attn_implementation)
    if files and Path(path).is_dir() and not any((Path(path) / f).is_file() for f in files):
        # before the load: AutoTokenizer builds a tokenizer of the special tokens alone from config.json (BLIP's)
        none = f"no {' or '.join(files)}" if len(files) <= 2 else f"none of {', '.join(files)}"
        raise ConfigError(f"captioner.hf_path '{path}': {what} ({none} in it)")
    try:
        return load(path, **({"attn_implementation": attn_implementation} if attn_implementation else {}))
    except Exception as e:  # transformers and safetensors raise many types for one cause: the folder's files
        raise ConfigError(f"captioner.hf_path '{path}': {what} ({first_line(e)})") from None


def load_model(from_pretrained, path: str, attn_implementation: str = ""):
    """from_folder of a transformers model whose files hold every weight it has: transformers draws a weight they
    lack at random, saying so only in a table of its log, and training would go on from it."""
    model, info = from_folder(lambda p, **kw: from_pretrained(p, output_loading_info=True, **kw), path,
                              attn_implementation)
    if missing := sorted(info.get("missing_keys") or ()):
        raise ConfigError(f"captioner.hf_path '{path}': its weights lack {len(missing)} of the model's (transformers "
                          f"would draw them at random): {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    return model


def check_token_ids(path: str, vocab: int, ids: dict[str, int], image_tokens: set[int] = frozenset()) -> None:
    """The special tokens a row reads from the folder's configs (EOS, the decoder start) lie in the output head's
    vocabulary, and none is an image placeholder: an id beyond it fails the first step's embedding lookup (caption
    would write max_len tokens), and an EOS that is the image token ends no caption."""
    for name, token in ids.items():
        if not 0 <= token < vocab:
            raise ConfigError(f"captioner.hf_path '{path}': its {name} token id {token} is outside the model's "
                              f"vocabulary ({vocab} tokens): check its config.json and generation_config.json")
        if token in image_tokens:
            raise ConfigError(f"captioner.hf_path '{path}': its {name} token id {token} is the image placeholder "
                              "token: check its config.json and generation_config.json")


def check_attention(path: str, name: str) -> None:
    """captioner.attn_implementation against the folder's model on this machine: the model built without weights (on
    the meta device, in milliseconds at any size) with that attention, as from_pretrained would; an unknown name, one
    the architecture lacks (BLIP has eager only) or whose package is missing (flash-attn) is one ConfigError."""
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
        with torch.device("meta"):  # _from_config: what from_pretrained and the Auto classes' from_config call
            getattr(transformers, config.architectures[0])._from_config(config, attn_implementation=name)
    except Exception as e:  # ValueError (unknown, unsupported), ImportError (not installed), the kernels hub's own
        raise ConfigError(f"captioner.attn_implementation={name}: {first_line(e)}") from None


def read_config(path: str) -> dict | str:
    f = Path(path) / "config.json"
    if not Path(path).is_dir() or not f.is_file():
        return f"'{path}' is not a transformers checkpoint folder (no config.json)"
    try:
        config = json.loads(f.read_text())
    except ValueError as e:
        return f"'{path}': config.json is not JSON ({e})"
    if not isinstance(config, dict):
        return f"'{path}': config.json is not a JSON object"
    for part in ("encoder", "decoder", "text_config", "vision_config"):  # each row's readers take them as objects
        if part in config and not isinstance(config[part], dict):
            return f"'{path}': config.json's {part} is {json.dumps(config[part])[:40]}, not a JSON object"
    return config


def is_dico_ref(config: dict) -> bool:
    enc = config.get("encoder")  # a hostile config.json may hold any JSON there
    return isinstance(enc, dict) and enc.get("model_type") == "vision-encoder-encoder"


def folder_row(config: dict) -> str | None:
    """The captioner row (models.MODELS) that reads a transformers folder of this config.json; None: no row does."""
    arch = (config.get("architectures") or [None])[0]
    if arch in VLM_ARCHITECTURES:
        return "hf_vlm"
    if is_dico_ref(config):
        return "dico_ref"
    return "hf_encoder_decoder" if arch in HF_ARCHITECTURES else None


def row_reading(path: str) -> str:
    """The captioner row that reads the folder at `path` (folder_row); ConfigError (to be prefixed with what named
    the folder) when it is no transformers folder or of an architecture no row reads."""
    config = read_config(path)
    if isinstance(config, str):
        raise ConfigError(config)
    if (row := folder_row(config)) is None:
        arch = (config.get("architectures") or [None])[0]
        raise ConfigError(f"'{path}': architecture {arch} is not a captioner dico_scale reads "
                          f"({', '.join(VLM_ARCHITECTURES + HF_ARCHITECTURES)})")
    return row


def hf_problem(config: dict, path: str) -> str | None:
    """hf_encoder_decoder: a VisionEncoderDecoderModel with a GPT-2 / BERT decoder, or BLIP."""
    if is_dico_ref(config):
        return f"'{path}' is a DiCO reference folder: use captioner.model=dico_ref"
    arch = (config.get("architectures") or [None])[0]
    if arch not in HF_ARCHITECTURES:
        return f"'{path}': architecture {arch} is not supported by hf_encoder_decoder ({', '.join(HF_ARCHITECTURES)})"
    if arch == "VisionEncoderDecoderModel" and (dec := config.get("decoder", {}).get("model_type")) not in HF_DECODERS:
        return f"'{path}': decoder {dec} is not supported ({', '.join(HF_DECODERS)})"
    if eos_id(config, path) is None:
        return f"'{path}': neither the model config nor the tokenizer names an EOS token"
    return None


def vlm_problem(config: dict, path: str) -> str | None:
    """hf_vlm: a supported vision-language architecture, with a processor beside the weights."""
    arch = (config.get("architectures") or [None])[0]
    if arch not in VLM_ARCHITECTURES:
        return f"'{path}': architecture {arch} is not supported by hf_vlm ({', '.join(VLM_ARCHITECTURES)})"
    if not any((Path(path) / f).is_file() for f in PROCESSOR_FILES):
        return f"'{path}' has no processor ({' or '.join(PROCESSOR_FILES)}): save the model's processor beside it"
    return None


def logit_softcap(config, path: str) -> float | None:
    """The text model's final_logit_softcapping from a transformers config, defaults resolved (config.json leaves a
    default out: PaliGemma 2's Gemma 2 text model softcaps at 30.0 without saying so); None: plain logits."""
    from ..kernels.torch_path import check_softcap  # the heads' own check

    cap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    try:
        check_softcap(cap)
    except ValueError as e:  # "softcap must be ...": the check's own words
        raise ConfigError(f"captioner.hf_path '{path}': final_logit_softcapping={cap!r} in its text config: "
                          f"{str(e).removeprefix('softcap ')}") from None
    return None if cap is None else float(cap)


def checked_config(path: str, problem) -> dict:
    """The folder's config.json, checked by a row's `problem` (hf_problem, ref_problem, vlm_problem): a ConfigError
    naming captioner.hf_path otherwise."""
    config = read_config(path)
    if found := config if isinstance(config, str) else problem(config, path):
        raise ConfigError(f"captioner.hf_path {found}")
    return config


def ref_problem(config: dict, path: str) -> str | None:
    """dico_ref: the reference fork's vision-encoder-decoder of a clip_vision_model + BERT encoder and GPT-2, each a
    JSON object whose sizes are positive integers and whose heads divide the width (transformers fails deep in its
    constructors otherwise: a TypeError, a negative dimension)."""
    vision = config["encoder"].get("vision_encoder") if is_dico_ref(config) else None
    if not isinstance(vision, dict) or vision.get("model_type") != "clip_vision_model":
        return (f"'{path}' is not a DiCO reference folder (want a vision-encoder-decoder whose encoder is a "
                "vision-encoder-encoder of a clip_vision_model)")
    bert, dec = config["encoder"].get("encoder"), config.get("decoder")
    for name, part in (("encoder.encoder", bert), ("decoder", dec)):
        if not isinstance(part, dict):
            return f"'{path}': config.json's {name} is {json.dumps(part)}, not a JSON object"
    if (kind := dec.get("model_type")) != "gpt2":
        return f"'{path}': the reference's decoder is gpt2, not {kind}"
    # (part, its sizes, its width and heads) as transformers' configs name them; a size left out takes its default
    parts = (("encoder.vision_encoder", vision, ("intermediate_size", "num_hidden_layers", "image_size", "patch_size",
                                                 "num_channels"), "hidden_size", "num_attention_heads"),
             ("encoder.encoder", bert, ("intermediate_size", "num_hidden_layers", "max_position_embeddings",
                                        "vocab_size", "type_vocab_size"), "hidden_size", "num_attention_heads"),
             ("decoder", dec, ("n_layer", "n_positions", "vocab_size", "n_inner"), "n_embd", "n_head"))
    for name, part, sizes, width, heads in parts:
        for key in (width, heads) + sizes:
            if (v := part.get(key)) is not None and (type(v) is not int or v <= 0):
                return f"'{path}': config.json's {name}.{key} is {json.dumps(v)}, not a positive integer"
        if part.get(width) and part.get(heads) and part[width] % part[heads]:
            return (f"'{path}': config.json's {name}.{width} {part[width]} is not a multiple of its {heads} "
                    f"{part[heads]}")
    return None


def text_config(config: dict) -> dict:
    return config.get("text_config") or config.get("decoder") or {}


def eos_id(config: dict, path: str) -> int | None:
    """The model's end token: BLIP's [SEP], else the config's eos_token_id, else the tokenizer's EOS, if any."""
    if "text_config" in config:
        return config["text_config"].get("sep_token_id")
    for c in (config, config.get("decoder", {})):
        if c.get("eos_token_id") is not None:
            return c["eos_token_id"]
    tok = Path(path) / "tokenizer_config.json"
    if tok.is_file() and json.loads(tok.read_text()).get("eos_token"):
        return -1  # named by the tokenizer: its id is read when it is loaded
    return None


def positions(config: dict) -> int | None:
    t = text_config(config)
    return t.get("n_positions", t.get("max_position_embeddings"))


def folder_problem(model: str, path: str, freeze: str, tokens_needed: int) -> tuple[str, str] | None:
    """(key, problem) of a row's folder and keys, or None."""
    if bad := sorted({p.strip() for p in freeze.split(",") if p.strip()} - set(FREEZE_PARTS)):
        return "captioner.freeze", f"unknown part(s) {', '.join(bad)} (parts: {', '.join(FREEZE_PARTS)})"
    config = read_config(path)
    if isinstance(config, str):
        return "captioner.hf_path", config
    check = {"dico_ref": ref_problem, "hf_vlm": vlm_problem}.get(model, hf_problem)
    if problem := check(config, path):
        return "captioner.hf_path", problem
    if (n := positions(config)) is not None and n < tokens_needed:
        return "generation.max_len", (f"captions of {tokens_needed} tokens (data.max_caption_tokens, generation.max_len"
                                      f" + 1) exceed the decoder's {n} positions in '{path}'")
    return None


# generate's beam-search options that GenerationConfig holds under transformers' own names: beam_search's keywords
# (generation.search_options), an export's generation_config.json, evaluate's settings, caption's flags
SEARCH_OPTIONS = ("length_penalty", "early_stopping", "repetition_penalty", "no_repeat_ngram_size")
# generate's options in a folder's generation_config.json that shape a search: those our search has as generation.*
# keys, and those it never applies (with the value that means off)
SEARCH_KEYS = {"num_beams": "candidates", "max_new_tokens": "max_len", **{k: k for k in SEARCH_OPTIONS}}
NOT_APPLIED = {"do_sample": False, "min_length": 0, "min_new_tokens": None, "num_beam_groups": 1,
               "diversity_penalty": 0.0, "encoder_no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
               "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
               "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None}


def _same(theirs, ours) -> bool:
    if isinstance(theirs, (int, float)) and not isinstance(theirs, bool):
        return float(theirs) == float(ours)
    return str(theirs).lower() == str(ours).lower()


def generation_note(path: str, g) -> str | None:
    """A one-line note naming what the folder's generation_config.json asks of generate that our search does not
    do (it searches as `g`, the run's generation.*: candidates, validation and captions), or None. A foreign folder's
    num_beams=3 or no_repeat_ngram_size=3 would otherwise be silently ignored."""
    try:
        theirs = json.loads((Path(path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(theirs, dict):
        return None
    items = [f"{k}={theirs[k]} (ours: generation.{ours}={getattr(g, ours)})" for k, ours in SEARCH_KEYS.items()
             if theirs.get(k) is not None and not _same(theirs[k], getattr(g, ours))]
    items += [f"{k}={theirs[k]} (not applied)" for k, off in NOT_APPLIED.items()
              if theirs.get(k) not in (None, off, [])]
    if not items:
        return None
    return (f"note: {Path(path) / 'generation_config.json'} sets {', '.join(items)}: the candidates, validation and "
            "captions search as generation.* says (the export's hf/ folder records it)")
