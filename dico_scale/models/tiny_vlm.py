"""Tiny random vision-language models (MODELS row `hf_vlm`), written as a user's folder would look: config.json and
weights, a processor (image processor + tokenizer + chat template) that `AutoProcessor` reads back, nothing
downloaded. The tokenizer is a byte-level BPE trained with the `tokenizers` library on the synthetic captions, with
the family's special and image tokens; the chat templates follow each family's turn format.

Families (dico_scale.models.tiny writes them):
  idefics3   Idefics3ForConditionalGeneration (the SmolVLM layout): images split into tiles by size, each tile a
             fixed run of <image> tokens between <fake_token_around_image> markers; Llama text model
  qwen2-vl   Qwen2VLForConditionalGeneration: the image's patch grid follows its size (one <|image_pad|> per merged
             patch), multimodal rotary positions (mrope); Qwen2 text model
  qwen2.5-vl Qwen2_5_VLForConditionalGeneration: as qwen2-vl, with windowed attention in the vision tower
  qwen3-vl   Qwen3VLForConditionalGeneration: as qwen2-vl, with interleaved mrope, the vision tower's learned position
             grid interpolated to the image, and its deepstack features added to the first text layers
  internvl   InternVLForConditionalGeneration: images cut into a grid of tiles nearest their aspect ratio (plus a
             thumbnail), every image's tiles in one list; a fixed run of <IMG_CONTEXT> tokens a tile between <img> and
             </img>; Qwen2 text model, tied head
  llava      LlavaForConditionalGeneration: a CLIP vision tower on images resized and cropped to one size (a fixed run
             of <image> tokens), a projector, a Llama text model; "USER: <image>\n... ASSISTANT:" turns
  llava-next LlavaNextForConditionalGeneration: anyres tiles (a grid chosen by the image's size, plus the whole image)
             zero-padded to the batch's largest tile count, their features unpadded to the aspect ratio with a
             newline feature per row, so tile and token counts follow the size; Mistral-style [INST] turns
  llava-onevision  LlavaOnevisionForConditionalGeneration: LLaVA-NeXT's tiles on a SigLIP tower, Qwen2 text model
  gemma3     Gemma3ForConditionalGeneration: a SigLIP tower on images resized to one size, pooled to a fixed run of
             <image_soft_token>s; image tokens attend to each other both ways in the prefill (token_type_ids); sliding-window and global layers; a tied head; the tokenizer adds <bos> and
             the chat template writes it too; turns end with <end_of_turn>, which the generation config lists after
             <eos>
  paligemma  PaliGemmaForConditionalGeneration: a SigLIP tower on images resized to one size, a fixed run of <image>
             tokens; no chat template (the prompt "<image>caption en", completed by the processor to
             "<image>...<bos>caption en\n"); the whole prompt attends both ways (a prefix-LM), the caption causally;
             Gemma text model, tied head, positions from 1
  paligemma2 PaliGemma 2: as paligemma on a Gemma 2 text model, which softcaps its logits (final_logit_softcapping,
             30.0 by default: config.json leaves it out) and its attention scores (50.0; eager attention only)
"""
from __future__ import annotations

VLM_FAMILIES = ("idefics3", "smolvlm", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl", "llava", "llava-next",
                "llava-onevision", "gemma3", "paligemma", "paligemma2")
# captioner.prompt where a family's folder has no chat template (the image placeholder written in it)
FAMILY_PROMPTS = {"paligemma": "<image>caption en", "paligemma2": "<image>caption en"}


def prompt_overrides(family: str) -> list[str]:
    """The config overrides a family's tiny folder needs beyond captioner.hf_path: its prompt, if it has its own."""
    return [f"captioner.prompt={FAMILY_PROMPTS[family]}"] if family in FAMILY_PROMPTS else []

