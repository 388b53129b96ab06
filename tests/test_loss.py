"""Tests for dico_scale.kernels against independent float64 loop implementations.

The expected values are computed here with plain Python / numpy loops
(first-max winner by hand, softmax via math.exp with max-subtraction), not by
re-running the vectorised torch code, so a shared bug cannot hide.
"""

import math

import numpy as np
import pytest
import torch

import dico_scale.kernels as kernels
from dico_scale.kernels import dico_loss, sequence_logprobs


# ---------------------------------------------------------------------------
# Independent float64 references
# ---------------------------------------------------------------------------

def _log_sigmoid(z):
    # Stable for both signs: log σ(z) = -log1p(e^{-z}) = z - log1p(e^{z}).
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def ref_dico(pi, ref, r, beta, tau):
    """Loop implementation of the DiCO loss and metrics; inputs are nested lists."""
    B = len(pi)
    losses, chosen, rejected, acc, lp_w, lp_l, r_win, r_all = [], [], [], [], [], [], [], []
    for b in range(B):
        k = len(pi[b])
        w = 0
        for j in range(1, k):  # strict '>' keeps the FIRST max
            if r[b][j] > r[b][w]:
                w = j
        losers = [j for j in range(k) if j != w]
        d = [tau * (r[b][w] - r[b][j]) for j in losers]
        m = max(d)
        e = [math.exp(x - m) for x in d]
        s = sum(e)
        g = [x / s for x in e]
        pl = sum(gj * pi[b][j] for gj, j in zip(g, losers))
        rl = sum(gj * ref[b][j] for gj, j in zip(g, losers))
        z = beta * ((pi[b][w] - pl) - (ref[b][w] - rl))
        losses.append(-_log_sigmoid(z))
        chosen.append(beta * (pi[b][w] - ref[b][w]))
        rejected.append(beta * (pl - rl))
        acc.append(1.0 if z > 0 else 0.0)
        lp_w.append(pi[b][w])
        lp_l.append(pl)
        r_win.append(r[b][w])
        r_all.extend(r[b])
    mean = lambda xs: sum(xs) / len(xs)
    metrics = {
        "rewards/chosen": mean(chosen),
        "rewards/rejected": mean(rejected),
        "rewards/margin": mean([c - x for c, x in zip(chosen, rejected)]),
        "rewards/accuracy": mean(acc),
        "logps/chosen": mean(lp_w),
        "logps/rejected": mean(lp_l),
        "score/winner": mean(r_win),
        "score/mean": mean(r_all),
    }
    return mean(losses), metrics


def ref_seq_logprobs(logits, labels, mask):
    """Per-token loop in float64: sum_t mask * (logit[label] - logsumexp)."""
    x = np.asarray(logits, dtype=np.float64)
    N, T, V = x.shape
    out = np.zeros(N)
    for n in range(N):
        for t in range(T):
            if mask[n][t] == 0:
                continue
            row = x[n, t]
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            out[n] += float(mask[n][t]) * (row[int(labels[n][t])] - lse)
    return out


def _tolist(t):
    return t.detach().double().tolist()


def _dico_inputs(B, k, gen, reward_values=None, reward_scale=1.0, dtype=torch.float64):
    pi = -torch.rand(B, k, generator=gen, dtype=torch.float64) * 20 - 1
    ref = pi + torch.randn(B, k, generator=gen, dtype=torch.float64)
    if reward_values is None:
        r = torch.rand(B, k, generator=gen, dtype=torch.float64) * reward_scale
    else:  # draw from a small set so exact ties are frequent
        vals = torch.tensor(reward_values, dtype=torch.float64)
        r = vals[torch.randint(len(reward_values), (B, k), generator=gen)]
    return pi.to(dtype), ref.to(dtype), r.to(dtype)


def _check_against_ref(pi, ref, r, beta, tau, rtol=1e-10, atol=1e-10):
    loss, metrics = dico_loss(pi, ref, r, beta=beta, tau=tau)
    exp_loss, exp_metrics = ref_dico(_tolist(pi), _tolist(ref), _tolist(r), beta, tau)
    assert loss.dim() == 0
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(exp_loss, rel=rtol, abs=atol)
    assert set(metrics) == set(exp_metrics)
    for name, val in metrics.items():
        assert val.dim() == 0 and not val.requires_grad, name
        assert val.item() == pytest.approx(exp_metrics[name], rel=rtol, abs=atol), name


