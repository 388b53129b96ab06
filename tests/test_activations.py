"""dico_scale.activations: the log-prob pass's activation formula, family by family (what autograd really saves is
measured against it in tests/test_benchmark_memory_vlm.py)."""
import json
from pathlib import Path

import pytest
import torch

from dico_scale.activations import (LAYERS, LORA_TARGETS, Layer, LoRA, Shape, layer_bytes, text_layer,
                                    token_bytes)
from dico_scale.models.tiny_vlm import VLM_FAMILIES

QWEN2_VL_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4)
GEMMA2_9B = dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=256)


def test_the_layer_formula_follows_each_family():
    """Gemma 3's layer keeps more than a Llama-style layer of the same sizes (four norms, fp32 normalised inputs,
    q / k norms), Qwen3-VL's more than Qwen2-VL's (q / k norms); GQA's keys and values are saved repeated, so fewer
    key/value heads save nothing in the log-prob pass."""
    t, shape = QWEN2_VL_7B, Shape()
    llama, qwen3, gemma = (layer_bytes(t, 416, LoRA(), LAYERS[f], shape) for f in ("qwen2-vl", "qwen3-vl", "gemma3"))
    assert llama < qwen3 < gemma
    assert layer_bytes({**t, "num_key_value_heads": 28}, 416, LoRA(), LAYERS["qwen2-vl"], shape) == llama


def test_eager_attention_counts_the_prompt_squared():
    """Gemma 2's eager attention keeps every layer's scores: its layer grows with the prompt faster than the same
    sizes under SDPA (Gemma 1's layer, PaliGemma's)."""
    lora = LoRA(16)
    eager, sdpa = ([layer_bytes(GEMMA2_9B, p, lora, LAYERS[f], Shape()) for p in (256, 1024)]
                   for f in ("paligemma2", "paligemma"))
    assert eager[1] / eager[0] > 1.2 * sdpa[1] / sdpa[0]


def test_lora_targets_count_by_their_inputs():
    """Each LoRA target keeps its dropped-out input and its rank-r projection: MLP targets count too (down_proj's
    input is the MLP's width), a name the formula does not know counts nothing; no adapters (r = 0): the text model
    trains and keeps its linear layers' inputs."""
    t, layer = QWEN2_VL_7B, Layer()
    attn = token_bytes(t, LoRA(16), layer)
    assert token_bytes(t, LoRA(16, LORA_TARGETS + ("gate_proj",)), layer) == attn + 2 * (2 * 3584 + 16)
    assert token_bytes(t, LoRA(16, LORA_TARGETS + ("down_proj",)), layer) == attn + 2 * (2 * 18944 + 16)
    assert token_bytes(t, LoRA(16, LORA_TARGETS + ("lm_head",)), layer) == attn
    assert token_bytes(t, LoRA(), layer) > attn - 4 * 2 * (2 * 3584 + 16)  # the full layer's inputs and norms


