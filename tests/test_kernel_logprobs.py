"""Triton log-prob kernels (kernels/src/logprobs.py, kernels/src/fused_linear.py) on the CPU through the interpreter.

Expected values come from float64 log_softmax written out here (not from kernels/src/torch_path.py),
on the same (possibly half-precision) inputs upcast to float64.
"""

import pytest
import torch
from helpers import poison_empty

import dico_scale.kernels.fused_linear as fl
from dico_scale.kernels.fused_linear import fused_linear_sequence_logprobs_triton
from dico_scale.kernels.logprobs import sequence_logprobs_triton
from dico_scale.kernels.torch_path import fused_linear_sequence_logprobs

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def ref64(logits, labels, mask):
    lp = torch.log_softmax(logits.double(), -1)
    safe = torch.where(mask.bool(), labels, 0)  # masked labels may be invalid ids
    return (lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask.double()).sum(-1)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_batch(N, T, V, seed):
    """Labels including 0 and V-1, ragged padding, one fully masked sequence, invalid ids under the mask."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, 0], labels[0, 1] = 0, V - 1
    lengths = torch.randint(2, T + 1, (N,), generator=g)
    lengths[0], lengths[-1] = T, 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    labels[~mask] = -100  # never read: would fault or mis-index if it were
    return labels, mask


@pytest.fixture
def poisoned_empty(monkeypatch):
    poison_empty(monkeypatch)


# --------------------------------------------------------------------------- logits kernel

@pytest.mark.parametrize("dtype,V", [(torch.float32, 1000), (torch.float16, 2500), (torch.bfloat16, 1000)])
def test_logprobs_values_and_grads(dtype, V, poisoned_empty):
    N, T = 4, 6
    labels, mask = make_batch(N, T, V, seed=V)
    logits = (torch.randn(N, T, V, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    out = sequence_logprobs_triton(logits, labels, mask)
    assert out.dtype == torch.float32 and out.shape == (N,)
    x64 = logits.detach().double().requires_grad_()
    want = ref64(x64, labels, mask)
    assert rel(out, want) < TOL[dtype] and out[-1] == 0  # fully masked sequence: exactly 0
    g = torch.randn(N, dtype=torch.float64)
    out.backward(g.float())
    want.backward(g)
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()
    assert rel(logits.grad, x64.grad) < TOL[dtype]
    assert (logits.grad[~mask] == 0).all()


def test_logprobs_strided_logits_and_float_mask():
    # logits[:, :-1] is not viewable as [N*T, V]; a float mask weights tokens.
    N, T, V = 3, 5, 700
    labels, _ = make_batch(N, T, V, seed=1)
    labels = labels.clamp_min(0)
    mask = torch.rand(N, T, generator=torch.Generator().manual_seed(2))
    full = torch.randn(N, T + 1, V, requires_grad=True)
    out = sequence_logprobs_triton(full[:, :-1], labels, mask)
    x64 = full.detach().double()[:, :-1].requires_grad_()
    want = ref64(x64, labels, mask)
    out.sum().backward()
    want.sum().backward()
    assert rel(out, want) < 1e-5
    assert rel(full.grad[:, :-1], x64.grad) < 1e-5 and (full.grad[:, -1] == 0).all()


def test_logprobs_forward_only_saves_nothing():
    labels, mask = make_batch(2, 3, 300, seed=3)
    logits = torch.randn(2, 3, 300, dtype=torch.bfloat16)
    assert sequence_logprobs_triton(logits, labels, mask).grad_fn is None  # no requires_grad
    logits.requires_grad_()
    with torch.no_grad():
        assert sequence_logprobs_triton(logits, labels, mask).grad_fn is None
    out = sequence_logprobs_triton(logits, labels, mask)
    saved = out.grad_fn.saved_tensors  # logits, labels, mask, lse: no fp32 copy of the logits
    assert len(saved) == 4 and saved[0] is logits
    assert [t.numel() for t in saved[1:]] == [6, 6, 6] and saved[3].dtype == torch.float32


# --------------------------------------------------------------------------- fused linear kernel

def fused_ref64(hidden, weight, labels, mask):
    return ref64(hidden.double() @ weight.double().T, labels, mask)


def check_fused(hidden, weight, labels, mask, dedup, tol):
    """Values and both gradients against float64; returns the kernel's output."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_linear_sequence_logprobs_triton(h, w, labels, mask, dedup=dedup)
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    want = fused_ref64(h64, w64, labels, mask)
    g = torch.randn(out.shape[0], dtype=torch.float64)
    out.backward(g.float())
    want.backward(g)
    assert out.dtype == torch.float32 and rel(out, want) < tol
    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert rel(h.grad, h64.grad) < tol, "dhidden"
    assert rel(w.grad, w64.grad) < tol, "dweight"
    assert (h.grad[~mask.bool()] == 0).all()
    return out


