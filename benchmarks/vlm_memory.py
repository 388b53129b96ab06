"""Per-GPU memory of a DiCO step with a vision-language captioner (captioner.model=hf_vlm), projected: which settings
fit 80 GB and 141 GB GPUs. Run as `python benchmarks/memory.py --vlm [--json F]`, or for a model folder of your own
at your batch, `... --vlm --folder PATH [--prompt P --images N --candidates K --caption-tokens T]` (folder_spec).

Parameters are counted on transformers models built on the meta device from configs of the real checkpoints' sizes
(no weights, no download). Per GPU, in bf16 with fp32 Adam (dico_scale.memory's accounting):
  states      captioner parameters + gradients + optimizer state under ZeRO-2 or ZeRO-3; the reference (a separate
              frozen copy, or none: the policy with its LoRA adapters disabled); the ViT-L/14 evaluator. Under
              ZeRO-2 the frozen models are replicated, under ZeRO-3 sharded.
  generation  beam search's transient: the KV cache of k candidates x (prompt + caption) tokens, and under ZeRO-3 the
              whole captioner gathered for the call (dico_scale.engine.gathered).
  training    the log-prob pass's transient: the activations autograd saves for k candidates of each image (prompt
              prefilled once with gradients, continuation teacher-forced over the repeated prompt cache; the vision
              tower frozen, so none there), and the chunked head's blocks: one block of fp32 logits, one fp32
              vocabulary slice of the head weight (+ its fp32 gradient when the head trains), and the scored tokens'
              fp32 head rows and state gradients.
  buckets     DeepSpeed's communication buffers at our configs/deepspeed settings.
peak = states + max(generation, training) + buckets. The activation bytes per token and layer are
dico_scale.activations' formula (itemised from what autograd saves in our hf_vlm forward, listed with
saved_tensors_hooks on tiny models of each family: the norms differ, Qwen3 and Gemma 3 add q / k norms, keys and
values are saved repeated to every query head, SDPA saves each layer's copy of the attention mask, eager attention
its scores per head and (query, key) pair), checked against a measurement on tiny GQA models at every run
(`validate`): the table prints measured / formula. The formula counts a padded batch (prompts of different lengths:
COCO's images differ in shape), which has an attention mask; prompts all of one length need none in the prefill, and
save less (Idefics3: 5%).
"""
from __future__ import annotations

import tempfile

from dico_scale.activations import (BYTES, LAYERS, LORA_TARGETS, Layer, LoRA, Shape, activations,
                                    checkpointed_activations, head_bytes, kv_width, layer_bytes, prompt_tokens,
                                    text_config, text_layer)

GIB = 2**30
GPUS = {"80 GB": 81_559 * 2**20, "141 GB": 143_771 * 2**20}  # nvidia-smi's totals (A100/H100 80GB, H200)
HEADROOM = 3 * GIB  # CUDA context, allocator fragmentation
EVALUATOR = 427_616_513  # open_clip ViT-L-14 (vision + text), counted on the meta device
BUCKETS = {2: (5e8 + 5e8) * BYTES, 3: (2 * 5e7 + 5e7) * BYTES}  # ZeRO-2 defaults; zero3.json, overlap_comm


SHAPE = Shape()
IMAGES, K, CAPTION, _ = SHAPE  # the tiny models' check
LORA = LoRA(16, LORA_TARGETS)  # configs/smolvlm, configs/qwen2vl, ...

