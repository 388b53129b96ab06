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
  llava      LlavaForConditionalGeneration: a CLIP vision tower on images resized and cropped to one size (a fixed run
             of <image> tokens), a projector, a Llama text model; "USER: <image>\n... ASSISTANT:" turns
"""
from __future__ import annotations

VLM_FAMILIES = ("idefics3", "smolvlm", "qwen2-vl", "qwen2.5-vl", "llava")

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

# LLaVA-1.5 turns: "USER: <image>\nDescribe... ASSISTANT:"
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
IDEFICS3_SPECIALS = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                      "<global-img>", "<image>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
QWEN2VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]


def _tokenizer(specials: list[str], template: str, vocab_size: int, **named):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data.synthetic import caption_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    prompts = ["User: Assistant: user assistant Describe this image in one sentence."] * 20
    bpe.train_from_iterator(caption_corpus() + prompts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **named)
    tok.chat_template = template
    return tok


def _text_config(vocab: int, width: int, layers: int, heads: int, **ids) -> dict:
    return dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                tie_word_embeddings=False, **ids)


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


def qwen2_vl(width: int, layers: int, heads: int, image_size: int, vocab_size: int, v25: bool = False):
    """(model, processor): 4-pixel patches merged 2 x 2, images of 16 x 16 to image_size x image_size pixels
    (rounded to 8): between 4 and (image_size / 8)^2 <|image_pad|> tokens, following the image's size. v25: the
    Qwen2.5-VL classes (windowed vision attention, its last block full)."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    prefix = "Qwen2_5_VL" if v25 else "Qwen2VL"
    Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor = (
        getattr(transformers, prefix + name) for name in ("Config", "ForConditionalGeneration", "Processor"))

    tok = _tokenizer(QWEN2VL_SPECIALS, QWEN2VL_TEMPLATE, vocab_size, eos_token="<|im_end|>",
                     pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIALS}
    text = _text_config(len(tok), width, layers, heads, bos_token_id=ids["<|endoftext|>"],
                        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [width // heads // 8] * 2 + [width // heads // 4]})
    vision = dict(depth=layers, embed_dim=width, hidden_size=width, num_heads=heads, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    if v25:
        vision = dict(depth=layers, hidden_size=width, out_hidden_size=width, intermediate_size=2 * width,
                      num_heads=heads, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[layers - 1])
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    model = Qwen2VLForConditionalGeneration(config)
    size = {"shortest_edge": 16 * 16, "longest_edge": image_size * image_size}
    kw = dict(size=size, patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(Qwen2VLImageProcessor(**kw), tok, Qwen2VLVideoProcessor(**kw),
                                 chat_template=QWEN2VL_TEMPLATE)
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
    vision = dict(model_type="clip_vision_model", hidden_size=width, intermediate_size=2 * width,
                  num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size, patch_size=8,
                  projection_dim=width)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                         image_seq_length=(image_size // 8) ** 2, vision_feature_layer=-1, pad_token_id=ids["<pad>"])
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                               "width": image_size})
    processor = LlavaProcessor(images, tok, patch_size=8, vision_feature_select_strategy="default",
                               chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    return model, processor


def write_vlm(family: str, out_dir: str, width: int, layers: int, heads: int, image_size: int,
              vocab_size: int = 0) -> str:
    """The folder of a tiny `family` VLM (save_pretrained of the model and its processor). Seed first."""
    build = {"idefics3": idefics3, "smolvlm": lambda *a: idefics3(*a, smolvlm=True), "qwen2-vl": qwen2_vl,
             "llava": llava, "qwen2.5-vl": lambda *a: qwen2_vl(*a, v25=True)}[family]
    model, processor = build(width, layers, heads, image_size, max(vocab_size, 400))
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