# ---------------------------------------------------------------------------
# dico_loss values and metrics
# ---------------------------------------------------------------------------

def test_exports_survive_importing_the_triton_modules():
    # A kernel module named like a package function would replace that function once imported.
    import importlib

    for name in ("logprobs", "fused_linear", "loss"):
        importlib.import_module(f"dico_scale.kernels.{name}")
    for name in ("sequence_logprobs", "fused_linear_sequence_logprobs", "dico_loss"):
        assert name in kernels.__all__ and callable(getattr(kernels, name)) and \
            getattr(kernels, name).__module__ == "dico_scale.kernels", name


def test_dispatch_picks_the_torch_path_on_cpu_and_checks_the_kernel_name(monkeypatch):
    x = torch.zeros(2, 3)
    assert not kernels.use_triton("auto", x) and not kernels.use_triton("torch", x)
    with pytest.raises(ValueError, match="kernel must be one of auto, triton, torch, got 'cuda'"):
        kernels.use_triton("cuda", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.use_triton("triton", x)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.use_triton("triton", x)


def test_fused_head_auto_keeps_gradients_on_the_torch_head(monkeypatch):
    """The fused head's backward failed its H200 check: under "auto" it runs only where no gradient flows."""
    use = kernels.fused_head_uses_triton
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert use("auto", is_cuda=True, needs_grad=False) and not use("auto", is_cuda=True, needs_grad=True)
    assert not use("auto", is_cuda=False, needs_grad=False) and not use("torch", is_cuda=True, needs_grad=False)
    assert use("triton", is_cuda=True, needs_grad=True)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        use("triton", is_cuda=False, needs_grad=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use("triton", is_cuda=False, needs_grad=True)
    calls = []  # on CPU tensors: the interpreted kernel under "triton", the torch head under "auto" and "torch"
    monkeypatch.setattr(kernels.torch_path, "fused_linear_sequence_logprobs", lambda *a, **kw: calls.append("torch"))
    h, w = torch.randn(2, 3, 8, requires_grad=True), torch.randn(16, 8)
    labels, mask = torch.randint(16, (2, 3)), torch.ones(2, 3)
    kernels.fused_linear_sequence_logprobs(h, w, labels, mask, kernel="auto")
    kernels.fused_linear_sequence_logprobs(h, w, labels, mask, kernel="torch")
    assert calls == ["torch", "torch"]
    out = kernels.fused_linear_sequence_logprobs(h, w, labels, mask, kernel="triton")
    assert calls == ["torch", "torch"] and out.shape == (2,) and out.grad_fn is not None


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("B", [1, 4, 17])
def test_dico_loss_random(k, B):
    gen = torch.Generator().manual_seed(1000 * k + B)
    pi, ref, r = _dico_inputs(B, k, gen)
    for beta, tau in [(0.2, 300.0), (0.5, 3.0), (1.0, 0.0)]:
        _check_against_ref(pi, ref, r, beta, tau)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_dico_loss_ties_pick_first_max(k):
    gen = torch.Generator().manual_seed(k)
    pi, ref, r = _dico_inputs(64, k, gen, reward_values=[0.1, 0.25, 0.4])
    # Make sure the batch really contains tied maxima so tie-breaking is exercised.
    top = r.max(dim=1, keepdim=True).values
    assert ((r == top).sum(dim=1) > 1).any()
    _check_against_ref(pi, ref, r, beta=0.2, tau=300.0)
    _check_against_ref(pi, ref, r, beta=0.2, tau=2.0)


def test_dico_loss_tie_winner_is_first_index():
    # Direct check: candidates 1 and 3 tie for the max; winner must be 1.
    pi = torch.tensor([[-5.0, -7.0, -3.0, -1.0]], dtype=torch.float64)
    ref = torch.zeros_like(pi)
    r = torch.tensor([[0.2, 0.9, 0.5, 0.9]], dtype=torch.float64)
    _, metrics = dico_loss(pi, ref, r)
    assert metrics["logps/chosen"].item() == -7.0


@pytest.mark.parametrize("k", [2, 5, 8])
def test_dico_loss_all_equal_rewards(k):
    # Winner is index 0 and gamma is uniform over the k-1 losers.
    gen = torch.Generator().manual_seed(7 + k)
    pi, ref, _ = _dico_inputs(6, k, gen)
    r = torch.full_like(pi, 0.37)
    _check_against_ref(pi, ref, r, beta=0.2, tau=300.0)
    _, metrics = dico_loss(pi, ref, r)
    assert metrics["logps/chosen"].item() == pytest.approx(pi[:, 0].mean().item(), rel=1e-12)
    assert metrics["logps/rejected"].item() == pytest.approx(pi[:, 1:].mean(1).mean().item(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dico_loss_large_tau_diff_is_stable(dtype):
    # tau * diff reaches ~900: naive exp overflows in float32 (> 88) and float64 (> 709).
    gen = torch.Generator().manual_seed(3)
    pi, ref, r = _dico_inputs(32, 8, gen, reward_scale=3.0, dtype=dtype)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    _check_against_ref(pi, ref, r, beta=0.2, tau=300.0, rtol=rtol, atol=rtol)


def test_dico_loss_large_margin_is_finite():
    # |z| = 2000: log(sigmoid(z)) underflows to -inf even in float64; logsigmoid must not.
    pi = torch.tensor([[0.0, -1e4], [-1e4, 0.0]], dtype=torch.float64)
    ref = torch.zeros_like(pi)
    r = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    _check_against_ref(pi, ref, r, beta=0.2, tau=300.0)


def test_dico_loss_policy_equals_ref():
    # z == 0 exactly: loss is log 2, margin 0, and accuracy counts only z > 0.
    gen = torch.Generator().manual_seed(12)
    pi, _, r = _dico_inputs(5, 4, gen)
    loss, metrics = dico_loss(pi, pi.clone(), r)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-12)
    assert metrics["rewards/margin"].item() == 0.0
    assert metrics["rewards/accuracy"].item() == 0.0


def test_dico_loss_float32_output_dtype():
    gen = torch.Generator().manual_seed(11)
    pi, ref, r = _dico_inputs(8, 5, gen, dtype=torch.float32)
    loss, metrics = dico_loss(pi, ref, r)
    assert loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in metrics.values())
    _check_against_ref(pi, ref, r, beta=0.2, tau=300.0, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# dico_loss gradients
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("k,tau", [(2, 300.0), (3, 5.0), (5, 300.0), (8, 1.0)])
def test_dico_loss_gradcheck(k, tau):
    gen = torch.Generator().manual_seed(50 + k)
    B = 4
    pi, ref, _ = _dico_inputs(B, k, gen)
    # Distinct rewards with a clear gap at the top: no ties near the argmax.
    r = torch.stack([torch.randperm(k, generator=gen) for _ in range(B)]).double() / k
    pi.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p: dico_loss(p, ref, r, beta=0.2, tau=tau)[0], (pi,), eps=1e-6, atol=1e-7
    )


def test_dico_loss_no_grad_to_ref_or_rewards():
    gen = torch.Generator().manual_seed(9)
    pi, ref, r = _dico_inputs(4, 5, gen)
    pi.requires_grad_(True)
    ref.requires_grad_(True)
    r.requires_grad_(True)
    loss, _ = dico_loss(pi, ref, r)
    loss.backward()
    assert pi.grad is not None and torch.isfinite(pi.grad).all()
    assert ref.grad is None
    assert r.grad is None


def test_dico_loss_grad_only_from_policy():
    # With only ref requiring grad the loss is a constant w.r.t. autograd.
    gen = torch.Generator().manual_seed(10)
    pi, ref, r = _dico_inputs(4, 3, gen)
    ref.requires_grad_(True)
    loss, _ = dico_loss(pi, ref, r)
    assert not loss.requires_grad


# ---------------------------------------------------------------------------
# dico_loss validation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "shapes,name",
    [
        (((4, 3), (4, 2), (4, 3)), "ref_logps"),
        (((4, 3), (4, 3), (3, 3)), "rewards"),
        (((4, 1), (4, 1), (4, 1)), "k >= 2"),
        (((12,), (12,), (12,)), "policy_logps"),
        (((2, 3, 4), (2, 3, 4), (2, 3, 4)), "policy_logps"),
    ],
)
def test_dico_loss_bad_shapes(shapes, name):
    args = [torch.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=name) as exc:
        dico_loss(*args)
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------------------
# sequence_logprobs
# ---------------------------------------------------------------------------

def _seq_inputs(N, T, V, gen, scale=3.0):
    logits = torch.randn(N, T, V, generator=gen, dtype=torch.float64) * scale
    labels = torch.randint(V, (N, T), generator=gen)
    lengths = torch.randint(1, T + 1, (N,), generator=gen)
    lengths[-1] = 0  # one fully padded row
    mask = torch.arange(T)[None, :] < lengths[:, None]  # trailing padding
    return logits, labels, mask


@pytest.mark.parametrize("N,T,V,scale", [(3, 4, 7, 3.0), (5, 9, 31, 1.0), (4, 6, 50, 40.0)])
def test_sequence_logprobs_matches_loop(N, T, V, scale):
    gen = torch.Generator().manual_seed(N * 100 + V)
    logits, labels, mask = _seq_inputs(N, T, V, gen, scale)
    out = sequence_logprobs(logits, labels, mask)
    expected = ref_seq_logprobs(logits.numpy(), labels.tolist(), mask.int().tolist())
    assert out.shape == (N,) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert out[-1].item() == 0.0  # fully masked row is exactly zero

    out32 = sequence_logprobs(logits.float(), labels, mask)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), expected, rtol=1e-5, atol=1e-4)


