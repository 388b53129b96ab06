"""Bad captioner input gets one line and exit 2 before any process group starts (dico_scale.train's config check and
preflight, in this process: no launcher): a folder that is not a transformers checkpoint, an unsupported
architecture, no EOS token, captioner.* keys or lengths that contradict the folder, a dico_ref folder with missing
or extra weights (named), processors and chat templates that do not build; Hugging Face weights that do not load are
one ConfigError naming the folder when the row is built; the demo's unknown --captioner."""
import importlib.util
import json
import re

import pytest
import torch

from dico_scale import demo, train
from dico_scale.config import ConfigError, load_config
from dico_scale.models.tiny import dico_ref

BASE = ["--config", "configs/demo/xe.yaml", "evaluator.weights=", "captioner.image_encoder_weights=",
        "tracking.enabled=false"]


def config_folder(root, name, config, tokenizer=None):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return d


def run_train(tmp_path, capsys, *overrides):
    code = train.main(BASE + [f"train.output_dir={tmp_path}/out", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture(scope="module")
def bad_ref(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_ref")
    dico_ref(str(folder), width=16, layers=1, heads=2, image_size=32)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["decoder.transformer.ln_f.bias"]
    state["decoder.transformer.h.5.attn.c_attn.weight"] = torch.zeros(2)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


VED = {"architectures": ["VisionEncoderDecoderModel"], "decoder": {"model_type": "gpt2", "n_positions": 16},
       "encoder": {"model_type": "vit"}}


@pytest.mark.parametrize("model, folder, extra, message", [
    ("hf_encoder_decoder", None, [], "is not a transformers checkpoint folder (no config.json)"),
    ("hf_encoder_decoder", {"architectures": ["T5ForConditionalGeneration"]}, [],
     "architecture T5ForConditionalGeneration is not supported by hf_encoder_decoder"),
    ("hf_encoder_decoder", {**VED, "decoder": {"model_type": "llama"}}, [], "decoder llama is not supported"),
    ("hf_encoder_decoder", VED, [], "neither the model config nor the tokenizer names an EOS token"),
    ("hf_encoder_decoder", {**VED, "eos_token_id": 0}, [], "exceed the decoder's 16 positions"),
    ("hf_encoder_decoder", {**VED, "eos_token_id": 0}, ["captioner.freeze=vision,head", "data.max_caption_tokens=8",
                                                       "generation.max_len=6"], "unknown part(s) head"),
    ("dico_ref", VED, [], "is not a DiCO reference folder"),
    ("builtin", VED, [], "captioner.model=builtin reads no Hugging Face folder"),
])
def test_bad_folders_and_keys_exit_2_with_one_line(tmp_path, capsys, model, folder, extra, message):
    path = config_folder(tmp_path, "m", folder) if folder is not None else tmp_path
    code, err = run_train(tmp_path, capsys, f"captioner.model={model}", f"captioner.hf_path={path}", *extra)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_dico_ref_folder_with_missing_and_extra_keys_names_them(tmp_path, capsys, bad_ref):
    code, err = run_train(tmp_path, capsys, "captioner.model=dico_ref", f"captioner.hf_path={bad_ref}")
    assert code == 2 and len(err) == 1, err
    assert "missing decoder.transformer.ln_f.bias" in err[0] and "extra decoder.transformer.h.5.attn" in err[0]


def test_demo_unknown_captioner(capsys):
    assert demo.main(["--captioner", "t5"]) == 2
    assert "--captioner 't5' is not one of builtin" in capsys.readouterr().err


IDEFICS3 = {"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3"}


@pytest.mark.parametrize("folder, message", [
    (VED, "architecture VisionEncoderDecoderModel is not supported by hf_vlm"),
    ({"architectures": ["MllamaForConditionalGeneration"]}, "architecture MllamaForConditionalGeneration is not "
     "supported by hf_vlm (Idefics3ForConditionalGeneration"),
    (IDEFICS3, "has no processor (processor_config.json or preprocessor_config.json)"),
])
def test_bad_vlm_folders_exit_2_with_one_line(tmp_path, capsys, folder, message):
    path = config_folder(tmp_path, "m", folder)
    code, err = run_train(tmp_path, capsys, "captioner.model=hf_vlm", f"captioner.hf_path={path}")
    assert code == 2 and len(err) == 1 and message in err[0] and "captioner.hf_path" in err[0], err


def _copy(folder, tmp_path, drop=()):
    import shutil

    out = tmp_path / "vlm"
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns(*drop))
    return out


@pytest.mark.parametrize("family, drop, prompt, message", [
    ("idefics3", (), "<image>Describe this image.", "captioner.prompt: holds the image token <image>"),
    ("idefics3", ("chat_template*",), "Describe this image.",
     "captioner.prompt: '{path}' has no chat template, so the prompt must hold the image placeholder <image>"),
    ("qwen2-vl", ("tokenizer*",), "Describe this image.", "its tokenizer does not know the image token <|image_pad|>"),
    ("paligemma", (), "caption en", "captioner.prompt: '{path}' has no chat template, so the prompt must hold"),
    ("paligemma", (), "<image><image>caption en", "captioner.prompt: the processor of '{path}' refuses "
                                                  "'<image><image>caption en' (ValueError: "),
])
def test_bad_vlm_prompts_and_processors_exit_2_with_one_line(tmp_path, capsys, vlm_folders, family, drop, prompt,
                                                             message):
    path = _copy(vlm_folders[family], tmp_path, drop)
    code, err = run_train(tmp_path, capsys, "captioner.model=hf_vlm", f"captioner.hf_path={path}",
                          f"captioner.prompt={prompt}")
    assert code == 2 and len(err) == 1 and message.format(path=path) in err[0], err


@pytest.mark.parametrize("options, message", [
    (["captioner.images_kwargs.max_pixel=100"], "captioner.images_kwargs: max_pixel not among the options of "
                                                "Gemma3ImageProcessor (crop_size, "),
    (["captioner.images_kwargs.do_pan_and_scan=true", "captioner.images_kwargs.pan_and_scan_max_num_crops=abc"],
     "the processor of '{path}' refuses them (StrictDataclassFieldValidationError"),
])
def test_bad_image_options_exit_2_with_one_line(tmp_path, capsys, vlm_folders, options, message):
    """captioner.images_kwargs: a key the folder's image processor does not take, a value its processor refuses (on
    one picture in preflight, not in a data worker); on a row without a processor."""
    path = vlm_folders["gemma3"]
    code, err = run_train(tmp_path, capsys, "captioner.model=hf_vlm", f"captioner.hf_path={path}", *options)
    assert code == 2 and len(err) == 1 and message.format(path=path) in err[0], err
    code, err = run_train(tmp_path, capsys, "captioner.images_kwargs.max_pixels=4")
    assert code == 2 and len(err) == 1 and "processor (hf_vlm), not captioner.model=builtin" in err[0], err


@pytest.mark.parametrize("model, name, message", [
    ("hf_vlm", "bogus", 'captioner.attn_implementation=bogus: ValueError: Specified `attn_implementation="bogus"` is '
                        'not supported'),
    ("hf_vlm", "flash_attention_2", "captioner.attn_implementation=flash_attention_2: ImportError: FlashAttention2 has "
                                    "been toggled on, but it cannot be used"),
    ("builtin", "eager", "bad value for config key 'captioner.attn_implementation': sets the attention of a "
                         "transformers row (hf_encoder_decoder, hf_vlm), not captioner.model=builtin"),
])
def test_an_attention_the_model_or_machine_lacks_exits_2_with_one_line(tmp_path, capsys, vlm_folders, model, name,
                                                                        message):
    """captioner.attn_implementation: an unknown name, one whose package is not installed (no flash-attn here), a row
    that is not transformers': one line from the config check or preflight."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn is installed here")
    folder = [f"captioner.hf_path={vlm_folders['qwen2-vl']}"] if model != "builtin" else []
    code, err = run_train(tmp_path, capsys, f"captioner.model={model}", *folder, f"captioner.attn_implementation={name}")
    assert code == 2 and len(err) == 1 and message in err[0], err



@pytest.mark.parametrize("stage", ["xe", "dico"])
def test_flex_attention_does_not_train_on_the_cpu(tmp_path, capsys, vlm_folders, stage):
    """PyTorch's FlexAttention has no backward on the CPU (NotImplementedError at the first step): a run that trains
    the captioner there with it is one line in preflight. PaliGemma 2 is where a user reaches for it (its Gemma 2
    keeps every layer's attention scores under eager attention). The evaluator's stage builds no captioner."""
    from dico_scale.config import load_config
    from dico_scale.models.tiny_vlm import prompt_overrides
    from dico_scale.preflight import check_flex_on_cpu

    overrides = ["captioner.model=hf_vlm", f"captioner.hf_path={vlm_folders['paligemma2']}",
                 *prompt_overrides("paligemma2"), "captioner.attn_implementation=flex_attention", "train.device=cpu"]
    code, err = run_train(tmp_path, capsys, *overrides, f"train.stage={stage}")
    assert code == 2 and err == ["dico_scale: config error: captioner.attn_implementation=flex_attention: PyTorch's "
                                 "FlexAttention has no backward on the CPU, where this run trains (train.device=cpu); "
                                 "sdpa or eager train here"], err
    check_flex_on_cpu(load_config(BASE[1], BASE[2:] + overrides + ["train.stage=evaluator"]))


def test_a_checkpoint_read_elsewhere_chooses_its_attention_again(tmp_path, vlm_folders):
    """A run trained with flash-attn on a GPU is evaluated, captioned or exported on a machine without it: the
    checkpoint's config reads back with transformers' choice, or the one the user's override names."""
    from dico_scale.config import load_config, to_yaml
    from dico_scale.export import load_run_config

    cfg = load_config("configs/demo/xe.yaml", BASE[2:] + ["captioner.model=hf_vlm", "train.init_from=",
                                                          f"captioner.hf_path={vlm_folders['qwen2-vl']}"])
    cfg.captioner.attn_implementation = "flash_attention_2"  # as a GPU run records it (no load here: not installed)
    meta = {"config": to_yaml(cfg), "path": str(tmp_path)}
    assert load_run_config(meta).captioner.attn_implementation == ""
    assert load_run_config(meta, ["captioner.attn_implementation=eager"]).captioner.attn_implementation == "eager"


def test_image_options_the_model_would_not_read_exit_2_with_one_line(tmp_path, capsys, vlm_folders):
    """An image option the model's config.json holds too (LLaVA-NeXT's tile grids, Qwen-VL's patch size, InternVL's
    tokens a tile), set by captioner.images_kwargs or in the folder's processor file, with another value than the
    model's: one line in preflight, not a traceback from inside the model at the first batch."""
    path = vlm_folders["llava-next"]
    code, err = run_train(tmp_path, capsys, "captioner.model=hf_vlm", f"captioner.hf_path={path}",
                          "captioner.images_kwargs.image_grid_pinpoints=[[32,32],[32,96]]")
    assert code == 2 and len(err) == 1, err
    assert (f"captioner.images_kwargs.image_grid_pinpoints=[[32, 32], [32, 96]] differs from the model's "
            f"image_grid_pinpoints [[32, 64], [64, 32], [64, 64]] in '{path}/config.json'") in err[0], err
    path = _copy(vlm_folders["qwen2-vl"], tmp_path / "q")
    _edit_json(path / "processor_config.json", lambda d: d["image_processor"].update(patch_size=8))
    code, err = run_train(tmp_path, capsys, "captioner.model=hf_vlm", f"captioner.hf_path={path}")
    assert code == 2 and len(err) == 1, err
    assert (f"captioner.hf_path '{path}': its processor's patch_size 8 differs from the model's "
            "vision_config.patch_size 4") in err[0], err
    path = _copy(vlm_folders["internvl"], tmp_path / "i")  # a processor-level option: its image tokens a tile
    _edit_json(path / "processor_config.json", lambda d: d.update(image_seq_length=16))
    code, err = run_train(tmp_path, capsys, "captioner.model=hf_vlm", f"captioner.hf_path={path}")
    assert code == 2 and len(err) == 1, err
    assert "its processor's image_seq_length 16 differs from the model's image_seq_length 4" in err[0], err


@pytest.mark.parametrize("family, processor, option, message", [
    ("idefics3", {"image_seq_len": 9}, None, "its processor's image_seq_len 9 differs from the model's "
     "(vision_config.image_size // patch_size) ** 2 / scale_factor ** 2 4"),
    ("gemma3", {"image_seq_length": 16}, None, "its processor's image_seq_length 16 differs from the model's "
     "mm_tokens_per_image 4"),
    ("qwen2-vl", {}, "merge_size=1", "captioner.images_kwargs.merge_size=1 differs from the model's "
     "vision_config.spatial_merge_size 2"),
])
def test_image_options_the_model_spells_another_way(tmp_path, capsys, vlm_folders, family, processor, option,
                                                    message):
    """The same for options the model's config.json names differently: the image tokens a tile of Idefics3 /
    SmolVLM (derived from the vision config) and Gemma 3, Qwen-VL's merge size."""
    path = _copy(vlm_folders[family], tmp_path)
    _edit_json(path / "processor_config.json", lambda d: d.update(processor))
    extra = [f"captioner.images_kwargs.{option}"] if option else []
    code, err = run_train(tmp_path, capsys, "captioner.model=hf_vlm", f"captioner.hf_path={path}", *extra)
    assert code == 2 and len(err) == 1 and message in err[0] and f"'{path}/config.json'" in err[0], err


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_processors_and_templates_that_do_not_build_exit_2_with_one_line(tmp_path, capsys, vlm_folders):
    """A tokenizer without the tokens its processor names (Gemma 3's boi / eoi / image tokens), a chat template that
    does not render: one line, exit 2, in preflight."""
    path = _copy(vlm_folders["gemma3"], tmp_path)
    _edit_json(path / "tokenizer_config.json", lambda d: [d.pop(k) for k in ("boi_token", "eoi_token", "image_token")])
    code, err = run_train(tmp_path, capsys, "captioner.model=hf_vlm", f"captioner.hf_path={path}")
    assert code == 2 and len(err) == 1 and "no processor that AutoProcessor reads" in err[0] and "boi_token" in err[0]
    path = _copy(vlm_folders["qwen3-vl"], tmp_path / "q")
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }")
    code, err = run_train(tmp_path, capsys, "captioner.model=hf_vlm", f"captioner.hf_path={path}")
    assert code == 2 and len(err) == 1 and "its chat template does not render" in err[0], err


@pytest.mark.parametrize("family, row", [("gemma3", "hf_vlm"), ("vit-gpt2", "hf_encoder_decoder")])
def test_weights_that_do_not_load_are_one_config_error(tmp_path, vlm_folders, family, row):
    """Truncated weights, and weights of other shapes than config.json says: a ConfigError naming the folder, which
    train.py prints as one line with exit 2 (every rank raises it while building)."""
    from dico_scale.config import ConfigError, load_config
    from dico_scale.models import build_captioner
    from dico_scale.models.tiny import write

    folder = vlm_folders[family] if family in vlm_folders else write(family, str(tmp_path / family))
    cut, wide = _copy(folder, tmp_path / "cut"), _copy(folder, tmp_path / "wide")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:3000])
    key = "text_config" if row == "hf_vlm" else "decoder"
    _edit_json(wide / "config.json", lambda d: d[key].update({"hidden_size" if row == "hf_vlm" else "n_embd": 48}))
    for path, why in ((cut, "SafetensorError"), (wide, "RuntimeError")):
        cfg = load_config("configs/demo/xe.yaml", BASE[2:] + [f"captioner.model={row}", f"captioner.hf_path={path}"])
        with pytest.raises(ConfigError, match=rf"captioner.hf_path '{path}': its weights do not load \({why}"):
            build_captioner(cfg)


