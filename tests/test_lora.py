"""LoRA adapters through peft (models/lora.py) on the vision-language row: only the adapters train, none sits in the
frozen tower; with its adapters disabled the policy's log-probs equal those of a separate frozen copy of the
starting captioner (DiCO's reference without a second copy of the weights); the merged export gives the adapted
captioner's log-probs with the plain model's keys; bad LoRA keys are one line."""
import os

import pytest
import torch

from dico_scale.config import ConfigError, load_config
from dico_scale.models import build_captioner
from dico_scale.models.lora import adapters_disabled, merged_state
from dico_scale.models.tiny_vlm import prompt_overrides

BLANK = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]
CAPTIONS = ["a red circle at the top", "two shapes: a blue star and a small green square"]


def config(folder, *extra):
    prompt = prompt_overrides(os.path.basename(folder))  # conftest's vlm_folders: a folder per family, named by it
    return load_config("configs/demo/dico.yaml", BLANK + ["captioner.model=hf_vlm", f"captioner.hf_path={folder}",
                                                          *prompt, *extra])


def adapted(folder, *extra):
    cap = build_captioner(config(folder, "captioner.lora.r=4", *extra)).eval()
    with torch.no_grad():  # adapters that change the outputs (peft starts lora_B at zero)
        g = torch.Generator().manual_seed(1)
        for name, p in cap.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return cap


def logprobs(cap, folder_images):
    tokens = cap.tokenizer.batch(CAPTIONS, 40)
    with torch.no_grad():
        return cap(tokens, pixels=folder_images(cap), output="logprobs", kernel="torch")


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    ims = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in [(64, 64), (64, 20)]]
    return lambda cap: cap.preprocess.collate([cap.preprocess(im) for im in ims])


@pytest.mark.parametrize("family", ["idefics3", "qwen2-vl", "qwen3-vl", "gemma3", "llava-next", "llava-onevision",
                                    "internvl", "paligemma"])