MODELS = {
    # SmolVLM-Instruct (Idefics3): Llama text model, SigLIP so400m tower; a 640 x 480 COCO image is resized to
    # 1536 x 1152 and split into 4 x 3 tiles of 384 plus the global one, 81 tokens each (+ ~25 prompt tokens)
    "SmolVLM-2.2B-like": dict(
        family="idefics3", prompt_tokens=13 * 81 + 25,
        text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=49155, tie_word_embeddings=False),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    patch_size=14, image_size=384), scale_factor=3),
    # Qwen2-VL-7B-Instruct: a 640 x 480 image -> 644 x 476 (multiples of 28): 23 x 17 = 391 tokens (+ ~25)
    "Qwen2-VL-7B-like": dict(
        family="qwen2-vl", prompt_tokens=391 + 25,
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2)),
    # Qwen3-VL-8B-Instruct: 32-pixel merged patches, a 640 x 480 image -> 20 x 15 = 300 tokens (+ ~25)
    "Qwen3-VL-8B-like": dict(
        family="qwen3-vl", prompt_tokens=300 + 25,
        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True}),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24])),
    # Gemma-3-4B-it: every image 896 x 896, 256 tokens (+ ~25); a 262,208-token vocabulary, the head tied to the
    # embeddings; head size 256 (8 query heads of 256 = 2048 < hidden 2560)
    "Gemma-3-4B-like": dict(
        family="gemma3", prompt_tokens=256 + 25,
        text=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, vocab_size=262208,
                  sliding_window=1024, tie_word_embeddings=True),
        vision=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                    num_hidden_layers=27, num_attention_heads=16, patch_size=14, image_size=896),
        mm_tokens_per_image=256),
    # llava-v1.6-mistral-7b-hf (LLaVA-NeXT): CLIP ViT-L/14 at 336, a Mistral-7B text model. A 640 x 480 image is
    # cut into the 2 x 2 grid of 336 tiles plus the whole image, unpadded to 4:3 with a newline feature per row:
    # 2,340 image tokens (LlavaNextProcessor's count, + ~25 prompt tokens), 5.6 times Qwen2-VL's for the same picture
    "LLaVA-NeXT-7B-like": dict(
        family="llava-next", prompt_tokens=2340 + 25,
        text=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32064, tie_word_embeddings=False),
        vision=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, patch_size=14, image_size=336, projection_dim=768)),
    # PaliGemma 2 (paligemma2-3b-pt-224 / -448, paligemma2-10b-pt-448): SigLIP so400m at a fixed size, 14-pixel
    # patches (224: 256 image tokens, 448: 1,024; + "<bos>caption en\n", 4 tokens, no chat template), Gemma 2 text
    # models (V = 257,216, tied head) whose attention softcap keeps transformers on eager attention: every layer
    # saves its [heads, queries, keys] scores, so the prompt's length counts squared.
    **{name: dict(family="paligemma2", prompt_tokens=(image // 14) ** 2 + 4,
                  text=dict(model_type="gemma2", hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                            head_dim=256, query_pre_attn_scalar=256, vocab_size=257216, tie_word_embeddings=True),
                  vision=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                              num_hidden_layers=27, num_attention_heads=16, patch_size=14, image_size=image,
                              projection_dim=width),
                  projection_dim=width, vocab_size=257216, image_token_index=257152)
       for name, width, layers, heads, image in (("PaliGemma-2-3B-224-like", 2304, 26, 8, 224),
                                                 ("PaliGemma-2-3B-448-like", 2304, 26, 8, 448),
                                                 ("PaliGemma-2-10B-448-like", 3584, 42, 16, 448))},
}


def build_meta(spec: dict):
    """The transformers model of `spec` on the meta device."""
    import torch
    import transformers

    prefix, extra = {"idefics3": ("Idefics3", ("scale_factor",)), "qwen2-vl": ("Qwen2VL", ()),
                     "qwen3-vl": ("Qwen3VL", ()), "gemma3": ("Gemma3", ("mm_tokens_per_image",)),
                     "llava-next": ("LlavaNext", ()),
                     "paligemma2": ("PaliGemma", ("projection_dim", "vocab_size", "image_token_index"))}[spec["family"]]
    config = getattr(transformers, prefix + "Config")(
        text_config=spec["text"], vision_config=spec["vision"], tie_word_embeddings=spec["text"]["tie_word_embeddings"],
        **{k: spec[k] for k in extra})
    cls = getattr(transformers, prefix + "ForConditionalGeneration")
    with torch.device("meta"):
        return cls(config)


def counts(spec: dict, adapters: LoRA = LORA) -> dict:
    """Parameter counts: total, the (frozen) vision tower, LoRA's adapters on the text model's targets."""
    import torch

    from dico_scale.models.hf_vlm import text_model, towers

    model = spec["meta"] if "meta" in spec else build_meta(spec)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for tower in towers(model) for p in tower.parameters())
    text = text_model(model)
    lora = sum(adapters.r * (m.in_features + m.out_features) for name, m in text.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in adapters.targets)
    return {"total": total, "vision": vision, "lora": lora}


def layer_of(spec: dict) -> Layer:
    return spec["layer"] if "layer" in spec else LAYERS[spec["family"]]


def generation(t: dict, prompt: int, shape: Shape = SHAPE) -> int:
    hkv = kv_width(t)
    return shape.images * shape.k * (prompt + shape.caption) * 2 * hkv * BYTES * t["num_hidden_layers"]