@pytest.mark.parametrize("family, attention, want", [
    ("qwen2-vl", "", LAYERS["qwen2-vl"]), ("gemma3", "", LAYERS["gemma3"]), ("paligemma2", "", LAYERS["paligemma2"]),
    ("idefics3", "eager", Layer(eager=True)), ("paligemma2", "flex_attention", LAYERS["paligemma"]._replace(norms=4)),
])
def test_a_model_is_counted_as_its_text_models_family(vlm_folders, family, attention, want):
    """text_layer reads the layer off a built model: its text model's type, and the attention it was built with
    (eager keeps the scores whatever the family; Gemma 2 under another attention keeps none)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(vlm_folders[family])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    if attention:  # as captioner.attn_implementation sets it (flex_attention: a CUDA run; transformers refuses sdpa)
        model.config.get_text_config()._attn_implementation = attention
    assert text_layer(model) == want


def test_a_text_model_without_a_formula_is_none(vlm_folders, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = json.loads((Path(vlm_folders["llava"]) / "config.json").read_text())
    config["text_config"]["model_type"] = "phi3"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tmp_path))
    assert text_layer(model) is None


def captioner(folder: str, *overrides):
    from dico_scale.config import load_config
    from dico_scale.models import build_captioner
    from dico_scale.models.tiny_vlm import prompt_overrides

    cfg = load_config("configs/demo/dico.yaml", ["captioner.model=hf_vlm", f"captioner.hf_path={folder}",
                                                 "evaluator.weights=", "captioner.image_encoder_weights=",
                                                 "train.init_from=", *prompt_overrides(Path(folder).name),
                                                 *overrides])
    return cfg, build_captioner(cfg)


def test_the_start_line_and_its_warning(vlm_folders):
    """Rank 0's start lines: the projected activations with and without recomputation at the stage's shape, the
    prompt's tokens for a 640 x 480 picture, and their MLflow params; a warning only where states + activations
    exceed the GPU, naming the remedies this run has not taken; no projection for a captioner the formula does not
    cover (the built-in one)."""
    from dico_scale.activations import (Projection, activations, checkpointed_activations, head_bytes, project,
                                        projection_lines, prompt_tokens, run_lora, text_config)
    from dico_scale.config import load_config
    from dico_scale.memory import human
    from dico_scale.models import build_captioner

    cfg, cap = captioner(vlm_folders["paligemma2"], "captioner.lora.r=8", "captioner.lora.target_modules=all-linear")
    lora, shape = run_lora(cfg.captioner.lora), Shape(4, 5, 21)
    assert lora == LoRA(8, LORA_TARGETS + ("gate_proj", "up_proj", "down_proj"))
    t, prompt = text_config(cap.model), prompt_tokens(cap)
    plain = activations(t, prompt, lora, LAYERS["paligemma2"], shape) + head_bytes(t, lora, shape)
    recomputed = checkpointed_activations(t, prompt, lora, LAYERS["paligemma2"], shape) + head_bytes(t, lora, shape)
    p = project(cap, shape, lora)
    assert p == Projection(prompt, plain, recomputed) and recomputed < plain
    assert p.as_params() == {"memory/log_prob_pass/prompt_tokens": str(prompt),
                             "memory/log_prob_pass/activations": str(plain),
                             "memory/log_prob_pass/checkpointed_activations": str(recomputed)}
    lines = projection_lines(p, shape, lora, False, states=10 << 20, device_total=None)
    assert lines == [f"log-prob pass per rank, projected (4 images x 5 sequences x 21 tokens in bf16 / fp16; a 640 x "
                     "480 picture is "
                     f"{prompt} prompt tokens): activations {human(plain)} ({human(recomputed)} with "
                     "captioner.gradient_checkpointing=true)"]
    assert projection_lines(p, shape, lora, False, states=0, device_total=plain) == lines  # fits exactly
    warned = projection_lines(p, shape, lora, False, states=1, device_total=plain)
    assert len(warned) == 2 and warned[1].startswith("warning: the models' states (1 B) and the log-prob pass's")
    assert "captioner.gradient_checkpointing=true" in warned[1] and "LoRA" not in warned[1]
    checkpointed = projection_lines(p, shape, lora, True, states=1, device_total=recomputed)
    assert checkpointed[0].endswith(f"activations {human(recomputed)} ({human(plain)} with "
                                    "captioner.gradient_checkpointing=false)")
    assert checkpointed[1].endswith(f"exceed this GPU's {human(recomputed)}: fewer images per rank "
                                    "(train.micro_batch_size)")
    assert projection_lines(p, shape, LoRA(), False, states=1, device_total=1)[1].endswith(
        "or LoRA (captioner.lora.r)")  # a full fine-tune is told of adapters too
    builtin = build_captioner(load_config("configs/demo/dico.yaml", ["evaluator.weights=", "train.init_from=",
                                                                     "captioner.image_encoder_weights="]))
    assert project(builtin, shape, LoRA()) is None


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_every_vlm_family_is_projected(vlm_folders, family):
    """Every hf_vlm family's run logs its projection at start (a failure there would stop the run): its text model
    has a layer, its processor makes prompt tokens of a 640 x 480 picture, the bytes are positive and recomputation
    keeps less at a real batch."""
    from dico_scale.activations import project

    _, cap = captioner(vlm_folders[family])
    p = project(cap, Shape(8, 5, 31), LoRA())
    assert p is not None and p.prompt_tokens > 0 and 0 < p.checkpointed < p.activations, p
