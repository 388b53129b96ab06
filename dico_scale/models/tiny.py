"""Tiny random captioners of each Hugging Face family, written as a user's folder would look (config.json, weights,
tokenizer, image processor), with nothing downloaded: the tokenizer is a byte-level BPE trained here with the
`tokenizers` library on the synthetic shapes captions.

    python -m dico_scale.models.tiny FAMILY OUT_DIR [--width 32 --layers 2 --heads 2 --image-size 32 --seed 0]
        [--vocab-size N]   (sizes bounded: MAX_SIZES; the family's own limits: family_problem)

Families: vit-gpt2 (VisionEncoderDecoderModel, GPT-2 style tokenizer: BOS = EOS = <|endoftext|>, no pad token),
blip (BlipForConditionalGeneration, BERT style specials: [PAD] [SEP] [DEC]), dico-ref (the DiCO reference code's
save_pretrained layout, written from transformers' CLIPVisionModel, BertModel and GPT2LMHeadModel; CLIP BPE
vocabulary, no tokenizer files: the row brings open_clip's), and the vision-language families of the hf_vlm row
(models/tiny_vlm.py: idefics3, smolvlm, qwen2-vl, qwen2.5-vl, qwen3-vl, internvl, llava, llava-next, llava-onevision,
gemma3; processor, chat template). Tests and `dico_scale.demo --captioner` use the same builder.
"""
from __future__ import annotations

import os
import sys

import torch

from ..errors import OneLineParser
from .tiny_vlm import VLM_FAMILIES, write_vlm

FAMILIES = ("vit-gpt2", "blip", "dico-ref", *VLM_FAMILIES)
SPECIALS = {"vit-gpt2": ["<|endoftext|>"], "blip": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]}
TOKENIZER_SIZE = 300  # the BPE of vit-gpt2 and blip: the smallest decoder vocabulary they take
# The CLI's bounds, above the largest model the repository writes (benchmarks/dico_step.py --hf-size 1024,4,16,224,
# the CLIP BPE's 49,409 tokens): past them the weights alone take gigabytes, and --width or --image-size (its position
# table) in the ten thousands exhaust the memory.
MAX_SIZES = {"--width": 1024, "--layers": 8, "--heads": 32, "--image-size": 512, "--vocab-size": 65536}
# Every family cuts images into 8-pixel patches (Qwen: 4-pixel ones merged 2 x 2); these merge or pool them 2 x 2,
# so the patch grid's side must be even.
IMAGE_STEP = {"idefics3": 16, "smolvlm": 16, "internvl": 16, "gemma3": 16}
# What the head width (--width / --heads) must divide into for the rotary embeddings: Qwen2-VL's and Qwen2.5-VL's
# sections (eighths and quarters), Qwen3-VL's vision tower (quarters), the other VLMs' text models (halves).
HEAD_STEP = {"qwen2-vl": 8, "qwen2.5-vl": 8, "qwen3-vl": 4, **{f: 2 for f in VLM_FAMILIES if not f.startswith("qwen")}}