@pytest.mark.parametrize("dtype,V,dedup", [
    (torch.float32, 2500, False), (torch.float32, 1000, True),
    (torch.bfloat16, 1000, False), (torch.bfloat16, 2500, True), (torch.float16, 1000, True),
])
def test_fused_values_and_grads(dtype, V, dedup, monkeypatch, poisoned_empty):
    monkeypatch.setattr(fl, "DW_CHUNK_BYTES", 4 * 64 * 512)  # several dW chunks, the last one ragged
    N, T, H = 4, 6, 64
    labels, mask = make_batch(N, T, V, seed=V + dedup)
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(N, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    out = check_fused(hidden, weight, labels, mask, dedup, TOL[dtype])
    assert out[-1] == 0


@pytest.mark.parametrize("dtype,V,dedup", [(torch.float32, 2500, False), (torch.bfloat16, 1000, True)])
def test_fused_trans_backward(dtype, V, dedup, monkeypatch, poisoned_empty):
    """The backward whose dW operand is tl.trans of dh's probability tile (fused_linear.TRANSPOSE_FREE = False, which
    the GPU check still runs beside the default): exact here, so its fault on Hopper is the compiler's."""
    monkeypatch.setattr(fl, "TRANSPOSE_FREE", False)
    test_fused_values_and_grads(dtype, V, dedup, monkeypatch, poisoned_empty)


GPU_BLOCKS = sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
                     for c in fl._FWD_CONFIGS + fl._BWD_CONFIGS})


@pytest.mark.parametrize("blocks", GPU_BLOCKS, ids=["x".join(map(str, b)) for b in GPU_BLOCKS])
def test_fused_at_each_gpu_configs_blocks(blocks, monkeypatch, poisoned_empty):
    """Forward and backward at the block shapes the GPU autotunes over (the interpreter runs one fixed shape), with
    rows, columns, dW chunks and H all ragged against them: each shape's tiling is exact here, so a GPU fault at one
    of them (tests/test_gpu_kernels.py runs each backward config) is the compiler's, not the tiling's."""
    monkeypatch.setattr(fl, "_INTERP_META", dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), blocks)))
    monkeypatch.setattr(fl, "DW_CHUNK_BYTES", 4 * 80 * 320)  # dW chunks of 256 columns, 700 = 2 x 256 + 188
    N, T, H, V = 10, 15, 80, 700  # 150 rows: two or three row tiles
    labels, mask = make_batch(N, T, V, seed=sum(blocks))
    g = torch.Generator().manual_seed(sum(blocks))
    hidden = torch.randn(N, T, H, generator=g).to(torch.bfloat16)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(torch.bfloat16)
    check_fused(hidden, weight, labels, mask, dedup=False, tol=TOL[torch.bfloat16])