# Idefics3 / SmolVLM turns: "User:<image>Describe...<end_of_utterance>\nAssistant: ..."
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
# Qwen2-VL turns: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe...<|im_end|>\n"
QWEN2VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# InternVL (the -hf releases) turns: Qwen2-VL's, the image as "<IMG_CONTEXT>\n" (the processor widens it)
INTERNVL_TEMPLATE = QWEN2VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")
# LLaVA-OneVision turns: Qwen2-VL's, the image as "<image>\n"
ONEVISION_TEMPLATE = QWEN2VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n")

# LLaVA-1.5 turns: "USER: <image>\nDescribe... ASSISTANT:"
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
# LLaVA-NeXT (llava-v1.6-mistral) turns: "<s>[INST] <image>\nDescribe... [/INST] A cat.</s>"
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} [/INST]"
    "{% else %} {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}")
# Gemma 3 turns: "<bos><start_of_turn>user\n<start_of_image>Describe...<end_of_turn>\n<start_of_turn>model\n"
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
GEMMA3_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"]
PALIGEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
ONEVISION_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
LLAVA_NEXT_SPECIALS = LLAVA_SPECIALS + ["[INST]", "[/INST]"]
IDEFICS3_SPECIALS = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                      "<global-img>", "<image>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
QWEN2VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]