def test_sequence_logprobs_float_mask_equals_bool_mask():
    gen = torch.Generator().manual_seed(1)
    logits, labels, mask = _seq_inputs(4, 8, 13, gen)
    a = sequence_logprobs(logits, labels, mask)
    b = sequence_logprobs(logits, labels, mask.double())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sequence_logprobs_masked_labels_have_no_effect():
    gen = torch.Generator().manual_seed(2)
    logits, labels, mask = _seq_inputs(5, 10, 17, gen)
    other = torch.where(mask, labels, torch.randint(17, labels.shape, generator=gen))
    other[~mask] = 16  # also the largest valid id
    a = sequence_logprobs(logits, labels, mask)
    b = sequence_logprobs(logits, other, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sequence_logprobs_half_inputs(dtype):
    gen = torch.Generator().manual_seed(4)
    logits, labels, mask = _seq_inputs(6, 12, 64, gen)
    half = logits.to(dtype)
    out = sequence_logprobs(half, labels, mask)
    assert out.dtype == torch.float32
    assert out[-1].item() == 0.0
    # Computed in fp32 from the exact half values: tight vs float64 on the same values.
    exact = ref_seq_logprobs(half.double().numpy(), labels.tolist(), mask.int().tolist())
    np.testing.assert_allclose(out.numpy(), exact, rtol=1e-5, atol=1e-4)
    # And within input-rounding error of the unrounded float64 logits
    # (per token ~|logit| * eps; summed over <= 12 tokens).
    full = ref_seq_logprobs(logits.numpy(), labels.tolist(), mask.int().tolist())
    tol = 0.05 if dtype == torch.float16 else 0.5
    np.testing.assert_allclose(out.numpy(), full, rtol=0, atol=tol)


def test_sequence_logprobs_gradcheck():
    gen = torch.Generator().manual_seed(5)
    logits, labels, mask = _seq_inputs(3, 4, 7, gen)
    mask[0, 2:] = False  # ensure padding inside a non-empty row
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sequence_logprobs(x, labels, mask), (logits,))


def test_sequence_logprobs_no_grad_at_masked_positions():
    gen = torch.Generator().manual_seed(6)
    logits, labels, mask = _seq_inputs(4, 6, 9, gen)
    logits.requires_grad_(True)
    sequence_logprobs(logits, labels, mask).sum().backward()
    assert (logits.grad[~mask] == 0).all()
    # Where unmasked, d/dlogits log p(label) = onehot(label) - softmax: rows sum to 0.
    torch.testing.assert_close(logits.grad[mask].sum(-1), torch.zeros(int(mask.sum()), dtype=torch.float64))


@pytest.mark.parametrize(
    "logits_shape,labels_shape,mask_shape,name",
    [
        ((2, 3, 5), (2, 4), (2, 3), "labels"),
        ((2, 3, 5), (2, 3), (3, 3), "mask"),
        ((6, 5), (6,), (6,), "logits"),
    ],
)
def test_sequence_logprobs_bad_shapes(logits_shape, labels_shape, mask_shape, name):
    with pytest.raises(ValueError, match=name):
        sequence_logprobs(
            torch.zeros(logits_shape),
            torch.zeros(labels_shape, dtype=torch.long),
            torch.ones(mask_shape, dtype=torch.bool),
        )