def train_tokenizer(family: str, vocab_size: int = TOKENIZER_SIZE):
    """A PreTrainedTokenizerFast over a byte-level BPE of the synthetic captions, with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="[UNK]" if family == "blip" else None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    from ..data.synthetic import caption_corpus

    bpe.train_from_iterator(caption_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS[family], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if family == "vit-gpt2":
        return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]")


def vit_gpt2(tok, width: int, layers: int, heads: int, image_size: int, vocab: int):
    from transformers import (GPT2Config, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    end = tok.eos_token_id
    vit = ViTConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=4 * width, image_size=image_size, patch_size=8)
    gpt2 = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=width, n_layer=layers, n_head=heads,
                      add_cross_attention=True, is_decoder=True, bos_token_id=end, eos_token_id=end)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, gpt2)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = end, end, end
    model = VisionEncoderDecoderModel(config)
    model.generation_config.decoder_start_token_id = end
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = end
    return model, ViTImageProcessor(size={"height": image_size, "width": image_size})


def blip(tok, width: int, layers: int, heads: int, image_size: int, vocab: int):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor

    ids = {k: tok.convert_tokens_to_ids(t) for k, t in
           [("pad", "[PAD]"), ("sep", "[SEP]"), ("dec", "[DEC]")]}
    text = dict(vocab_size=vocab, hidden_size=width, encoder_hidden_size=width, intermediate_size=4 * width,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=64,
                pad_token_id=ids["pad"], bos_token_id=ids["dec"], sep_token_id=ids["sep"], eos_token_id=ids["sep"])
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=image_size, patch_size=8)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    return model, BlipImageProcessor(size={"height": image_size, "width": image_size})


def dico_ref(out_dir: str, width: int, layers: int, heads: int, image_size: int, tied: bool = False) -> dict:
    """A folder as the reference's VisionEncoderDecoderModel fork saves it: config.json (vision-encoder-encoder of a
    clip_vision_model + BERT, GPT-2 decoder) and pytorch_model.bin under its key names. Returns the transformers
    modules it was written from, by key prefix."""
    import json
    import os

    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    vision = CLIPVisionConfig(hidden_size=2 * width, intermediate_size=4 * width, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=8)
    bert = BertConfig(hidden_size=width, d_embed=width, num_hidden_layers=layers, intermediate_size=4 * width,
                      num_attention_heads=heads)
    gpt2 = GPT2Config(vocab_size=49409, n_embd=width, n_layer=layers, n_head=heads, n_positions=64,
                      add_cross_attention=True, bos_token_id=49406, eos_token_id=49407, pad_token_id=49408,
                      tie_word_embeddings=tied)
    parts = {"encoder.vision_encoder.": CLIPVisionModel(vision), "encoder.encoder.": BertModel(bert),
             "encoder.vis_enc_to_enc_proj.": torch.nn.Linear(vision.hidden_size, width),
             "decoder.": GPT2LMHeadModel(gpt2)}
    state = {p + k: v.detach().clone() for p, m in parts.items() for k, v in m.state_dict().items()}
    config = {"architectures": ["VisionEncoderDecoderModel"], "model_type": "vision-encoder-decoder",
              "is_encoder_decoder": True, "decoder_start_token_id": 49406, "bos_token_id": 49406,
              "eos_token_id": 49407, "pad_token_id": 49408, "vocab_size": 49409, "hidden_size": width,
              "tie_word_embeddings": False,
              "encoder": {"model_type": "vision-encoder-encoder", "hidden_size": width,
                          "vision_encoder": {**vision.to_dict(), "model_type": "clip_vision_model"},
                          "encoder": {**bert.to_dict(), "model_type": "bert"}},
              "decoder": {**gpt2.to_dict(), "model_type": "gpt2"}}
    os.makedirs(out_dir, exist_ok=True)
    torch.save(state, os.path.join(out_dir, "pytorch_model.bin"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return parts


def write(family: str, out_dir: str, width: int = 32, layers: int = 2, heads: int = 2, image_size: int = 32,
          seed: int = 0, vocab_size: int = 0) -> str:
    """Writes the folder and returns its path. vocab_size: the decoder's vocabulary (0: the tokenizer's; more gives
    rows no caption uses, e.g. the CLIP BPE's 49,409 to compare step costs with the built-in captioner)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})")
    torch.manual_seed(seed)
    if family == "dico-ref":
        dico_ref(out_dir, width, layers, heads, image_size)
        return out_dir
    if family in VLM_FAMILIES:
        return write_vlm(family, out_dir, width, layers, heads, image_size, vocab_size)
    tok = train_tokenizer(family)
    if 0 < vocab_size < len(tok):
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {len(tok)} tokens")
    vocab = vocab_size or len(tok)
    model, processor = {"vit-gpt2": vit_gpt2, "blip": blip}[family](tok, width, layers, heads, image_size, vocab)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def family_problem(family: str, width: int, heads: int, image_size: int, vocab_size: int) -> str | None:
    """Why `family` cannot be built (or trained) at these sizes; None when it can."""
    if image_size < 8:
        return f"--image-size {image_size}: {family} cuts images into 8-pixel patches: at least 8"
    if image_size % IMAGE_STEP.get(family, 1):
        return f"--image-size {image_size}: {family} merges its 8-pixel patches 2 x 2: a multiple of 16"
    if (width // heads) % (step := HEAD_STEP.get(family, 1)):
        return (f"--width {width} / --heads {heads}: {family}'s rotary embeddings split its head width "
                f"{width // heads}: a multiple of {step}")
    if family == "gemma3" and heads % max(1, heads // 2):
        return (f"--heads {heads}: gemma3's heads share {heads // 2} key/value heads, which must divide them "
                "(an even --heads, or 1 or 3)")
    return vocab_problem(family, vocab_size)


def vocab_problem(family: str, vocab_size: int) -> str | None:
    if not vocab_size:
        return None
    if family == "dico-ref":
        return (f"--vocab-size {vocab_size}: dico-ref's vocabulary is the CLIP BPE's 49409 tokens (open_clip's "
                "tokenizer reads it): leave --vocab-size out")
    if family in VLM_FAMILIES:
        return (f"--vocab-size {vocab_size}: {family}'s vocabulary is its tokenizer's, trained here on the synthetic "
                "captions: leave --vocab-size out")
    if vocab_size < TOKENIZER_SIZE:
        return (f"--vocab-size {vocab_size}: below the tokenizer's {TOKENIZER_SIZE} tokens, the smallest allowed "
                "(0: the tokenizer's)")
    return None


def main(argv=None) -> int:
    p = OneLineParser(prog="dico_scale.models.tiny", description=__doc__.split("\n\n")[0])  # argparse refills it
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("out_dir")
    p.add_argument("--width", type=int, default=32, help=f"at most {MAX_SIZES['--width']}")
    p.add_argument("--layers", type=int, default=2, help=f"at most {MAX_SIZES['--layers']}")
    p.add_argument("--heads", type=int, default=2, help=f"at most {MAX_SIZES['--heads']}")
    p.add_argument("--image-size", type=int, default=32, help=f"at most {MAX_SIZES['--image-size']}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=0, help="decoder vocabulary of vit-gpt2 and blip, "
                   f"{TOKENIZER_SIZE} to {MAX_SIZES['--vocab-size']} (default: the tokenizer's)")
    a = p.parse_args(argv)
    sizes = {"--width": a.width, "--layers": a.layers, "--heads": a.heads, "--image-size": a.image_size}
    if bad := [f"{k} {v}" for k, v in sizes.items() if v < 1] + [f"--vocab-size {a.vocab_size}"] * (a.vocab_size < 0):
        p.error(f"{', '.join(bad)}: sizes are whole numbers >= 1 (--vocab-size: 0 or more)")
    sizes["--vocab-size"] = a.vocab_size
    if big := [f"{k} {v}" for k, v in sizes.items() if v > MAX_SIZES[k]]:
        p.error(f"{', '.join(big)}: a tiny model's sizes are at most "
                + ", ".join(f"{k} {v}" for k, v in MAX_SIZES.items()))
    if not 0 <= a.seed < 2 ** 64:
        p.error(f"--seed {a.seed}: a whole number from 0 to 2**64 - 1")
    if a.width % a.heads:
        p.error(f"--width {a.width} is not a multiple of --heads {a.heads}")
    if problem := family_problem(a.family, a.width, a.heads, a.image_size, a.vocab_size):
        p.error(problem)
    if os.path.exists(a.out_dir) and (not os.path.isdir(a.out_dir) or os.listdir(a.out_dir)):
        # save_pretrained would overwrite a real model's files, and prune its weight shards
        p.error(f"{a.out_dir} exists and is not an empty folder: a tiny random model goes into a new one")
    try:
        os.makedirs(a.out_dir, exist_ok=True)
    except OSError as e:
        p.error(f"{a.out_dir} cannot be created: {e.strerror or e}")
    print(write(a.family, a.out_dir, a.width, a.layers, a.heads, a.image_size, a.seed, a.vocab_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