def beam_batch(images, k, T, H, V, seed):
    """Beam-search-like candidates: k per image sharing prefixes; equal prefixes give bitwise-equal states.

    Returns hidden, labels, mask and the number of distinct masked-in (image, prefix) states.
    """
    g = torch.Generator().manual_seed(seed)
    states, rows, labels = {}, [], []
    for img in range(images):
        base = torch.randint(0, V, (T,), generator=g)
        for b in range(k):
            seq = base.clone()
            split = int(torch.randint(1, T, (1,), generator=g))  # beams diverge after `split` tokens
            seq[split:] = torch.randint(0, V, (T - split,), generator=g)
            labels.append(seq)
            for t in range(T):  # state at t sees the tokens before it: (img, seq[:t])
                key = (img, tuple(seq[:t].tolist()))
                if key not in states:
                    states[key] = torch.randn(H, generator=g)
                rows.append(states[key])
    hidden = torch.stack(rows).view(images * k, T, H)
    labels = torch.stack(labels)
    mask = torch.ones(images * k, T, dtype=torch.bool)
    mask[1, T - 2:] = False  # some padding
    masked_in = {(n // k, tuple(labels[n, :t].tolist())) for n in range(images * k) for t in range(T) if mask[n, t]}
    return hidden, labels, mask, len(masked_in)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dedup_merges_beam_prefixes(dtype):
    hidden, labels, mask, n_unique = beam_batch(images=2, k=4, T=6, H=64, V=500, seed=11)
    hidden = hidden.to(dtype)
    weight = (torch.randn(500, 64, generator=torch.Generator().manual_seed(12)) * 0.3).to(dtype)
    plan = fl._plan(hidden.reshape(-1, 64), labels.reshape(-1), mask.reshape(-1).float(), dedup=True)
    assert plan.trow.numel() == int(mask.sum()) and plan.urow.numel() == n_unique < plan.trow.numel()
    out_d = check_fused(hidden, weight, labels, mask, True, TOL[dtype])
    out_n = check_fused(hidden, weight, labels, mask, False, TOL[dtype])
    assert rel(out_d, out_n) < 1e-6


def test_fused_auto_threshold(monkeypatch):
    h2 = torch.zeros(10, 8)  # all rows equal
    labels, mask = torch.zeros(10, dtype=torch.long), torch.ones(10)
    mask[3] = 0
    plan = fl._plan(h2, labels, mask, dedup="auto")  # 10 rows < DEDUP_MIN_ROWS: no sync, nothing merged
    assert plan.trow.numel() == plan.urow.numel() == 10
    monkeypatch.setattr(fl, "DEDUP_MIN_ROWS", 10)
    plan = fl._plan(h2, labels, mask, dedup="auto")
    assert plan.trow.numel() == 9 and plan.urow.numel() == 1 and (plan.inv == 0).all()


def test_fused_dedup_is_bitwise():
    # -0.0 == 0.0 as floats but not as bits: such rows stay apart (still exact either way).
    h2 = torch.zeros(4, 8)
    h2[1, 0] = -0.0
    h2[2, 0] = 1.0
    h2[3] = h2[2]
    plan = fl._plan(h2, torch.zeros(4, dtype=torch.long), torch.ones(4), dedup=True)
    assert plan.urow.numel() == 3 and plan.inv[2] == plan.inv[3] and plan.inv[0] != plan.inv[1]


@pytest.mark.parametrize("dedup", [False, True])
def test_fused_all_masked(dedup):
    hidden = torch.randn(2, 3, 64, requires_grad=True)
    weight = torch.randn(300, 64, requires_grad=True)
    labels = torch.full((2, 3), -100)
    out = fused_linear_sequence_logprobs_triton(hidden, weight, labels, torch.zeros(2, 3, dtype=torch.bool), dedup)
    out.sum().backward()
    assert (out == 0).all() and (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_fused_forward_only_saves_nothing():
    labels, mask = make_batch(3, 4, 300, seed=5)
    hidden, weight = torch.randn(3, 4, 64), torch.randn(300, 64)
    want = fused_ref64(hidden, weight, labels, mask)
    out = fused_linear_sequence_logprobs_triton(hidden, weight, labels, mask)
    assert out.grad_fn is None and rel(out, want) < 1e-5
    hidden.requires_grad_()
    with torch.no_grad():
        assert fused_linear_sequence_logprobs_triton(hidden, weight, labels, mask).grad_fn is None
    out = fused_linear_sequence_logprobs_triton(hidden, weight, labels, mask)
    # Inputs plus per-row vectors: nothing of size R*V.
    assert all(t.numel() < 300 * 12 or t is hidden or t is weight for t in out.grad_fn.saved_tensors)


def test_torch_path_fused_matches_float64():
    labels, mask = make_batch(5, 4, 200, seed=6)
    hidden, weight = torch.randn(5, 4, 32, dtype=torch.float64), torch.randn(200, 32, dtype=torch.float64)
    got = fused_linear_sequence_logprobs(hidden, weight, labels, mask, max_chunk_logits=2 * 200)
    assert got.dtype == torch.float64
    assert torch.allclose(got, fused_ref64(hidden, weight, labels, mask), rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise():
    x, labels, mask = torch.randn(2, 3, 50), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
    w = torch.randn(50, 50)
    with pytest.raises(ValueError, match="logits"):
        sequence_logprobs_triton(x[0], labels, mask)
    with pytest.raises(ValueError, match="logits"):
        sequence_logprobs_triton(x.long(), labels, mask)
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs_triton(x, labels[:, :2], mask)
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs_triton(x, labels.float(), mask)
    with pytest.raises(ValueError, match="mask"):
        sequence_logprobs_triton(x, labels, mask[:1])
    with pytest.raises(ValueError, match="weight"):
        fused_linear_sequence_logprobs_triton(x, w[:, :10], labels, mask)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_sequence_logprobs_triton(x, w.half(), labels, mask)
    with pytest.raises(ValueError, match="dedup"):
        fused_linear_sequence_logprobs_triton(x, w, labels, mask, dedup="yes")
