"""Activation memory of a vision-language captioner's log-prob pass (captioner.model=hf_vlm), projected per rank.

The pass that trains (XE's teacher forcing, DiCO's and SCST's candidates) prefills each image's prompt once with
gradients, then teacher-forces its k candidates over the prompt's cache repeated k times. What autograd saves per
token and decoder layer is itemised here, family by family, from what saved_tensors_hooks lists on tiny models
(benchmarks/vlm_memory.py measures it against this formula on every tiny family: measured / formula 0.98-1.00):
the RMSNorms' fp32 copies; q and the keys and values repeated to every query head; SDPA's output and logsumexp and
its per-layer copy of the attention mask, or eager attention's per-head scores (Gemma 2); the gated MLP; the trained
linear layers' inputs or LoRA's. It counts a padded batch (prompts of different lengths) in the training dtype
(bf16 / fp16, or fp32: checked in both), and leaves out the vision tower (frozen: captioner.freeze=vision). Rank 0
logs it at start (train.py); benchmarks/memory.py --vlm projects whole runs with it.
"""
from __future__ import annotations

from typing import NamedTuple

BYTES = 2  # bf16
BLOCK_BYTES = (1 << 24) * 4  # the chunked head's block of fp32 logits, and its fp32 slice of the head weight
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class Shape(NamedTuple):
    """One rank's log-prob pass: images (train.micro_batch_size) x k candidates x caption tokens, in a training dtype
    of `dtype_bytes` (bf16 / fp16: 2, fp32: 4)."""
    images: int = 8
    k: int = 5
    caption: int = 30
    dtype_bytes: int = BYTES


class LoRA(NamedTuple):
    """captioner.lora as the formula needs it: rank r (0: no adapters, the text model trains) and target names."""
    r: int = 0
    targets: tuple[str, ...] = LORA_TARGETS


class Layer(NamedTuple):
    """A family's decoder layer: RMSNorms a layer and their style, q / k norms, and the attention transformers runs
    for it (eager: Gemma 2, whose attention softcap has no SDPA path)."""
    norms: int = 2
    style: str = "llama"
    qk_norm: bool = False
    eager: bool = False
    attn_softcap: bool = False


# The tiny families' layers, which benchmarks/vlm_memory.py measures
LAYERS = {"idefics3": Layer(), "qwen2-vl": Layer(), "qwen3-vl": Layer(qk_norm=True), "llava-next": Layer(),
          "gemma3": Layer(norms=4, style="gemma", qk_norm=True),
          "paligemma": Layer(style="gemma"),  # Gemma 1: two norms a layer
          "paligemma2": Layer(norms=4, style="gemma", eager=True, attn_softcap=True)}
# A model's text model by its config's model_type: the layer of the tiny family with that text model (Mistral's layer
# is Llama's; Qwen3's is Qwen3-VL's text layer; Qwen2's (InternVL, LLaVA-OneVision) and Qwen2.5-VL's are Qwen2-VL's)
TEXT_LAYERS = {"llama": LAYERS["idefics3"], "mistral": LAYERS["llava-next"], "qwen2": LAYERS["qwen2-vl"],
               "qwen2_vl_text": LAYERS["qwen2-vl"], "qwen2_5_vl_text": LAYERS["qwen2-vl"],
               "qwen3": LAYERS["qwen3-vl"], "qwen3_vl_text": LAYERS["qwen3-vl"], "gemma3_text": LAYERS["gemma3"],
               "gemma": LAYERS["paligemma"], "gemma2": LAYERS["paligemma2"]}


def head_dim(t: dict) -> int:
    return t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]


def kv_width(t: dict) -> int:
    """The cached keys' (and values') width of a text config: head size x key/value heads (fewer than heads under
    GQA)."""
    return head_dim(t) * t["num_key_value_heads"]


def norm_bytes(width: int, rows: int, style: str, trains: bool, dt: int = BYTES) -> int:
    """Bytes an RMSNorm over `width` features saves per token: its fp32 input (a copy under bf16) and one rsqrt per
    row; with a trained weight also the normalised input, in the training dtype (Llama, Qwen) or fp32 (Gemma
    multiplies in fp32)."""
    return 4 * width + 4 * rows + (width * (dt if style == "llama" else 4) if trains else 0)


