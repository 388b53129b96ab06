"""A console a person can read: library deprecations hidden by their exact message where we call the library, and
nothing of ours resets Python's "shown once" memory of warnings at every image (which brought torch's FutureWarnings
back at every training step, on every rank)."""
import io
import warnings

import pytest
import torch
from PIL import Image

from dico_scale.data.images import open_image


def warn_here():
    warnings.warn("a library's deprecation", FutureWarning)


def test_decoding_images_does_not_bring_a_shown_warning_back():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")  # Python's default for FutureWarning: once per place
        for _ in range(3):
            warn_here()
            open_image(buf.getvalue())
    assert len(shown) == 1


def test_deepspeed_and_open_clip_deprecations_are_hidden_by_their_exact_message():
    from open_clip.loss import gather_features

    from dico_scale.engine import hide_deepspeed_deprecation
    from dico_scale.stages.contrastive import hide_clip_loss_deprecation

    x = torch.zeros(2, 4)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        hide_deepspeed_deprecation()
        hide_clip_loss_deprecation()
        # torch warns as it enters each deprecated call, then fails for want of a process group
        with pytest.raises((ValueError, RuntimeError)):
            torch.distributed.all_gather_into_tensor(torch.zeros(4, 4), x)  # as DeepSpeed's ZeRO calls it
        with pytest.raises((ValueError, RuntimeError)):
            gather_features(x, x, gather_with_grad=True, rank=0, world_size=2)  # open_clip's ClipLoss
        warn_here()  # any other FutureWarning still shows
    assert [str(w.message) for w in shown] == ["a library's deprecation"]