def project(name: str, spec: dict, c: dict, lora: bool, separate_reference: bool, zero: int, world: int,
            calibration: float = 1.0, checkpointing: bool = False, shape: Shape = SHAPE,
            adapters: LoRA = LORA) -> dict:
    from dico_scale.memory import account

    t = spec["text"]
    trainable = c["lora"] if lora else c["total"] - c["vision"]  # captioner.freeze=vision
    params = c["total"] + (c["lora"] if lora else 0)
    frozen_stage = 3 if zero == 3 else 0
    states = account("captioner", params, trainable, zero, world, BYTES).total
    reference = account("reference", c["total"], 0, frozen_stage, world, BYTES).total if separate_reference else 0
    evaluator = account("evaluator", EVALUATOR, 0, frozen_stage, world, BYTES).total
    adapters = adapters if lora else LoRA()
    head = head_bytes(t, adapters, shape)
    gen = generation(t, spec["prompt_tokens"], shape) + (params * BYTES if zero == 3 else 0)
    saved = (checkpointed_activations if checkpointing else activations)(t, spec["prompt_tokens"], adapters,
                                                                          layer_of(spec), shape)
    train = int(saved * calibration) + head
    peak = states + reference + evaluator + max(gen, train) + BUCKETS[zero]
    return {"model": name, "lora": lora, "separate_reference": separate_reference, "zero": zero, "world": world,
            "checkpointing": checkpointing,
            "captioner_states": states, "reference": reference, "evaluator": evaluator, "generation": gen,
            "training": train, "buckets": BUCKETS[zero], "peak": peak,
            "fits": {g: peak + HEADROOM <= cap for g, cap in GPUS.items()}}


def validate(families=(*LAYERS, "qwen2-vl:eager"), fp32: bool = False) -> list[dict]:
    """Saved bytes per decoder layer of our hf_vlm log-prob forward on tiny random models (bf16, 8 images of two
    shapes, so that the prompts pad where a family's image tokens vary, x 5 candidates x 30 tokens; 4 layers minus 2,
    halved; 4 query heads on 2 key/value heads), measured with saved_tensors_hooks, against layer_bytes() of the
    layer text_layer() reads off the model (as a run's projection does). "family:attention" builds the model with
    that attention. fp32: the models in fp32 (a CPU run's precision) instead of bf16."""
    import types

    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText

    from dico_scale.models.hf_vlm import HFVLM
    from dico_scale.models.vlm_processor import load_processor
    from dico_scale.models.lora import add_lora
    from dico_scale.models.tiny_vlm import FAMILY_PROMPTS, write_vlm

    dtype = torch.float32 if fp32 else torch.bfloat16

    def saved(name, layers, lora):
        family, _, attention = name.partition(":")
        torch.manual_seed(0)
        folder = write_vlm(family, tempfile.mkdtemp(), 64, layers, 4, 64)
        config = AutoConfig.from_pretrained(folder)
        config.text_config.num_key_value_heads = 2  # GQA, as the real models: 4 query heads share 2 key/value heads
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype,
                                                        **({"attn_implementation": attention} if attention else {}))
        prompt = FAMILY_PROMPTS.get(family, "Describe this image in one sentence.")
        cap = HFVLM(model, load_processor(folder), prompt, folder, {"vision"})
        if lora:
            add_lora(cap, types.SimpleNamespace(r=LORA.r, alpha=32.0, dropout=0.05,
                                                target_modules=",".join(LORA.targets), modules_to_save=""))
        cap.to(dtype).train()  # DeepSpeed's bf16 engine casts the adapters too
        shapes = ((128, 96), (120, 40))
        images = cap.preprocess.collate([cap.preprocess(Image.new("RGB", shapes[i % 2], (20 * i, 90, 40)))
                                         for i in range(IMAGES)])
        tokens = torch.randint(10, 300, (IMAGES * K, CAPTION + 1))
        tokens[tokens == cap.tokenizer.eos], tokens[:, 0] = 11, cap.tokenizer.bos
        params, seen = {p.untyped_storage().data_ptr() for p in cap.parameters()}, {}

        def pack(x):
            s = x.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            cap(tokens, pixels=images, repeats=K, output="hidden")
        return sum(seen.values()), images["input_ids"].shape[1] - 1, text_config(model), text_layer(model)

    rows = []
    for family in families:
        for lora in (False, True):
            (two, prompt, text, layer), (four, *_) = saved(family, 2, lora), saved(family, 4, lora)
            measured = (four - two) / 2
            formula = layer_bytes(text, prompt, LORA if lora else LoRA(), layer,
                                  SHAPE._replace(dtype_bytes=4 if fp32 else 2))
            rows.append({"family": family, "lora": lora, "prompt_tokens": prompt, "measured_layer_bytes": measured,
                         "formula_layer_bytes": formula, "measured_over_formula": measured / formula})
    return rows


