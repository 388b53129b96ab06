"""Vocabularies up to 262k: neither log-prob path holds [N, T, V] logits. The torch head (the CPU path of DiCO, SCST
and XE, and what trains on CUDA) runs in blocks of tokens x vocabulary, forward and backward, a block of at most
MAX_CHUNK_LOGITS logits, a half-precision head upcast a slice at a time; the Triton head kernel (CUDA, here in the
interpreter) streams the vocabulary in tiles, V not a multiple of the tile included."""
import contextlib
import functools

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

import dico_scale.kernels.torch_path as torch_path
from dico_scale.config import load_config
from dico_scale.kernels.fused_linear import fused_linear_sequence_logprobs_triton
from dico_scale.models import build_captioner

V_QWEN2 = 151_936  # Qwen2-VL's vocabulary; 64 does not divide 151_936 + 1 (a biased head's extra column aside)


class LargestTensor(TorchFunctionMode):
    """The largest tensor (in elements) any torch operation returns while active, those of the skipped (shape, dtype)
    pairs aside (the weight and its gradient; a transposed view too)."""

    def __init__(self, skip):
        super().__init__()
        self.skip = {(tuple(s), d) for s, d in skip} | {(tuple(s)[::-1], d) for s, d in skip}
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and (tuple(t.shape), t.dtype) not in self.skip:
                self.largest = max(self.largest, t.numel())
        return out


def batch(N, T, V, H, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, 0], labels[-1, 0] = V - 1, 0
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (N,), generator=g)[:, None]
    labels[~mask] = -100  # never read
    hidden = torch.randn(N, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)  # untied: a [V, H] of its own
    return hidden, weight, labels, mask


def float64_reference(hidden, weight, labels, mask, bias=None, softcap=None):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    logits = h @ w.T if b is None else h @ w.T + b
    if softcap is not None:  # Gemma 2's final_logit_softcapping, as its forward writes it
        logits = torch.tanh(logits / softcap) * softcap
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    out = (lp * mask).sum(-1)
    return out, h, w, b


def check_against_float64(fn, hidden, weight, labels, mask, tol, watch=contextlib.nullcontext(), grad_tol=None,
                          bias=None, softcap=None):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    grad = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    extra = ({} if b is None else {"bias": b}) | ({} if softcap is None else {"softcap": softcap})
    with watch:  # forward and backward of the path under test only
        out = fn(h, w, labels, mask, **extra)
        out.backward(grad.to(out.dtype))
    want, h64, w64, b64 = float64_reference(hidden, weight, labels, mask, bias, softcap)
    want.backward(grad)
    assert torch.allclose(out.double(), want, rtol=tol, atol=tol)
    pairs = [(h.grad, h64.grad), (w.grad, w64.grad)] + ([] if b is None else [(b.grad, b64.grad)])
    for got, ref in pairs:
        assert got.dtype == hidden.dtype and ((got.double() - ref).norm() / ref.norm()).item() < (grad_tol or tol)


def test_torch_head_at_qwen2_vocab_matches_float64_and_holds_one_chunk(monkeypatch):
    hidden, weight, labels, mask = batch(3, 5, V_QWEN2, 16, seed=0)
    monkeypatch.setattr(torch_path, "MAX_CHUNK_LOGITS", 2 * V_QWEN2)  # 2 tokens a chunk: several chunks here
    seen = LargestTensor([(weight.shape, weight.dtype)])
    check_against_float64(torch_path.fused_linear_sequence_logprobs, hidden, weight, labels, mask, 1e-5, seen)
    assert int(mask.sum()) > 2 and seen.largest <= 2 * V_QWEN2  # never more than one chunk of logits


def cuda_half_operands_on_the_cpu(monkeypatch):
    """The head's CUDA arithmetic for half-precision inputs, here: half operands, fp32 products (torch.mm's out_dtype
    exists on CUDA only; an fp32 matmul of bf16-valued operands gives what its fp32 accumulation gives)."""
    monkeypatch.setattr(torch_path, "_half_operands", lambda h, w: h.dtype in torch_path.HALF and w.dtype == h.dtype)
    calls = []

    def mm32(a, b):
        assert a.dtype == b.dtype == torch.bfloat16  # never an upcast copy of the operands
        calls.append(a.shape)
        return a.float() @ b.float()
    monkeypatch.setattr(torch_path, "_mm32", mm32)
    return calls


@pytest.mark.parametrize("cuda, bias", [(False, False), (True, False), (True, True)],
                         ids=["cpu upcast", "cuda half operands", "cuda half operands, bias"])
