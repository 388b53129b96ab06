"""Broken Hugging Face folders of the hf_encoder_decoder and dico_ref rows (tiny real folders from
dico_scale.models.tiny, one file removed, corrupted or truncated): building the captioner (train, caption) and the
dico-ref converter stop with one ConfigError line naming captioner.hf_path and what is wrong, never a traceback."""
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from dico_scale.caption import main as caption_main
from dico_scale.config import ConfigError, load_config
from dico_scale.convert import main as convert_main
from dico_scale.models import build_captioner
from dico_scale.models.tiny import write

BLANK = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]


@pytest.fixture(scope="module")
def sound(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sound")
    return {f: write(f, str(root / f)) for f in ("vit-gpt2", "dico-ref")}


def broken(sound, family, tmp_path, damage) -> str:
    """A copy of the sound folder of `family` with damage(folder) done to it."""
    folder = tmp_path / family
    shutil.copytree(sound[family], folder)
    damage(folder)
    return str(folder)


def cfg_for(row: str, folder: str):
    return load_config("configs/demo/xe.yaml", BLANK + [f"captioner.model={row}", f"captioner.hf_path={folder}"])


def one_line(msg: str, folder: str, needle: str) -> None:
    assert "\n" not in msg.strip() and f"captioner.hf_path '{folder}'" in msg and needle in msg, msg


def cli_error(err: str, prog: str) -> str:
    """The entry point's error line: the last of stderr (transformers' progress bars come before it), no traceback."""
    assert "Traceback" not in err and err.endswith("\n"), err
    line = err.splitlines()[-1]
    assert line.startswith(f"{prog}: error: "), err
    return line


def _unlink(*names):
    return lambda d: [(d / n).unlink() for n in names]


def _write(name, text):
    return lambda d: (d / name).write_text(text)


def _truncate(name):
    return lambda d: os.truncate(d / name, os.path.getsize(d / name) // 2)


HF_FAULTS = {
    "no tokenizer": (_unlink("tokenizer.json", "tokenizer_config.json"),
                     "its tokenizer does not load (none of tokenizer.json, tokenizer_config.json, vocab.json, "
                     "vocab.txt, tokenizer.model, spiece.model in it)"),
    "corrupt tokenizer.json": (_write("tokenizer.json", '{"version": '),
                               "its tokenizer does not load (JSONDecodeError"),
    "no image processor": (_unlink("preprocessor_config.json"), "its image processor does not load (no "
                           "processor_config.json or preprocessor_config.json in it)"),
    "unknown image processor": (_write("preprocessor_config.json", '{"image_processor_type": "Bogus"}'),
                                "its image processor does not load (ValueError: Unrecognized image processor"),
}


@pytest.mark.parametrize("fault", HF_FAULTS)
def test_a_broken_encoder_decoder_folder_is_one_line_when_training_and_captioning(sound, tmp_path, capsys, fault):
    damage, needle = HF_FAULTS[fault]
    folder = broken(sound, "vit-gpt2", tmp_path, damage)
    with pytest.raises(ConfigError) as e:  # what the trainer's build_stage and export.load_captioner call
        build_captioner(cfg_for("hf_encoder_decoder", folder))
    one_line(str(e.value), folder, needle)
    Image.new("RGB", (40, 30)).save(tmp_path / "img.png")
    assert caption_main(["--checkpoint", folder, str(tmp_path / "img.png")]) == 2
    one_line(cli_error(capsys.readouterr().err, "dico_scale.caption"), folder, needle)


def test_a_config_json_whose_parts_are_not_objects_is_one_line(sound, tmp_path):
    """Every row's readers take config.json's decoder (encoder, text_config, vision_config) as an object."""
    def damage(d):
        (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "decoder": "gpt2"}))

    folder = broken(sound, "vit-gpt2", tmp_path, damage)
    with pytest.raises(ConfigError) as e:
        cfg_for("hf_encoder_decoder", folder)
    assert str(e.value) == (f"bad value for config key 'captioner.hf_path': '{folder}': config.json's decoder is "
                            '"gpt2", not a JSON object')


def _not_a_state_dict(d):
    torch.save([torch.zeros(1)], d / "pytorch_model.bin")


def _garbage_safetensors(d):
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")


REF_FAULTS = {
    "truncated pytorch_model.bin": (_truncate("pytorch_model.bin"),
                                    "pytorch_model.bin does not load (RuntimeError: PytorchStreamReader"),
    "corrupt model.safetensors": (_garbage_safetensors, "model.safetensors does not load ("),
    "a pickle of a list": (_not_a_state_dict, "pytorch_model.bin holds a list, not a state dict of tensors"),
}


@pytest.mark.parametrize("fault", REF_FAULTS)
def test_a_broken_dico_ref_folder_is_one_line_when_building_checking_and_converting(sound, tmp_path, capsys, fault):
    from dico_scale.models.dico_ref import check_folder_weights

    damage, needle = REF_FAULTS[fault]
    folder = broken(sound, "dico-ref", tmp_path, damage)
    for check in (lambda: build_captioner(cfg_for("dico_ref", folder)),  # train, caption
                  lambda: check_folder_weights(folder)):  # the trainer's preflight (weights memory-mapped)
        with pytest.raises(ConfigError) as e:
            check()
        one_line(str(e.value), folder, needle)
    assert convert_main(["dico-ref", folder, "--out", str(tmp_path / "x.pt")]) == 2
    one_line(cli_error(capsys.readouterr().err, "dico_scale.convert"), os.path.abspath(folder), needle)
    assert not (tmp_path / "x.pt").exists()