def folder_spec(path: str, prompt: str) -> dict:
    """A user's model folder (as captioner.hf_path) as a MODELS entry: the model built on the meta device from its
    config (no weights read), its text model's layer (dico_scale.activations.text_layer, under transformers' default
    attention), and the prompt's tokens for a 640 x 480 picture through hf_vlm's own preprocessing with the folder's
    processor. A folder hf_vlm cannot train, or a text model without a layer formula: a ConfigError."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from dico_scale.activations import TEXT_LAYERS
    from dico_scale.errors import ConfigError
    from dico_scale.models.folders import checked_config, vlm_problem
    from dico_scale.models.hf_vlm import HFVLM
    from dico_scale.models.vlm_processor import load_processor

    checked_config(path, vlm_problem)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    if (layer := text_layer(model)) is None:
        raise ConfigError(f"--folder '{path}': its text model '{config.get_text_config().model_type}' has no layer "
                          f"formula here ({', '.join(TEXT_LAYERS)})")
    cap = HFVLM(model, load_processor(path), prompt, path, {"vision"})
    return {"layer": layer, "meta": model, "prompt_tokens": prompt_tokens(cap), "text": text_config(model)}


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def table(name: str, spec: dict, calibration: float = 1.0, shape: Shape = SHAPE, adapters: LoRA = LORA) -> list[dict]:
    """Every setting of one model, printed and returned."""
    c, rows = counts(spec, adapters), []
    print(f"\n{name}: {c['total'] / 1e9:.2f} B parameters (vision tower {c['vision'] / 1e9:.2f} B, frozen), "
          f"LoRA r={adapters.r} on {'/'.join(adapters.targets)}: {c['lora'] / 1e6:.1f} M; prompt "
          f"{spec['prompt_tokens']} tokens; {shape.images} images x {shape.k} candidates x {shape.caption} tokens; "
          "GiB per GPU, bf16:")
    print(f"  {'setting':<48} {'GPUs':>5} {'states':>7} {'ref':>6} {'eval':>5} {'gen':>6} {'train':>6} "
          f"{'peak':>6}  fits 80 GB / 141 GB")
    settings = [(lora, separate, zero, world, False) for lora, separate in ((False, True), (True, True), (True, False))
                for zero in (2, 3) for world in (8, 64)]
    for lora, separate, zero, world, ckpt in settings + [(False, True, 3, 8, True), (True, False, 3, 8, True)]:
        r = project(name, spec, c, lora, separate, zero, world, calibration, ckpt, shape, adapters)
        rows.append(r | {"counts": c})
        setting = f"{'LoRA' if lora else 'full'}, ref {'separate' if separate else 'adapters off'}, ZeRO-{zero}" \
                  f"{', checkpointing' if ckpt else ''}"
        print(f"  {setting:<48} {'1x8' if world == 8 else '8x8':>5} {gib(r['captioner_states']):>7} "
              f"{gib(r['reference']):>6} {gib(r['evaluator']):>5} {gib(r['generation']):>6} "
              f"{gib(r['training']):>6} {gib(r['peak']):>6}  "
              f"{' / '.join('yes' if r['fits'][g] else 'no' for g in GPUS)}")
    return rows


def main(json_path: str = "", folder: str = "", prompt: str = "", shape: Shape = SHAPE,
         adapters: LoRA = LORA) -> list[dict]:
    """The tiny models' check and every model of MODELS; with `folder`, that model alone (the formula unscaled: the
    check runs with the full command and in tests/test_benchmark_memory_vlm.py)."""
    import json

    if folder:
        rows = table(folder, folder_spec(folder, prompt), shape=shape, adapters=adapters)
        checks, calibration = [], 1.0
    else:
        checks = validate()
        print("activation bytes per decoder layer, tiny models (8 images x 5 candidates x 30 tokens, bf16):")
        for r in checks:
            print(f"  {r['family']:<14} {'LoRA' if r['lora'] else 'full':<5} prompt {r['prompt_tokens']:>4} tokens: "
                  f"measured {r['measured_layer_bytes'] / 2**20:.2f} MiB, formula "
                  f"{r['formula_layer_bytes'] / 2**20:.2f} MiB, ratio {r['measured_over_formula']:.3f}")
        calibration = max(1.0, max(r["measured_over_formula"] for r in checks))
        print(f"the projections' activations are the formula's x {calibration:.3f} (the largest ratio)")
        rows = [r for name, spec in MODELS.items() for r in table(name, spec, calibration, shape, adapters)]
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"validation": checks, "calibration": calibration, "projections": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