def test_torch_head_never_makes_an_fp32_copy_of_a_half_precision_head(monkeypatch, cuda, bias):
    """A bf16 head (CUDA training under loss.kernel=auto), forward and backward. On the CPU each vocabulary slice is
    upcast to fp32; on CUDA the three matmuls (logits, dh, dW) take bf16 operands with fp32 results, as the fused
    kernel's tiles do. Either way no fp32 copy of the [V, H] weight nor of its gradient (the largest tensor is a block
    of logits), and the values and gradients are float64's to bf16's precision."""
    calls = cuda_half_operands_on_the_cpu(monkeypatch) if cuda else None
    hidden, weight, labels, mask = batch(6, 5, V_QWEN2, 16, seed=4, dtype=torch.bfloat16)
    b = torch.randn(V_QWEN2, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16) if bias else None
    monkeypatch.setattr(torch_path, "MAX_CHUNK_LOGITS", 2 * V_QWEN2)  # slices of V/8 rows; 16 tokens a block
    seen = LargestTensor([(weight.shape, torch.bfloat16)])
    check_against_float64(torch_path.fused_linear_sequence_logprobs, hidden, weight, labels, mask, 1e-5, seen,
                          grad_tol=1e-2, bias=b)  # gradients stored in bf16
    assert int(mask.sum()) > 16 and seen.largest <= 2 * V_QWEN2  # several row blocks
    if cuda:
        blocks = 8 * -(-int(mask.sum()) // 16)  # 8 slices x row blocks: logits forward; logits, dh and dW backward
        assert len(calls) == 4 * blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_head_with_a_bias_matches_float64(dtype):
    """A biased head (BLIP's) in several slices and row blocks: values and the gradients of h, W and b."""
    hidden, weight, labels, mask = batch(4, 5, 1000 + 37, 16, seed=5, dtype=dtype)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(6)).to(dtype)
    fn = functools.partial(torch_path.fused_linear_sequence_logprobs, max_chunk_logits=16 * 40)
    check_against_float64(fn, hidden, weight, labels, mask, 1e-5, grad_tol=1e-5 if dtype == torch.float32 else 1e-2,
                          bias=bias)
    with pytest.raises(ValueError, match="bias must be"):
        torch_path.fused_linear_sequence_logprobs(hidden, weight, labels, mask, bias=bias[:-1])


def test_torch_head_is_the_same_in_one_chunk_or_many_in_bf16():
    """One chunk keeps the softmax for backward, several recompute it: same values and gradients."""
    hidden, weight, labels, mask = batch(4, 6, 1000, 32, seed=2, dtype=torch.bfloat16)
    results = []
    for budget in (10**9, 64, 3000):  # one block; 2-row slices; 93-row slices
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = torch_path.fused_linear_sequence_logprobs(h, w, labels, mask, max_chunk_logits=budget)
        out.backward(torch.arange(4.0))
        results.append((out, h.grad, w.grad))
    assert results[0][0].dtype == torch.float32 and results[0][2].dtype == torch.bfloat16
    for other in results[1:]:
        assert torch.allclose(results[0][0], other[0], rtol=1e-6)
        assert all(torch.allclose(a.float(), b.float(), atol=1e-2) for a, b in zip(results[0][1:], other[1:]))


def test_torch_head_backward_twice_through_a_kept_softmax():
    """One chunk keeps its softmax for backward and builds the gradient in a copy: a second backward (retain_graph)
    gets the same gradients."""
    hidden, weight, labels, mask = batch(3, 4, 500, 16, seed=3)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = torch_path.fused_linear_sequence_logprobs(h, w, labels, mask)
    first = torch.autograd.grad(out.sum(), (h, w), retain_graph=True)
    second = torch.autograd.grad(out.sum(), (h, w))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("V", [V_QWEN2, 1000 + 37])
def test_triton_head_at_large_and_odd_vocab_in_the_interpreter(V):
    hidden, weight, labels, mask = batch(2, 3, V, 32, seed=V)
    check_against_float64(fused_linear_sequence_logprobs_triton, hidden, weight, labels, mask, 1e-4)


def test_xe_and_sequence_log_probs_of_a_captioner_never_hold_the_logits(monkeypatch):
    """The builtin captioner (V = 49,409) through its forward, as XE, DiCO and SCST call it on the CPU."""
    cfg = load_config("configs/demo/xe.yaml", ["evaluator.weights=", "captioner.image_encoder_weights=",
                                                "train.init_from="])
    cap = build_captioner(cfg).eval()
    V, N, T = cap.head_weight.shape[0], 4, 12
    tokens = torch.randint(1, 4000, (N, T))
    tokens[:, 0], tokens[:, -1] = cap.tokenizer.bos, cap.tokenizer.eos
    pixels = torch.randn(N, *cap.preprocess(Image.new("RGB", (64, 48))).shape)
    monkeypatch.setattr(torch_path, "MAX_CHUNK_LOGITS", 8 * V)
    with LargestTensor([(cap.head_weight.shape, cap.head_weight.dtype)]) as seen:
        logps = cap(tokens, pixels=pixels, output="logprobs")
        logps.sum().backward()
    assert seen.largest <= 8 * V < N * (T - 1) * V
    want = torch.log_softmax(cap(tokens, pixels=pixels).double(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    assert torch.allclose(logps.double(), want.sum(-1), atol=1e-3)
