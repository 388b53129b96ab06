"""The captioner table (dico_scale.models.MODELS) and its one factory: every row builds through build_captioner, the
config names the row, and the interface's token policy (PAD may equal EOS) holds in the shared helpers."""
import pytest
import torch

from dico_scale.config import ConfigError, load_config
from dico_scale.models import MODELS, build_captioner
from dico_scale.models.captioner import CaptionerModel, banned_tokens, scored_mask

BLANK = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]


def test_builtin_is_the_default_row_and_loads_its_model_pt(tmp_path):
    cfg = load_config("configs/demo/xe.yaml", BLANK)
    assert cfg.captioner.model == "builtin" and "builtin" in MODELS
    m = build_captioner(cfg)
    assert isinstance(m, CaptionerModel) and m.tokenizer.eos == 49407 and m.preprocess is not None
    torch.save({"state_dict": m.state_dict(), "config": ""}, tmp_path / "model.pt")
    again = build_captioner(cfg, str(tmp_path / "model.pt"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in m.state_dict().items())
    assert not any(k.startswith(m.tower_prefix) for k in build_captioner(cfg, image_encoder=False).state_dict())


@pytest.mark.parametrize("override, key", [("captioner.model=nope", "captioner.model"),
                                           ("captioner.hf_path=/x", "captioner.hf_path")])
def test_bad_rows_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("configs/demo/xe.yaml", BLANK + [override])


def test_scored_mask_counts_up_to_the_first_eos_whatever_pad_is():
    eos = 2
    labels = torch.tensor([[5, 6, 2, 9, 9], [5, 2, 2, 2, 2], [5, 6, 7, 8, 4]])  # PAD 9; PAD == EOS; no EOS
    assert scored_mask(labels, eos).sum(-1).tolist() == [3, 2, 5]
    assert banned_tokens(bos=0, eos=2, pad=2) == [0] and banned_tokens(bos=2, eos=2, pad=2) == []
    assert banned_tokens(bos=0, eos=1, pad=7) == [0, 7]


def test_builtin_without_encoder_layers_passes_the_visual_tokens_on():
    """captioner.encoder_layers=0 is allowed: the projected visual tokens are the decoder's memory."""
    from PIL import Image

    cap = build_captioner(load_config("configs/demo/xe.yaml", BLANK + ["captioner.encoder_layers=0"]))
    pixels = torch.stack([cap.preprocess(Image.new("RGB", (40, 30)))] * 2)
    features = cap.visual_tokens(pixels)
    assert torch.equal(cap.image_context(features), cap.visual_proj(features))
    cap(torch.randint(1, 400, (2, 6)), pixels=pixels, output="logprobs").sum().backward()
    assert all(p.grad is not None for p in cap.visual_proj.parameters())
