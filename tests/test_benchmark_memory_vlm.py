"""benchmarks/vlm_memory.py: the activation formula holds on a tiny model, and the projections order as they must."""
import sys

import pytest

from dico_scale.activations import BLOCK_BYTES, LAYERS, LoRA, Shape, activations

sys.path.insert(0, "benchmarks")
vlm_memory = pytest.importorskip("vlm_memory")


def test_activation_formula_matches_what_autograd_saves_on_tiny_gqa_models():
    """Qwen2-VL's layer, Gemma 3's (four norms computed in fp32, q / k norms, head size apart from the width) and
    PaliGemma 2's (Gemma 2: eager attention, whose scores are saved per head, a softcap's tanh among them), all with 2
    key/value heads under 4 query heads: the saved keys and values are the repeated ones, each SDPA layer keeps its
    copy of the mask; and Qwen2-VL built with eager attention (captioner.attn_implementation=eager), its scores."""
    for row in vlm_memory.validate(families=("qwen2-vl", "gemma3", "paligemma2", "qwen2-vl:eager")):
        assert 0.97 <= row["measured_over_formula"] <= 1.03, row


def test_the_formula_holds_in_fp32_too():
    """A CPU run trains in fp32: the bf16 tensors double, the fp32 ones stay (eager's probabilities are softmax's
    output itself)."""
    for row in vlm_memory.validate(families=("qwen3-vl", "paligemma2"), fp32=True):
        assert 0.97 <= row["measured_over_formula"] <= 1.03, row


def test_projections_of_a_7b_captioner():
    spec = vlm_memory.MODELS["Qwen2-VL-7B-like"]
    c = vlm_memory.counts(spec)
    assert 8.0e9 < c["total"] < 8.6e9 and 0.6e9 < c["vision"] < 0.7e9 and 9e6 < c["lora"] < 11e6

    def peak(**kw):
        return vlm_memory.project("q", spec, c, **kw)

    full = peak(lora=False, separate_reference=True, zero=2, world=8)
    lora = peak(lora=True, separate_reference=True, zero=2, world=8)
    off = peak(lora=True, separate_reference=False, zero=2, world=8)
    z3 = peak(lora=False, separate_reference=True, zero=3, world=8)
    z3_64 = peak(lora=False, separate_reference=True, zero=3, world=64)
    assert off["reference"] == 0 < lora["reference"] == full["reference"]
    assert lora["captioner_states"] < full["captioner_states"] and off["peak"] < lora["peak"] < full["peak"]
    assert z3_64["captioner_states"] < z3["captioner_states"] < full["captioner_states"]
    assert z3["generation"] > full["generation"]  # ZeRO-3 gathers the whole captioner for beam search
    # the tightest setting: a full fine-tune under ZeRO-2 on one node fits 141 GB, not 80 (BENCHMARKS.md)
    assert not full["fits"]["80 GB"] and full["fits"]["141 GB"] and z3["fits"]["80 GB"]
    recomputed = peak(lora=False, separate_reference=True, zero=3, world=8, checkpointing=True)
    assert recomputed["training"] < z3["training"] / 3 and recomputed["captioner_states"] == z3["captioner_states"]


def test_a_long_prompt_needs_recomputation():
    """LLaVA-NeXT-7B: 2,340 image tokens for a COCO picture (anyres tiles), so the log-prob pass of 8 images x 5
    candidates does not fit even a 141 GB GPU without gradient checkpointing, and fits 80 GB with it; what
    configs/llava_next sets."""
    spec = vlm_memory.MODELS["LLaVA-NeXT-7B-like"]
    c = vlm_memory.counts(spec)
    assert 7.4e9 < c["total"] < 7.7e9 and 0.29e9 < c["vision"] < 0.32e9
    plain = vlm_memory.project("n", spec, c, lora=True, separate_reference=False, zero=3, world=8)
    recomputed = vlm_memory.project("n", spec, c, lora=True, separate_reference=False, zero=3, world=8,
                                    checkpointing=True)
    assert not plain["fits"]["141 GB"] and recomputed["fits"]["80 GB"]


def test_paligemma2_at_448_needs_recomputation():
    """PaliGemma 2 runs eager attention (its attention softcap has no SDPA path), which saves every layer's scores:
    at 448 pixels (1,024 image tokens) the 10B's log-prob pass fits no GPU without gradient checkpointing, not even
    with LoRA on 141 GB, and fits 80 GB with it under ZeRO-3; the 3B at 224 fits 80 GB in every setting."""
    def rows(name, **kw):
        spec = vlm_memory.MODELS[name]
        c = vlm_memory.counts(spec)
        return [vlm_memory.project(name, spec, c, lora=lora, separate_reference=not lora, zero=zero, world=8, **kw)
                for lora in (False, True) for zero in (2, 3)]
    assert not any(r["fits"]["141 GB"] for r in rows("PaliGemma-2-10B-448-like"))
    assert all(r["fits"]["80 GB"] for r in rows("PaliGemma-2-10B-448-like", checkpointing=True) if r["zero"] == 3)
    assert all(r["fits"]["80 GB"] for r in rows("PaliGemma-2-3B-224-like"))