def _tokenizer(specials: list[str], template: str, vocab_size: int, prepend: str = "", **named):
    """prepend: a special token the tokenizer adds in front of every text (Gemma's <bos>), as a post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data.synthetic import caption_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    prompts = ["User: Assistant: user assistant Describe this image in one sentence."] * 20
    bpe.train_from_iterator(caption_corpus() + prompts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if prepend:
        bpe.post_processor = processors.TemplateProcessing(single=f"{prepend} $A", pair=f"{prepend} $A $B",
                                                           special_tokens=[(prepend, bpe.token_to_id(prepend))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **named)
    tok.chat_template = template
    return tok


def _text_config(vocab: int, width: int, layers: int, heads: int, **ids) -> dict:
    return dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                tie_word_embeddings=False, **ids)


def _vision_config(model_type: str, width: int, layers: int, heads: int, image_size: int, **extra) -> dict:
    """A CLIP or SigLIP vision tower of 8-pixel patches."""
    return dict(model_type=model_type, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=heads, image_size=image_size, patch_size=8, **extra)


def _anyres_grid(image_size: int) -> list[list[int]]:
    """LLaVA-NeXT's and LLaVA-OneVision's tile grids (image_grid_pinpoints): 1 x 2, 2 x 1 and 2 x 2 tiles."""
    return [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]


def idefics3(width: int, layers: int, heads: int, image_size: int, vocab_size: int, smolvlm: bool = False):
    """(model, processor): tiles of image_size pixels, 8-pixel patches, pixel shuffle by 2: 4 <image> tokens a tile;
    an image up to 2 x image_size on its long side splits into up to 2 x 2 tiles plus the global one. smolvlm: the
    SmolVLM (SmolVLM2) classes, the same layout with a video processor beside the image one."""
    import transformers

    prefix = "SmolVLM" if smolvlm else "Idefics3"
    (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor) = (
        getattr(transformers, prefix + name) for name in ("Config", "ForConditionalGeneration", "ImageProcessor",
                                                          "Processor"))

    tok = _tokenizer(IDEFICS3_SPECIALS, IDEFICS3_TEMPLATE, vocab_size, bos_token="<|im_start|>",
                     eos_token="<end_of_utterance>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<end_of_utterance>", "<|endoftext|>", "<image>")}
    text = _text_config(len(tok), width, layers, heads, bos_token_id=ids["<|im_start|>"],
                        eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=image_size, patch_size=8)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2, image_token_id=ids["<image>"],
                            tie_word_embeddings=False, pad_token_id=ids["<|endoftext|>"])
    model = Idefics3ForConditionalGeneration(config)
    images = Idefics3ImageProcessor(size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size},
                                    do_image_splitting=True)
    seq_len = (image_size // 8) ** 2 // 4
    if smolvlm:
        video = transformers.SmolVLMVideoProcessor(size={"longest_edge": 2 * image_size},
                                                   max_image_size={"longest_edge": image_size})
        return model, Idefics3Processor(images, tok, video, image_seq_len=seq_len, chat_template=IDEFICS3_TEMPLATE)
    return model, Idefics3Processor(images, tok, image_seq_len=seq_len, chat_template=IDEFICS3_TEMPLATE)


def qwen_vl(width: int, layers: int, heads: int, image_size: int, vocab_size: int, version: str = "2"):
    """(model, processor): 4-pixel patches merged 2 x 2, images of 16 x 16 to image_size x image_size pixels
    (rounded to 8): between 4 and (image_size / 8)^2 <|image_pad|> tokens, following the image's size. version "2.5":
    the Qwen2.5-VL classes (windowed vision attention, its last block full); "3": Qwen3-VL's (interleaved mrope
    sections; a learned 8 x 8 position grid in the tower, interpolated; deepstack features of its first block added to
    the first text layer)."""
    import transformers
    from transformers import Qwen2VLImageProcessor

    prefix = {"2": "Qwen2VL", "2.5": "Qwen2_5_VL", "3": "Qwen3VL"}[version]
    Config, ForConditionalGeneration, Processor = (
        getattr(transformers, prefix + name) for name in ("Config", "ForConditionalGeneration", "Processor"))
    VideoProcessor = transformers.Qwen3VLVideoProcessor if version == "3" else transformers.Qwen2VLVideoProcessor

    tok = _tokenizer(QWEN2VL_SPECIALS, QWEN2VL_TEMPLATE, vocab_size, eos_token="<|im_end|>",
                     pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIALS}
    head_dim = width // heads
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head_dim // 8] * 2 + [head_dim // 4]}
    extra = dict(head_dim=head_dim, rope_parameters={**rope, "mrope_interleaved": True}) if version == "3" else \
        dict(rope_parameters=rope)
    text = _text_config(len(tok), width, layers, heads, bos_token_id=ids["<|endoftext|>"],
                        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **extra)
    common = dict(depth=layers, hidden_size=width, num_heads=heads, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2)
    vision = {"2": dict(common, embed_dim=width),
              "2.5": dict(common, out_hidden_size=width, intermediate_size=2 * width, window_size=16,
                          fullatt_block_indexes=[layers - 1]),
              "3": dict(common, out_hidden_size=width, intermediate_size=2 * width, num_position_embeddings=64,
                        deepstack_visual_indexes=[0])}[version]
    config = Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                    video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                    vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    model = ForConditionalGeneration(config)
    size = {"shortest_edge": 16 * 16, "longest_edge": image_size * image_size}
    kw = dict(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = Processor(Qwen2VLImageProcessor(**kw), tok, VideoProcessor(**kw), chat_template=QWEN2VL_TEMPLATE)
    return model, processor


def gemma3(width: int, layers: int, heads: int, image_size: int, vocab_size: int):
    """(model, processor): images resized to image_size, 8-pixel SigLIP patches pooled to 4 <image_soft_token>s (the
    processor's pan-and-scan crops are off unless a call asks for them, as in Gemma 3's releases). Alternating
    sliding-window (8 tokens) and global layers, a tied head, two KV heads shared by `heads` query heads."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tok = _tokenizer(GEMMA3_SPECIALS, GEMMA3_TEMPLATE, vocab_size, prepend="<bos>", bos_token="<bos>",
                     eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                     extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                           "image_token": "<image_soft_token>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA3_SPECIALS}
    head_dim = width // heads
    text = dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim,
                query_pre_attn_scalar=head_dim, sliding_window=8, max_position_embeddings=256,
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"])
    vision = _vision_config("siglip_vision_model", width, layers, heads, image_size)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"], tie_word_embeddings=True)
    model = Gemma3ForConditionalGeneration(config)
    images = Gemma3ImageProcessor(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(images, tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]  # as Gemma 3's releases list them
    return model, processor


def llava(width: int, layers: int, heads: int, image_size: int, vocab_size: int):
    """(model, processor): images resized and cropped to image_size, 8-pixel patches: (image_size / 8)^2 <image>
    tokens (the CLS feature dropped, vision_feature_select_strategy=default)."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _tokenizer(LLAVA_SPECIALS, LLAVA_TEMPLATE, vocab_size, bos_token="<s>", eos_token="</s>",
                     unk_token="<unk>", pad_token="<pad>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIALS}
    text = _text_config(len(tok), width, layers, heads, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                        pad_token_id=ids["<pad>"])
    vision = _vision_config("clip_vision_model", width, layers, heads, image_size, projection_dim=width)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                         image_seq_length=(image_size // 8) ** 2, vision_feature_layer=-1, pad_token_id=ids["<pad>"])
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                               "width": image_size})
    processor = LlavaProcessor(images, tok, patch_size=8, vision_feature_select_strategy="default",
                               chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    return model, processor


def llava_next(width: int, layers: int, heads: int, image_size: int, vocab_size: int):
    """(model, processor): anyres tiles: each image resized to the grid of image_size tiles (1 x 2, 2 x 1 or 2 x 2)
    that fits it best, cut into those tiles plus the whole image as one more, 8-pixel patches; the tiles' features
    unpadded to the image's aspect ratio with a newline feature after each row, so the number of <image> tokens and
    of tiles both follow the image's size. The tokenizer adds <s>; Mistral-style [INST] turns."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    tok = _tokenizer(LLAVA_NEXT_SPECIALS, LLAVA_NEXT_TEMPLATE, vocab_size, prepend="<s>", bos_token="<s>",
                     eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_NEXT_SPECIALS}
    text = _text_config(len(tok), width, layers, heads, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                        pad_token_id=ids["<pad>"])
    vision = _vision_config("clip_vision_model", width, layers, heads, image_size, projection_dim=width)
    grid = _anyres_grid(image_size)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                             image_grid_pinpoints=grid, image_seq_length=(image_size // 8) ** 2,
                             vision_feature_layer=-1, pad_token_id=ids["<pad>"])
    model = LlavaNextForConditionalGeneration(config)
    images = LlavaNextImageProcessor(size={"shortest_edge": image_size}, image_grid_pinpoints=grid,
                                     crop_size={"height": image_size, "width": image_size})
    processor = LlavaNextProcessor(images, tok, patch_size=8, vision_feature_select_strategy="default",
                                   chat_template=LLAVA_NEXT_TEMPLATE, num_additional_image_tokens=1)
    return model, processor


