"""Softcapped logits (Gemma 2's final_logit_softcapping, PaliGemma 2's text model: softcap * tanh(logits / softcap)):
both log-prob heads, the chunked torch head and the Triton head kernel (here in the interpreter), against float64 on
logits large enough for the cap to bend them, in one block and in many, with a bias, at a large vocabulary. The tiny
`paligemma2` family runs every per-family test of test_hf_vlm.py (its teacher-forced log-probs are those of the model's
own capped logits); test_captioner_input.py reads the cap from a folder."""
import functools
import re

import pytest
import torch
from test_large_vocab import V_QWEN2, LargestTensor, batch, check_against_float64

import dico_scale.kernels as kernels
import dico_scale.kernels.torch_path as torch_path
from dico_scale.kernels.fused_linear import fused_linear_sequence_logprobs_triton


def capped_batch(N, T, V, H, seed, dtype=torch.float32):
    """batch's inputs with logits of a trained model's size (|logits| up to ~40), which a cap at 10 bends."""
    hidden, weight, labels, mask = batch(N, T, V, H, seed)
    return (hidden * 12).to(dtype), weight.to(dtype), labels, mask


def test_the_cap_bends_these_logits():
    """The tests below would not tell a capped head from a plain one if the cap did not bend the logits."""
    hidden, weight, labels, mask = capped_batch(3, 5, 1000, 16, seed=0)
    plain = torch_path.fused_linear_sequence_logprobs(hidden, weight, labels, mask)
    capped = torch_path.fused_linear_sequence_logprobs(hidden, weight, labels, mask, softcap=10.0)
    assert (hidden @ weight.T).abs().max() > 20 and (plain - capped).abs().min() > 1.0


@pytest.mark.parametrize("chunk", [None, 16 * 40, 7], ids=["one block", "blocks", "one token x few rows"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_torch_head_with_a_softcap_matches_float64(chunk, bias):
    hidden, weight, labels, mask = capped_batch(4, 5, 1000 + 37, 16, seed=1)
    b = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(2)) if bias else None
    fn = functools.partial(torch_path.fused_linear_sequence_logprobs, max_chunk_logits=chunk)
    check_against_float64(fn, hidden, weight, labels, mask, 1e-5, bias=b, softcap=10.0)


def test_torch_head_with_a_softcap_at_qwen2_vocab_holds_one_block(monkeypatch):
    """Under a cap the backward's slope is one more block: no tensor beyond the budget, never [N, T, V]; a bf16 head
    upcast a slice at a time."""
    hidden, weight, labels, mask = capped_batch(3, 5, V_QWEN2, 16, seed=3, dtype=torch.bfloat16)
    monkeypatch.setattr(torch_path, "MAX_CHUNK_LOGITS", 2 * V_QWEN2)
    seen = LargestTensor([(weight.shape, weight.dtype)])
    check_against_float64(torch_path.fused_linear_sequence_logprobs, hidden, weight, labels, mask, 1e-5, seen,
                          grad_tol=1e-2, softcap=30.0)
    assert seen.largest <= 2 * V_QWEN2


@pytest.mark.parametrize("V, dedup", [(1000 + 37, False), (1000 + 37, True), (V_QWEN2, "auto")])
def test_triton_head_with_a_softcap_matches_float64_in_the_interpreter(V, dedup):
    hidden, weight, labels, mask = capped_batch(2, 3, V, 32, seed=V)
    fn = functools.partial(fused_linear_sequence_logprobs_triton, dedup=dedup)
    check_against_float64(fn, hidden, weight, labels, mask, 1e-4, softcap=10.0)


def test_the_triton_path_with_a_bias_and_a_softcap_caps_after_the_bias():
    """kernels.fused_linear_sequence_logprobs(kernel="triton") folds a bias into the matmul (one more column): the cap
    applies to the biased logits, as in the torch head."""
    hidden, weight, labels, mask = capped_batch(3, 4, 700, 16, seed=4)
    b = torch.randn(700, generator=torch.Generator().manual_seed(5)) * 5
    fn = functools.partial(kernels.fused_linear_sequence_logprobs, kernel="triton")
    check_against_float64(fn, hidden, weight, labels, mask, 1e-4, bias=b, softcap=10.0)


@pytest.mark.parametrize("softcap", [0.0, -30.0, float("nan"), float("inf"), "30", True])
def test_a_softcap_that_is_not_a_positive_number_is_refused(softcap):
    hidden, weight, labels, mask = capped_batch(2, 3, 50, 8, seed=6)
    for fn in (torch_path.fused_linear_sequence_logprobs, fused_linear_sequence_logprobs_triton):
        with pytest.raises(ValueError, match=re.escape(f"softcap must be None or a positive number, got {softcap!r}")):
            fn(hidden, weight, labels, mask, softcap=softcap)


def test_a_softcapped_captioner_gives_the_same_logprobs_and_gradients_on_every_path(vlm_folders):
    """The tiny PaliGemma 2 (its cap read from the folder) through its own forward: the chunked torch head, the Triton
    head kernel (fused, in the interpreter) and the Triton log-prob kernel over the materialised capped logits agree,
    values and the head's gradient; and a cap ignored would not."""
    from PIL import Image

    from dico_scale.config import load_config
    from dico_scale.models import build_captioner
    from dico_scale.models.tiny_vlm import prompt_overrides

    cfg = load_config("configs/demo/xe.yaml", ["evaluator.weights=", "captioner.image_encoder_weights=",
                                                "train.init_from=", "captioner.model=hf_vlm",
                                                f"captioner.hf_path={vlm_folders['paligemma2']}",
                                                *prompt_overrides("paligemma2")])
    cap = build_captioner(cfg)
    assert cap.logit_softcap == 30.0
    ims = [Image.new("RGB", (40, 30), c) for c in ("red", "navy")]
    pixels = cap.preprocess.collate([cap.preprocess(im) for im in ims])
    tokens = cap.tokenizer.batch(["a red circle at the top", "two small blue stars"], 20)
    results = {}
    for name, kw in {"torch": dict(kernel="torch"), "fused": dict(kernel="triton", fused=True),
                     "logits": dict(kernel="triton")}.items():
        cap.zero_grad()
        logps = cap(tokens, pixels=pixels, output="logprobs", **kw)
        logps.sum().backward()
        results[name] = logps.detach(), cap.head_weight.grad.clone()
    for name in ("fused", "logits"):
        torch.testing.assert_close(results[name][0], results["torch"][0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(results[name][1], results["torch"][1], rtol=1e-4, atol=1e-5)
    cap.logit_softcap = None
    with torch.no_grad():
        plain = cap(tokens, pixels=pixels, output="logprobs", kernel="torch")
    assert (plain - results["torch"][0]).abs().min() > 0.1