@pytest.mark.parametrize("family", ["qwen2-vl", "paligemma2"])
def test_a_model_folder_is_projected_with_its_family_layer_and_prompt(vlm_folders, family):
    """--folder: a user's folder counts as its text model's family (Gemma 2: eager attention, the scores), its
    parameters are the loaded model's, and its prompt is what hf_vlm's preprocessing makes of a 640 x 480 picture."""
    from PIL import Image

    from dico_scale.config import load_config
    from dico_scale.models import build_captioner
    from dico_scale.models.tiny_vlm import FAMILY_PROMPTS, prompt_overrides

    folder = vlm_folders[family]
    prompt = FAMILY_PROMPTS.get(family, "Describe this image in one sentence.")
    spec = vlm_memory.folder_spec(folder, prompt)
    assert spec["layer"] == LAYERS[family]
    cfg = load_config("configs/demo/xe.yaml", ["captioner.model=hf_vlm", f"captioner.hf_path={folder}",
                                               "evaluator.weights=", "captioner.image_encoder_weights=",
                                               *prompt_overrides(family)])
    cap = build_captioner(cfg)
    batch = cap.preprocess.collate([cap.preprocess(Image.new("RGB", (640, 480)))])
    assert spec["prompt_tokens"] == batch["input_ids"].shape[1] - 1
    assert vlm_memory.counts(spec)["total"] == sum(p.numel() for p in cap.model.parameters())
    rows = vlm_memory.table(family, spec, shape=Shape(2, 3, 10))
    t = cap.model.config.get_text_config().to_dict()
    full = next(r for r in rows if not r["lora"] and r["zero"] == 2 and r["world"] == 8 and not r["checkpointing"])
    saved = activations(t, spec["prompt_tokens"], LoRA(), LAYERS[family], Shape(2, 3, 10))
    # + the chunked head's blocks and the 2 x 3 x 10 scored tokens' fp32 rows and gradients
    assert full["training"] == saved + 3 * BLOCK_BYTES + 2 * (2 * 3 * 10) * t["hidden_size"] * 4
    # the LoRA rows at the user's rank and targets (--lora-r, --lora-targets)
    adapters = LoRA(8, ("q_proj", "down_proj"))
    lora = next(r for r in vlm_memory.table(family, spec, shape=Shape(2, 3, 10), adapters=adapters)
                if r["lora"] and r["zero"] == 2 and r["world"] == 8 and not r["checkpointing"])
    assert lora["training"] == (activations(t, spec["prompt_tokens"], adapters, LAYERS[family], Shape(2, 3, 10))
                                + 2 * BLOCK_BYTES + 2 * (2 * 3 * 10) * t["hidden_size"] * 4)
    text = cap.model.model.language_model
    assert lora["counts"]["lora"] == sum(8 * (m.in_features + m.out_features) for name, m in text.named_modules()
                                         if name.endswith(("q_proj", "down_proj")))


def test_a_folder_without_a_layer_formula_is_one_line(tmp_path, vlm_folders, capsys):
    """A text model whose layer the check does not measure (a LLaVA on Phi-3), or no model folder: exit 2, one line."""
    import json
    import shutil

    import memory  # benchmarks/memory.py, the command

    folder = tmp_path / "llava-phi3"
    shutil.copytree(vlm_folders["llava"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["model_type"] = "phi3"
    (folder / "config.json").write_text(json.dumps(config))
    for path, message in ((folder, "its text model 'phi3' has no layer formula here"),
                          (tmp_path / "none", "is not a transformers checkpoint folder (no config.json)")):
        assert memory.main(["--vlm", "--folder", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    for flag in ("--images", "--candidates", "--caption-tokens", "--lora-r"):  # a batch of nothing projects nothing
        assert memory.main(["--vlm", "--folder", str(vlm_folders["llava"]), flag, "0"]) == 2
        assert capsys.readouterr().err.strip() == f"memory.py: error: {flag} 0 must be at least 1"
    # the measured run's config, before the 2-rank job starts (each rank printed a traceback)
    for args, message in ((["--config", str(tmp_path / "none.yaml")], f"config file not found: {tmp_path}/none.yaml"),
                          (["--json", str(tmp_path)], f"--json '{tmp_path}' is a folder; name the file to write")):
        with pytest.raises(SystemExit) as e:
            memory.main(args)
        assert e.value.code == 2 and capsys.readouterr().err == f"memory.py: error: {message}\n"