def token_bytes(t: dict, lora: LoRA, layer: Layer = Layer(), dt: int = BYTES) -> int:
    """Bytes autograd saves per prompt token and decoder layer (bf16): the RMSNorms (2 a layer; Gemma 2 and 3: 4, and
    q / k norms on the head size in Qwen3 and Gemma 3); attention keeps q and the keys and values repeated to every
    query head (transformers repeats them under an attention mask, which padded batches have), and SDPA also the
    output and an fp32 logsumexp per head (eager keeps per-pair scores instead: pair_bytes); the MLP (SwiGLU /
    GeLU-gated) its gate, up, activation and product, of which frozen weights need only the first three; trained
    linear layers their inputs (o_proj's is SDPA's output, shared; eager's output is copied for it); each LoRA target
    its dropped-out input, dropout's scale and the rank-r projection (a target of another name: not counted)."""
    h, i, heads = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"]
    hq, hkv = head_dim(t) * heads, kv_width(t)
    trains = not lora.r
    norms = layer.norms * norm_bytes(h, 1, layer.style, trains, dt)
    if layer.qk_norm:
        norms += (norm_bytes(hq, heads, layer.style, trains, dt)
                  + norm_bytes(hkv, t["num_key_value_heads"], layer.style, trains, dt))
    attention = dt * 3 * hq + (dt * hq * trains if layer.eager else dt * hq + 4 * heads)
    if lora.r:  # base weights frozen: the linear layers' inputs are not kept; the adapters' are
        inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": hq, "gate_proj": h, "up_proj": h, "down_proj": i}
        adapters = sum(dt * (2 * inputs[m] + lora.r) for m in lora.targets if m in inputs)
        return norms + attention + dt * 3 * i + adapters
    # + the q/k/v and the MLP inputs (the norms' bf16 outputs), the MLP's 4
    return norms + attention + dt * (2 * h + 4 * i)


def pair_bytes(t: dict, layer: Layer, dt: int = BYTES) -> int:
    """Bytes a layer saves per (query, key) pair. SDPA: the attention mask converted to the queries' dtype, once a
    layer (broadcast over the heads). Eager, per head: softmax's fp32 output, the probabilities cast back to the
    training dtype (for their product with the values; the same tensor in fp32) and, under an attention softcap,
    tanh's output."""
    if not layer.eager:
        return dt
    return t["num_attention_heads"] * (4 + (dt if dt != 4 else 0) + (dt if layer.attn_softcap else 0))


def layer_bytes(t: dict, prompt: int, lora: LoRA, layer: Layer, shape: Shape) -> int:
    """Saved bytes per decoder layer of one log-prob pass: the prompt's prefill (images x prompt tokens) and the
    continuation (images*k x caption tokens), whose attention keeps the keys and values of prompt + caption for every
    candidate (the prompt's cache repeated k times), repeated to every query head; and what attention keeps per
    (query, key) pair, the prefill's prompt x prompt and the continuation's caption x (prompt + caption)."""
    dt = shape.dtype_bytes
    per = token_bytes(t, lora, layer, dt)
    kv = head_dim(t) * t["num_attention_heads"]
    images, caption = shape.images, shape.caption
    n = images * shape.k
    tokens = images * prompt * per + n * caption * (per - 2 * kv * dt) + n * (prompt + caption) * 2 * kv * dt
    pairs = images * prompt * prompt + n * caption * (prompt + caption)
    return tokens + pairs * pair_bytes(t, layer, dt)


def activations(t: dict, prompt: int, lora: LoRA, layer: Layer, shape: Shape) -> int:
    return t["num_hidden_layers"] * layer_bytes(t, prompt, lora, layer, shape)


def checkpointed_activations(t: dict, prompt: int, lora: LoRA, layer: Layer, shape: Shape) -> int:
    """The same with captioner.gradient_checkpointing (formula only: what a checkpoint keeps is not a saved tensor):
    each layer keeps its input states and the prompt's keys and values (once per image, and repeated for the k
    candidates, which the continuation's cache holds), and one layer's activations exist at a time in backward."""
    hkv = kv_width(t)
    n = shape.images * shape.k
    tokens = shape.images * prompt + n * shape.caption
    kept = (tokens * t["hidden_size"] + (shape.images + n) * prompt * 2 * hkv) * shape.dtype_bytes
    return t["num_hidden_layers"] * kept + layer_bytes(t, prompt, lora, layer, shape)


def head_bytes(t: dict, lora: LoRA, shape: Shape) -> int:
    """The chunked head's transient: one block of fp32 logits, one fp32 vocabulary slice of the head weight (+ its
    fp32 gradient when the head trains), and the scored tokens' fp32 head rows and state gradients."""
    return BLOCK_BYTES * (2 if lora.r else 3) + 2 * shape.images * shape.k * shape.caption * t["hidden_size"] * 4


