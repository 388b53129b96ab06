"""Triton DiCO loss (kernels/src/loss.py) against the plain-torch path run in float64.

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1);
the `gpu` tests repeat the checks on CUDA with fresh random inputs.
"""

import math

import pytest
import torch

import dico_scale.kernels.loss as dl
from dico_scale.kernels.loss import METRIC_NAMES, dico_loss_triton
from dico_scale.kernels.torch_path import dico_loss

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernel skips cannot pass."""
    monkeypatch.setattr(dl, "_empty", lambda *a, **kw: torch.full(a[0], float("nan"), **kw))


def _inputs(B, k, gen, dtype=torch.float32, reward_values=None, reward_scale=1.0, device=DEV):
    pi = -torch.rand(B, k, generator=gen, dtype=torch.float64) * 20 - 1
    ref = pi + torch.randn(B, k, generator=gen, dtype=torch.float64)
    if reward_values is None:
        r = torch.rand(B, k, generator=gen, dtype=torch.float64) * reward_scale
    else:  # a small value set: exact ties are frequent
        vals = torch.tensor(reward_values, dtype=torch.float64)
        r = vals[torch.randint(len(reward_values), (B, k), generator=gen)]
    return [t.to(device=device, dtype=dtype) for t in (pi, ref, r)]


def _torch_path64(pi, ref, r, beta, tau):
    """Loss, metrics and d loss / d pi in float64 on exactly the (possibly rounded) inputs."""
    p = pi.detach().double().requires_grad_(True)
    loss, metrics = dico_loss(p, ref.double(), r.double(), beta=beta, tau=tau)
    loss.backward()
    return loss.detach(), {n: v.item() for n, v in metrics.items()}, p.grad


def _z64(pi, ref, r, beta, tau):
    """Per-row z in float64 (first-max winner, loser softmax), to know which rows sit at z ~ 0."""
    pi, ref, r = pi.double(), ref.double(), r.double()
    k = r.shape[1]
    idx = torch.arange(k, device=r.device)
    win = torch.where(r == r.max(1, keepdim=True).values, idx, k).min(1).values
    is_w = idx[None, :] == win[:, None]
    r_w = r[is_w][:, None]
    gamma = torch.softmax((tau * (r_w - r)).masked_fill(is_w, float("-inf")), dim=1)
    return beta * ((pi[is_w] - (gamma * pi).sum(1)) - (ref[is_w] - (gamma * ref).sum(1)))


def _run(pi, ref, r, beta, tau):
    p = pi.detach().clone().requires_grad_(True)
    loss, metrics = dico_loss_triton(p, ref, r, beta=beta, tau=tau)
    loss.backward()
    return loss.detach(), metrics, p.grad


def _rel(a, b, floor):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), floor)


def _check(pi, ref, r, beta=0.2, tau=300.0, rtol=1e-5, grad_rtol=None):
    exp_loss, exp_metrics, exp_grad = _torch_path64(pi, ref, r, beta, tau)
    loss, metrics, grad = _run(pi, ref, r, beta, tau)
    out_dtype = torch.float64 if pi.dtype == torch.float64 else torch.float32
    assert loss.dim() == 0 and loss.dtype == out_dtype
    assert _rel(loss, exp_loss, 1e-30) < rtol, (loss.item(), exp_loss.item())
    assert list(metrics) == list(exp_metrics) == list(METRIC_NAMES)
    # Accuracy counts z > 0: rows with z ~ 0 (exact cancellation of rounded half inputs) may flip.
    z64 = _z64(pi, ref, r, beta, tau)
    assert -torch.nn.functional.logsigmoid(z64).mean().item() == pytest.approx(exp_loss.item(), rel=1e-9)
    acc_tol = (z64.abs() < 1e-4).double().mean().item() + rtol
    for name, val in metrics.items():
        assert val.dim() == 0 and not val.requires_grad and val.dtype == out_dtype, name
        if name == "rewards/accuracy":
            assert abs(val.item() - exp_metrics[name]) <= acc_tol, (val.item(), exp_metrics[name])
        else:  # means of terms of size ~1; a floor of 0.1 absorbs cancellation in the margin
            assert _rel(val, torch.tensor(exp_metrics[name], dtype=torch.float64), 0.1) < rtol, \
                (name, val.item(), exp_metrics[name])
    assert grad.dtype == pi.dtype and grad.shape == pi.shape
    assert _rel(grad, exp_grad, 1e-30) < (grad_rtol or rtol)
    return loss, metrics, grad


# ---------------------------------------------------------------------------
# CPU (interpreter) and CUDA alike
# ---------------------------------------------------------------------------

def test_hand_checked_values():
    # k=2: winner 0, gamma = [0, 1], z = 0.2 * ((-1 + 3) - 0) = 0.4.
    pi = torch.tensor([[-1.0, -3.0]], device=DEV)
    ref = torch.tensor([[-2.0, -2.0]], device=DEV)
    r = torch.tensor([[0.9, 0.1]], device=DEV)
    loss, metrics, grad = _run(pi, ref, r, 0.2, 300.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.4)), rel=1e-6)
    s = 1.0 / (1.0 + math.exp(0.4))  # sigmoid(-z)
    torch.testing.assert_close(grad.cpu(), torch.tensor([[-0.2 * s, 0.2 * s]]), rtol=1e-6, atol=0)
    assert metrics["rewards/accuracy"].item() == 1.0

    # k=3, tie for the max (winner = index 0), tau = 0: gamma uniform over the losers.
    pi = torch.tensor([[-1.0, -2.0, -4.0]], device=DEV)
    r = torch.tensor([[0.5, 0.5, 0.2]], device=DEV)
    loss, metrics, grad = _run(pi, torch.zeros_like(pi), r, 1.0, 0.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    expected = {"rewards/chosen": -1.0, "rewards/rejected": -3.0, "rewards/margin": 2.0,
                "rewards/accuracy": 1.0, "logps/chosen": -1.0, "logps/rejected": -3.0,
                "score/winner": 0.5, "score/mean": 0.4}
    assert {n: pytest.approx(v, rel=1e-6) for n, v in expected.items()} == {n: v.item() for n, v in metrics.items()}
    s = 1.0 / (1.0 + math.exp(2.0))
    torch.testing.assert_close(grad.cpu(), torch.tensor([[-s, s / 2, s / 2]]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 7, 8])
def test_random_vs_float64(k):
    gen = torch.Generator().manual_seed(100 + k)
    for B in (1, 9):
        pi, ref, r = _inputs(B, k, gen)
        for beta, tau in [(0.2, 300.0), (0.5, 3.0), (1.0, 0.0)]:
            _check(pi, ref, r, beta, tau)


@pytest.mark.parametrize("k", [2, 5, 16])
def test_batch_spans_several_blocks(k):
    B = 5000
    _, meta = dl._launch_args(torch.zeros(B, k), torch.zeros(B, k), torch.zeros(B, k), 0.2, 300.0)
    assert B > 2 * meta["BLOCK_B"]  # the forward loops over blocks; the backward has several programs
    gen = torch.Generator().manual_seed(k)
    _check(*_inputs(B, k, gen))


def test_float64_inputs_are_exact():
    gen = torch.Generator().manual_seed(3)
    _check(*_inputs(33, 5, gen, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("k", [3, 5, 8])
def test_reward_ties_pick_first_index(k):
    gen = torch.Generator().manual_seed(20 + k)
    pi, ref, r = _inputs(200, k, gen, reward_values=[0.1, 0.25, 0.4])
    top = r.max(dim=1, keepdim=True).values
    assert ((r == top).sum(dim=1) > 1).any()  # tie-breaking really exercised
    _check(pi, ref, r, tau=300.0)
    _check(pi, ref, r, tau=2.0)
    # Direct: candidates 1 and 3 tie for the max, so the winner is 1.
    pi = torch.tensor([[-5.0, -7.0, -3.0, -1.0]], device=DEV)
    r = torch.tensor([[0.2, 0.9, 0.5, 0.9]], device=DEV)
    _, metrics, grad = _run(pi, torch.zeros_like(pi), r, 0.2, 300.0)
    assert metrics["logps/chosen"].item() == -7.0
    # gamma favours the largest reward gap (candidate 0); the tied loser 3 gets ~e^-210.
    assert grad[0, 1].item() < 0 < grad[0, 0].item()
    assert grad.sum().abs().item() < 1e-7  # onehot - gamma sums to zero


@pytest.mark.parametrize("k", [2, 5, 8])
def test_all_equal_rewards(k):
    gen = torch.Generator().manual_seed(7 + k)
    pi, ref, _ = _inputs(6, k, gen)
    r = torch.full_like(pi, 0.37)
    _, metrics, _ = _check(pi, ref, r)
    assert metrics["logps/chosen"].item() == pytest.approx(pi[:, 0].mean().item(), rel=1e-6)
    assert metrics["logps/rejected"].item() == pytest.approx(pi[:, 1:].mean(1).mean().item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    # fp32 math on the rounded half values; only the stored gradient is rounded to the input dtype.
    gen = torch.Generator().manual_seed(4)
    pi, ref, r = _inputs(700, 5, gen, dtype=dtype)
    grad_rtol = 1e-3 if dtype == torch.float16 else 1e-2
    _check(pi, ref, r, rtol=1e-5, grad_rtol=grad_rtol)


def test_mixed_input_dtypes():
    gen = torch.Generator().manual_seed(5)
    pi, ref, r = _inputs(40, 4, gen)
    _check(pi, ref.to(torch.bfloat16), r.double())


def test_large_tau_times_reward_gap_is_finite():
    # tau * dr reaches ~900: a softmax without max subtraction overflows.
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.float16):
        _check(*_inputs(32, 8, gen, dtype=dtype, reward_scale=3.0), grad_rtol=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rewards_give_a_non_finite_loss_never_an_error(bad):
    """An evaluator that returned nan (or a reward weight that overflowed): the loss is not finite on both paths, so
    the training loop skips the step and counts it (train.max_nonfinite_steps); an all-nan row too."""
    pi = torch.randn(3, 4, device=DEV, requires_grad=True)
    r = torch.tensor([[1.0, bad, 0.0, 2.0], [1.0, 2.0, 3.0, 4.0], [bad] * 4], device=DEV)
    for loss_fn in (dico_loss, dico_loss_triton):
        loss, _ = loss_fn(pi, torch.zeros_like(pi), r)
        assert not torch.isfinite(loss), loss_fn


def test_large_and_tiny_margins():
    # z = -2000 and z = +2000: log(sigmoid) would be -inf / 0; and z = 40: loss ~ e^-40 must
    # keep its relative precision (log(1 + x) rounds it to zero, log1p does not).
    pi = torch.tensor([[0.0, -1e4], [-1e4, 0.0]], device=DEV)
    r = torch.tensor([[1.0, 0.0], [1.0, 0.0]], device=DEV)
    loss, _, grad = _check(pi, torch.zeros_like(pi), r)
    assert torch.isfinite(grad).all()
    pi = torch.tensor([[0.0, -200.0]], device=DEV)
    loss, _, _ = _check(pi, torch.zeros_like(pi), torch.tensor([[1.0, 0.0]], device=DEV))
    assert 0 < loss.item() == pytest.approx(math.exp(-40.0), rel=1e-5)


def test_grad_output_scale_and_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(8)
    pi, ref, r = (t.t().contiguous().t() for t in _inputs(12, 5, gen))  # column-major views
    assert not pi.is_contiguous()
    _, _, exp_grad = _torch_path64(pi, ref, r, 0.2, 300.0)
    p = pi.detach().clone().requires_grad_(True)
    loss, _ = dico_loss_triton(p, ref, r)
    (3.0 * loss).backward()
    torch.testing.assert_close(p.grad.double(), 3.0 * exp_grad, rtol=1e-5, atol=1e-9)


def test_forward_only_path():
    gen = torch.Generator().manual_seed(9)
    pi, ref, r = _inputs(10, 5, gen)
    exp_loss, exp_metrics, _ = _torch_path64(pi, ref, r, 0.2, 300.0)
    p = pi.clone().requires_grad_(True)
    with torch.no_grad():
        loss, metrics = dico_loss_triton(p, ref, r)
    assert loss.grad_fn is None and not loss.requires_grad
    loss2, _ = dico_loss_triton(pi, ref, r)  # no input requires grad
    assert loss2.grad_fn is None
    for val in (loss, loss2):
        assert val.item() == pytest.approx(exp_loss.item(), rel=1e-5)
    assert metrics["rewards/margin"].item() == pytest.approx(exp_metrics["rewards/margin"], rel=1e-4)


def test_gradient_only_into_policy():
    gen = torch.Generator().manual_seed(10)
    pi, ref, r = (t.requires_grad_(True) for t in _inputs(4, 5, gen))
    loss, metrics = dico_loss_triton(pi, ref, r)
    assert loss.requires_grad and not any(m.requires_grad for m in metrics.values())
    loss.backward()
    assert pi.grad is not None and ref.grad is None and r.grad is None
    loss, _ = dico_loss_triton(pi.detach(), ref, r)  # only ref requires grad: a constant
    assert not loss.requires_grad


@pytest.mark.parametrize("shapes", [
    ((4, 3), (4, 2), (4, 3)),
    ((4, 3), (4, 3), (3, 3)),
    ((4, 1), (4, 1), (4, 1)),
    ((12,), (12,), (12,)),
    ((2, 3, 4), (2, 3, 4), (2, 3, 4)),
])
def test_bad_shapes_match_torch_path_messages(shapes):
    args = [torch.zeros(s) for s in shapes]
    with pytest.raises(ValueError) as expected:
        dico_loss(*args)
    with pytest.raises(ValueError) as got:
        dico_loss_triton(*args)
    assert str(got.value) == str(expected.value)


# ---------------------------------------------------------------------------
# GPU: fresh random inputs each run, realistic and large batches
# ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float64, 1e-12)])
@pytest.mark.parametrize("B,k", [(8, 5), (4096, 5), (30000, 16), (333, 2)])
def test_gpu_vs_float64(dtype, rtol, B, k):
    gen = torch.Generator().manual_seed(torch.seed())
    pi, ref, r = _inputs(B, k, gen, dtype=dtype, device="cuda")
    _check(pi, ref, r, rtol=rtol)
    _check(pi, ref, r, beta=0.5, tau=2.0, rtol=rtol)


@pytest.mark.gpu
def test_gpu_ties_and_graph_capture():
    gen = torch.Generator().manual_seed(torch.seed())
    pi, ref, r = _inputs(4096, 5, gen, reward_values=[0.0, 0.5, 1.0], device="cuda")
    _check(pi, ref, r)
    # Two launches, no host sync: the whole step captures into a CUDA graph.
    p = pi.clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        dico_loss_triton(p, ref, r)[0].backward()
    torch.cuda.current_stream().wait_stream(stream)
    p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, metrics = dico_loss_triton(p, ref, r)
        loss.backward()
    p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    exp_loss, exp_metrics, exp_grad = _torch_path64(pi, ref, r, 0.2, 300.0)
    assert _rel(loss, exp_loss, 1e-30) < 1e-5
    assert _rel(p.grad, exp_grad, 1e-30) < 1e-5