def test_adapters_disabled_equal_a_separate_frozen_copy(vlm_folders, images, family):
    folder = vlm_folders[family]
    cap, plain = adapted(folder), build_captioner(config(folder)).eval()
    with adapters_disabled(cap):
        reference = logprobs(cap, images)
    torch.testing.assert_close(reference, logprobs(plain, images), rtol=0, atol=1e-5)
    assert (logprobs(cap, images) - reference).abs().max() > 1e-3  # the adapters are back, and they matter

    trainable = [n for n, p in cap.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any("vision" in n or "visual" in n for n in trainable)  # captioner.freeze=vision: no adapter there


def test_the_merged_state_is_the_adapted_captioner_with_plain_keys(vlm_folders, images, recwarn):
    folder = vlm_folders["idefics3"]
    cap, plain = adapted(folder), build_captioner(config(folder))
    # peft's read of transformers' deprecated alias, one FutureWarning per rank and run, is not shown
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]
    merged = merged_state(cap, {k: v.clone() for k, v in cap.state_dict().items()})
    assert merged.keys() == plain.state_dict().keys()
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(logprobs(plain.eval(), images), logprobs(cap, images), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family, name", [("idefics3", "connector"), ("llava-next", "multi_modal_projector")])
def test_modules_to_save_train_whole_beside_the_adapters(vlm_folders, images, family, name):
    """captioner.lora.modules_to_save: the projector trains whole (peft's copy; no adapter inside it), its starting
    copy is what the adapter-disabled reference runs (equal to a plain captioner although the trained copy moved), and
    the merged state is the trained captioner with the plain model's keys."""
    folder = vlm_folders[family]
    cap, plain = adapted(folder, f"captioner.lora.modules_to_save={name}"), build_captioner(config(folder)).eval()
    trainable = [n for n, p in cap.named_parameters() if p.requires_grad]
    whole = [n for n in trainable if ".lora_" not in n]
    assert whole and all(f".{name}.modules_to_save.default." in n for n in whole)
    assert not any(f".{name}." in n for n in trainable if ".lora_" in n)  # no adapter inside the saved module
    with torch.no_grad():  # the trained copy moves (the adapters already do)
        g = torch.Generator().manual_seed(2)
        for n, p in cap.named_parameters():
            if n in whole:
                p.add_(torch.randn(p.shape, generator=g))
    with adapters_disabled(cap):
        reference = logprobs(cap, images)
    torch.testing.assert_close(reference, logprobs(plain, images), rtol=0, atol=1e-5)
    merged = merged_state(cap, {k: v.clone() for k, v in cap.state_dict().items()})
    assert merged.keys() == plain.state_dict().keys()
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(logprobs(plain, images), logprobs(cap, images), rtol=0, atol=1e-4)
    with torch.no_grad():  # adapters back at zero: the trained copy alone changes the outputs
        for n, p in cap.named_parameters():
            if ".lora_B" in n:
                p.zero_()
    assert (logprobs(cap, images) - reference).abs().max() > 1e-3


def test_bad_lora_keys_are_one_line(vlm_folders):
    with pytest.raises(ConfigError, match=r"'captioner.lora.target_modules': nope, qkv match no linear layer of "
                                          r"Idefics3ForConditionalGeneration outside its frozen parts"):
        build_captioner(config(vlm_folders["idefics3"], "captioner.lora.r=2", "captioner.lora.target_modules=qkv,nope"))
    with pytest.raises(ConfigError, match=r"'captioner.lora.target_modules': lm_head is the output head of "
                                          r"Qwen2VLForConditionalGeneration, which LoRA does not adapt"):
        build_captioner(config(vlm_folders["qwen2-vl"], "captioner.lora.r=2", "captioner.lora.target_modules=q_proj,lm_head"))
    with pytest.raises(ConfigError, match=r"'captioner.lora.modules_to_save': nope matches no module of "
                                          r"Idefics3ForConditionalGeneration"):
        build_captioner(config(vlm_folders["idefics3"], "captioner.lora.r=2", "captioner.lora.modules_to_save=nope"))
    with pytest.raises(ConfigError, match=r"'captioner.lora.modules_to_save': vision_model matches model.vision_model, "
                                          r"which is or holds a frozen part \(captioner.freeze\)"):
        build_captioner(config(vlm_folders["idefics3"], "captioner.lora.r=2",
                               "captioner.lora.modules_to_save=connector,vision_model"))
    with pytest.raises(ConfigError, match=r"'captioner.lora.modules_to_save': embed_tokens matches "
                                          r"model.language_model.embed_tokens, which holds the output head's weight"):
        build_captioner(config(vlm_folders["gemma3"], "captioner.lora.r=2",
                               "captioner.lora.modules_to_save=embed_tokens"))
    with pytest.raises(ConfigError, match=r"'captioner.lora.modules_to_save': trains modules whole beside LoRA"):
        config(vlm_folders["idefics3"], "captioner.lora.modules_to_save=connector")
    with pytest.raises(ConfigError, match="'captioner.lora.target_modules': names no layer"):
        config(vlm_folders["idefics3"], "captioner.lora.r=2", "captioner.lora.target_modules=' , '")
    with pytest.raises(ConfigError, match="'captioner.lora.r': LoRA adapts the rows hf_encoder_decoder, hf_vlm, not "
                                          "captioner.model=builtin"):
        load_config("configs/demo/xe.yaml", BLANK + ["captioner.lora.r=2"])
    with pytest.raises(ConfigError, match="'captioner.lora.dropout'"):
        config(vlm_folders["idefics3"], "captioner.lora.r=2", "captioner.lora.dropout=1.0")


def test_weights_with_adapters_or_a_folder_that_is_no_tag_as_the_start_are_one_line(vlm_folders, tmp_path):
    """A LoRA run's weights (adapters beside the base) into a captioner without LoRA named 19 missing keys; an export's
    hf/, a model folder, peft's adapter folder or another folder as train.init_from, DeepSpeed's own message."""
    from safetensors.torch import save_file

    cap = adapted(vlm_folders["idefics3"])
    save_file({k: v.detach().contiguous() for k, v in cap.state_dict().items()}, tmp_path / "lora.safetensors")
    with pytest.raises(ConfigError) as e:
        build_captioner(config(vlm_folders["idefics3"]), str(tmp_path / "lora.safetensors"))
    assert str(e.value) == (f"weights '{tmp_path / 'lora.safetensors'}' hold LoRA adapters (a LoRA run's checkpoint "
                            "tag): set captioner.lora as that run did, or start from its export (merged)")

    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "adapter_config.json").write_text("{}")
    (tmp_path / "other").mkdir()
    for folder, what in ((vlm_folders["idefics3"], "a transformers folder (an export's hf/, or a model's own)"),
                         (tmp_path / "adapters", "peft's adapter folder (export --adapters-only)"),
                         (tmp_path / "other", "a folder that is not a checkpoint tag (no *_model_states.pt in it)")):
        with pytest.raises(ConfigError) as e:
            config(vlm_folders["idefics3"], f"train.init_from={folder}")
        assert str(e.value).startswith(f"bad value for config key 'train.init_from': '{folder}' is {what}"), e.value


def test_names_may_be_a_yaml_list_as_in_peft(vlm_folders, tmp_path):
    """target_modules and modules_to_save as YAML lists (peft's own form), in a file or an override, are the
    comma-separated names; a list of anything but names is one line naming the key."""
    path = tmp_path / "lora.yaml"
    path.write_text("extends: %s\ncaptioner:\n  lora:\n    r: 2\n    target_modules: [q_proj, v_proj]\n"
                    "    modules_to_save:\n      - connector\n" % os.path.abspath("configs/demo/dico.yaml"))
    blank = BLANK + ["captioner.model=hf_vlm", f"captioner.hf_path={vlm_folders['idefics3']}"]
    lora = load_config(str(path), blank).captioner.lora
    assert (lora.target_modules, lora.modules_to_save) == ("q_proj,v_proj", "connector")
    assert load_config(str(path), blank + ["captioner.lora.target_modules=[k_proj,o_proj]"]
                       ).captioner.lora.target_modules == "k_proj,o_proj"
    with pytest.raises(ConfigError, match=r"^bad value for config key 'captioner.lora.target_modules' \(override "
                                          r"captioner.lora.target_modules=\[1,2\]\): \[1, 2\] is not a list of names$"):
        load_config(str(path), blank + ["captioner.lora.target_modules=[1,2]"])
    path.write_text(path.read_text().replace("- connector", "- [connector]"))
    with pytest.raises(ConfigError, match=r"'captioner.lora.modules_to_save' \(.*lora.yaml\): .* is not a list"):
        load_config(str(path), blank)