def text_layer(model) -> Layer | None:
    """A transformers VLM's text layer (TEXT_LAYERS, with the attention the model was built with); None: a text model
    this formula does not cover."""
    text = model.config.get_text_config()
    if (layer := TEXT_LAYERS.get(text.model_type)) is None:
        return None
    # eager keeps its scores whatever the family (captioner.attn_implementation=eager); Gemma 2 under another
    # attention (flex_attention) keeps none
    eager = text._attn_implementation == "eager"
    return layer._replace(eager=eager, attn_softcap=eager and getattr(text, "attn_logit_softcapping", None) is not None)


def text_config(model) -> dict:
    text = model.config.get_text_config()
    return text.to_dict() | {"head_dim": getattr(text, "head_dim", None)}


def prompt_tokens(captioner, size: tuple[int, int] = (640, 480)) -> int:
    """The prompt's tokens (image tokens, the chat template's and the question's) that the captioner's own
    preprocessing makes of a picture of `size` (COCO's usual 640 x 480)."""
    from PIL import Image

    batch = captioner.preprocess.collate([captioner.preprocess(Image.new("RGB", size))])
    return batch["input_ids"].shape[1] - 1


def run_lora(lora_cfg) -> LoRA:
    """captioner.lora as LoRA (peft's all-linear: the attention's and the MLP's projections)."""
    from .models.lora import ALL_LINEAR, target_modules

    names = target_modules(lora_cfg.target_modules)
    mlp = ("gate_proj", "up_proj", "down_proj")
    return LoRA(lora_cfg.r, LORA_TARGETS + mlp if names == ALL_LINEAR else tuple(names))


class Projection(NamedTuple):
    """A run's log-prob pass per rank: the prompt's tokens (a 640 x 480 picture), and the bytes kept without and with
    gradient checkpointing (the chunked head's blocks included)."""
    prompt_tokens: int
    activations: int
    checkpointed: int

    def as_params(self) -> dict[str, str]:
        """MLflow params beside dico_scale.memory's: memory/log_prob_pass/{prompt_tokens, activations,
        checkpointed_activations} (bytes per rank)."""
        return {"memory/log_prob_pass/prompt_tokens": str(self.prompt_tokens),
                "memory/log_prob_pass/activations": str(self.activations),
                "memory/log_prob_pass/checkpointed_activations": str(self.checkpointed)}


def project(captioner, shape: Shape, lora: LoRA) -> Projection | None:
    """The projection for a captioner this formula covers (hf_vlm, a text model of TEXT_LAYERS); None for another."""
    model = getattr(captioner, "model", None)
    if not hasattr(captioner, "processor") or model is None or (layer := text_layer(model)) is None:
        return None
    t, prompt = text_config(model), prompt_tokens(captioner)
    plain, recomputed = (f(t, prompt, lora, layer, shape) + head_bytes(t, lora, shape)
                         for f in (activations, checkpointed_activations))
    return Projection(prompt, plain, recomputed)


def projection_lines(p: Projection, shape: Shape, lora: LoRA, checkpointing: bool, states: int,
                     device_total: int | None) -> list[str]:
    """Rank 0's start lines: the pass's projected activations, with and without recomputation; and a warning where
    the models' states on the accelerator (`states`) and the activations exceed its memory (`device_total`; None on
    the CPU)."""
    from .memory import human

    kept, other = (p.checkpointed, p.activations) if checkpointing else (p.activations, p.checkpointed)
    dtype = "fp32" if shape.dtype_bytes == 4 else "bf16 / fp16"
    lines = [f"log-prob pass per rank, projected ({shape.images} images x {shape.k} sequences x {shape.caption} "
             f"tokens in {dtype}; a 640 x 480 picture is {p.prompt_tokens} prompt tokens): activations {human(kept)} "
             f"({human(other)} with captioner.gradient_checkpointing={'false' if checkpointing else 'true'})"]
    if device_total is not None and states + kept > device_total:
        lines.append(f"warning: the models' states ({human(states)}) and the log-prob pass's activations "
                     f"({human(kept)}) exceed this GPU's {human(device_total)}: "
                     + ("fewer images per rank (train.micro_batch_size)" if checkpointing else
                        f"captioner.gradient_checkpointing=true ({human(p.checkpointed)}), fewer images per rank "
                        "(train.micro_batch_size)") + (" or LoRA (captioner.lora.r)" if not lora.r else ""))
    return lines