def llava_onevision(width: int, layers: int, heads: int, image_size: int, vocab_size: int):
    """(model, processor): LLaVA-NeXT's anyres tiles (grids of 1 x 2, 2 x 1, 2 x 2 image_size tiles plus the whole
    image) on a SigLIP tower (no CLS feature), unpadded to the image's aspect ratio with a newline feature per row;
    a Qwen2 text model and Qwen-style turns."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor)

    tok = _tokenizer(ONEVISION_SPECIALS, ONEVISION_TEMPLATE, vocab_size, eos_token="<|im_end|>",
                     pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ONEVISION_SPECIALS}
    text = _text_config(len(tok), width, layers, heads, eos_token_id=ids["<|im_end|>"],
                        pad_token_id=ids["<|endoftext|>"], model_type="qwen2")
    vision = _vision_config("siglip_vision_model", width, layers, heads, image_size)
    grid = _anyres_grid(image_size)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                                  video_token_index=ids["<video>"], image_grid_pinpoints=grid,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration(config)
    size = {"height": image_size, "width": image_size}
    images = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=grid)
    video = LlavaOnevisionVideoProcessor(size=size)
    processor = LlavaOnevisionProcessor(images, tok, video, num_image_tokens=(image_size // 8) ** 2,
                                        vision_feature_select_strategy="full", chat_template=ONEVISION_TEMPLATE)
    return model, processor


def internvl(width: int, layers: int, heads: int, image_size: int, vocab_size: int):
    """(model, processor): dynamic tiles: an image resized to the grid of image_size tiles (up to 4) nearest its
    aspect ratio, cut into them, plus a thumbnail tile when there are several; 8-pixel patches, pixel shuffle by 2:
    4 <IMG_CONTEXT> tokens a tile between <img> and </img>, so the token count follows the tile count. All images'
    tiles go in one list (no per-image padding); Qwen2 text model, tied head."""
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVideoProcessor)

    tok = _tokenizer(INTERNVL_SPECIALS, INTERNVL_TEMPLATE, vocab_size, eos_token="<|im_end|>",
                     pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                     extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                           "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in INTERNVL_SPECIALS}
    text = _text_config(len(tok), width, layers, heads, eos_token_id=ids["<|im_end|>"],
                        pad_token_id=ids["<|endoftext|>"], model_type="qwen2")
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=[image_size, image_size], patch_size=[8, 8])
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids["<IMG_CONTEXT>"],
                            image_seq_length=(image_size // 8) ** 2 // 4, downsample_ratio=0.5,
                            tie_word_embeddings=True)
    model = InternVLForConditionalGeneration(config)
    images = GotOcr2ImageProcessor(size={"height": image_size, "width": image_size}, crop_to_patches=True,
                                   min_patches=1, max_patches=4)
    video = InternVLVideoProcessor(size={"height": image_size, "width": image_size})
    processor = InternVLProcessor(images, tok, video, image_seq_length=(image_size // 8) ** 2 // 4,
                                  chat_template=INTERNVL_TEMPLATE)
    return model, processor


def paligemma(width: int, layers: int, heads: int, image_size: int, vocab_size: int, version: str = "1"):
    """(model, processor): a SigLIP tower on images resized to image_size, 8-pixel patches: (image_size / 8)^2 <image>
    tokens; no chat template: the prompt ("<image>caption en") is written as the processor completes it,
    "<image>...<bos>caption en\n", and the whole of it (image, prompt and its last "\n") attends both ways (a prefix-LM:
    token_type_ids 0), the caption after it causally. Gemma text model (version "2": Gemma 2, its softcaps left at
    their defaults, as PaliGemma 2's config.json does), tied head, positions counted from 1."""
    import torch
    from transformers import (PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor)

    tok = _tokenizer(PALIGEMMA_SPECIALS, "", vocab_size, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                     unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    tok.chat_template = None
    images = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    images.image_seq_length = (image_size // 8) ** 2
    processor = PaliGemmaProcessor(images, tok)  # adds its <loc> and <seg> tokens to the tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in PALIGEMMA_SPECIALS}
    head_dim = width // heads
    text = dict(model_type="gemma" if version == "1" else "gemma2", vocab_size=len(tok), hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim,
                max_position_embeddings=256, bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
                pad_token_id=ids["<pad>"])
    vision = _vision_config("siglip_vision_model", width, layers, heads, image_size, vision_use_head=False)
    config = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                             vocab_size=len(tok), projection_dim=width, hidden_size=width, pad_token_id=ids["<pad>"])
    model = PaliGemmaForConditionalGeneration(config)
    if version == "2":  # logits of a trained model's size (tens), where the cap at 30 bends them: the final norm's
        with torch.no_grad():  # gain (Gemma's norms scale by 1 + weight), not the tied embedding the inputs read too
            model.model.language_model.norm.weight.fill_(39.0)
    return model, processor


def write_vlm(family: str, out_dir: str, width: int, layers: int, heads: int, image_size: int,
              vocab_size: int = 0) -> str:
    """The folder of a tiny `family` VLM (save_pretrained of the model and its processor). Seed first."""
    build = {"idefics3": idefics3, "smolvlm": lambda *a: idefics3(*a, smolvlm=True), "qwen2-vl": qwen_vl,
             "qwen2.5-vl": lambda *a: qwen_vl(*a, version="2.5"), "qwen3-vl": lambda *a: qwen_vl(*a, version="3"),
             "internvl": internvl, "llava": llava, "llava-next": llava_next,
             "llava-onevision": llava_onevision, "gemma3": gemma3, "paligemma": paligemma,
             "paligemma2": lambda *a: paligemma(*a, version="2")}[family]
    model, processor = build(width, layers, heads, image_size, max(vocab_size, 400))
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