def test_a_raw_prompt_with_the_placeholder_builds(tmp_path, vlm_folders):
    """Without a chat template the prompt is used as written, image placeholder included."""
    from dico_scale.config import load_config
    from dico_scale.models import build_captioner

    path = _copy(vlm_folders["idefics3"], tmp_path, ("chat_template*",))
    cfg = load_config("configs/demo/xe.yaml", BASE[2:] + ["captioner.model=hf_vlm", f"captioner.hf_path={path}",
                                                           "captioner.prompt=<image>A photo of"])
    cap = build_captioner(cfg)
    assert cap.text == "<image>A photo of" and cap.tokenizer.tok.decode([cap.tokenizer.bos]).strip() == "of"


def _softcapped_paligemma(vlm_folders, tmp_path, text_config: dict, drop=(), family="paligemma"):
    path = _copy(vlm_folders[family], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(text_config)
    for key in drop:
        config["text_config"].pop(key, None)
    (path / "config.json").write_text(json.dumps(config))
    return path, ["captioner.model=hf_vlm", f"captioner.hf_path={path}", "captioner.prompt=<image>caption en"]


def test_a_text_models_default_softcap_is_read_from_its_resolved_config(tmp_path, vlm_folders):
    """PaliGemma 2's text model is a Gemma 2, which softcaps its logits (30.0) by default: a config.json that leaves
    the value out gets it too (the model's forward applies it, so must the log-prob heads)."""
    from dico_scale.models import build_captioner

    path, overrides = _softcapped_paligemma(vlm_folders, tmp_path, {}, drop=("final_logit_softcapping",),
                                            family="paligemma2")
    assert "final_logit_softcapping" not in (path / "config.json").read_text()
    assert build_captioner(load_config("configs/demo/xe.yaml", BASE[2:] + overrides)).logit_softcap == 30.0
    plain = ["captioner.model=hf_vlm", f"captioner.hf_path={vlm_folders['paligemma']}", "captioner.prompt=<image>x"]
    assert build_captioner(load_config("configs/demo/xe.yaml", BASE[2:] + plain)).logit_softcap is None


@pytest.mark.parametrize("value,why", [(-1.0, "must be None or a positive number"), (0, "must be None or a positive"),
                                       ("30", "must be None or a positive"), (1e6, "must be at most 10000")])
def test_a_softcap_that_is_not_a_positive_number_exits_2_with_one_line(tmp_path, capsys, vlm_folders, value, why):
    """In preflight and wherever the captioner is built (evaluate, caption)."""
    from dico_scale.models import build_captioner

    path, overrides = _softcapped_paligemma(vlm_folders, tmp_path, {"final_logit_softcapping": value})
    code, err = run_train(tmp_path, capsys, *overrides)
    want = f"final_logit_softcapping={value!r} in its text config: {why}"
    assert code == 2 and len(err) == 1 and want in err[0] and str(path) in err[0], err
    with pytest.raises(ConfigError, match=re.escape(want)):
        build_captioner(load_config("configs/demo/xe.yaml", BASE[2:] + overrides))