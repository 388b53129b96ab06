"""DiCO loss over [B, k] candidate groups as two Triton launches.

Forward: one program walks B in row blocks and fuses winner selection (first max),
the gamma softmax over the k-1 losers, the weighted sums, logsigmoid, the batch mean
and all metrics; it writes the loss and an 8-entry metrics buffer, so reading them
needs no host sync. A single program keeps the batch reduction deterministic without
atomics; the loss is tiny next to the log-prob kernels, so B in the tens of thousands
is a few dozen block iterations.

Backward: one launch over row blocks recomputes gamma and z from the inputs (cheaper
than saving them) and writes d loss / d policy = -g/B * sigmoid(-z) * beta * (onehot_w - gamma).

Semantics, metric names and error messages follow kernels/src/torch_path.py:dico_loss.
"""

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .torch_path import check_dico_inputs, once_differentiable

METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
    "score/winner",
    "score/mean",
)

_TILE = 4096  # elements per [BLOCK_B, BLOCK_K] tile: registers stay bounded for any k
_empty = torch.empty  # output allocator; tests swap in a NaN-filled one to catch unwritten elements


@triton.jit
def _group_terms(pi_ptr, ref_ptr, r_ptr, s_pi0, s_pi1, s_ref0, s_ref1, s_r0, s_r1, row0, B, K,
                 beta: tl.constexpr, tau: tl.constexpr, ACC: tl.constexpr, RCMP: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row DiCO terms for rows row0 .. row0+BLOCK_B, in ACC precision."""
    rows = row0 + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < B
    col_ok = cols[None, :] < K
    ok = row_ok[:, None] & col_ok
    # Padded rows load zeros (finite everywhere); padded columns are -inf for the argmax.
    # Winner = first max over the rewards widened exactly (half -> fp32, fp64 stays), so
    # no cast can create or break a tie.
    r_raw = tl.load(r_ptr + rows[:, None] * s_r0 + cols[None, :] * s_r1, mask=ok, other=0.0).to(RCMP)
    pi = tl.load(pi_ptr + rows[:, None] * s_pi0 + cols[None, :] * s_pi1, mask=ok, other=0.0).to(ACC)
    ref = tl.load(ref_ptr + rows[:, None] * s_ref0 + cols[None, :] * s_ref1, mask=ok, other=0.0).to(ACC)

    r_sel = tl.where(col_ok, r_raw, float("-inf"))
    r_max = tl.max(r_sel, axis=1)
    win = tl.min(tl.where(r_sel == r_max[:, None], cols[None, :], BLOCK_K), axis=1)
    is_w = cols[None, :] == win[:, None]

    r = r_raw.to(ACC)
    r_w = tl.sum(tl.where(is_w, r, 0.0), axis=1)
    # Softmax over losers only; the max subtraction keeps tau * dr ~ 1e3 finite.
    s = tl.where(is_w | (cols[None, :] >= K), float("-inf"), tau * (r_w[:, None] - r))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    gamma = e / tl.sum(e, axis=1)[:, None]

    pi_w = tl.sum(tl.where(is_w, pi, 0.0), axis=1)
    ref_w = tl.sum(tl.where(is_w, ref, 0.0), axis=1)
    pi_l = tl.sum(gamma * pi, axis=1)
    ref_l = tl.sum(gamma * ref, axis=1)
    z = beta * ((pi_w - pi_l) - (ref_w - ref_l))
    return rows, row_ok, ok, is_w, gamma, r, r_w, pi_w, pi_l, ref_w, ref_l, z


@triton.jit
def _log1p_small(x):
    # log1p without libdevice (unavailable in the interpreter): Goldberg's correction
    # keeps full relative precision when 1 + x rounds.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _dico_fwd_kernel(pi_ptr, ref_ptr, r_ptr, loss_ptr, met_ptr,
                     s_pi0, s_pi1, s_ref0, s_ref1, s_r0, s_r1, B, K,
                     beta: tl.constexpr, tau: tl.constexpr, ACC: tl.constexpr, RCMP: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # Per-lane partial sums across blocks, reduced once at the end.
    a_loss = tl.zeros([BLOCK_B], ACC)
    a_chosen = tl.zeros([BLOCK_B], ACC)
    a_rejected = tl.zeros([BLOCK_B], ACC)
    a_margin = tl.zeros([BLOCK_B], ACC)
    a_acc = tl.zeros([BLOCK_B], ACC)
    a_lpw = tl.zeros([BLOCK_B], ACC)
    a_lpl = tl.zeros([BLOCK_B], ACC)
    a_rw = tl.zeros([BLOCK_B], ACC)
    a_r = tl.zeros([BLOCK_B], ACC)
    for row0 in range(0, B, BLOCK_B):
        rows, row_ok, ok, is_w, gamma, r, r_w, pi_w, pi_l, ref_w, ref_l, z = _group_terms(
            pi_ptr, ref_ptr, r_ptr, s_pi0, s_pi1, s_ref0, s_ref1, s_r0, s_r1, row0, B, K,
            beta, tau, ACC, RCMP, BLOCK_B, BLOCK_K)
        # -logsigmoid(z) = max(-z, 0) + log1p(exp(-|z|)): finite for any |z|.
        nls = tl.maximum(-z, 0.0) + _log1p_small(tl.exp(-tl.abs(z)))
        chosen = beta * (pi_w - ref_w)
        rejected = beta * (pi_l - ref_l)
        a_loss += tl.where(row_ok, nls, 0.0)
        a_chosen += tl.where(row_ok, chosen, 0.0)
        a_rejected += tl.where(row_ok, rejected, 0.0)
        a_margin += tl.where(row_ok, chosen - rejected, 0.0)
        a_acc += tl.where(row_ok & (z > 0), 1.0, 0.0)
        a_lpw += tl.where(row_ok, pi_w, 0.0)
        a_lpl += tl.where(row_ok, pi_l, 0.0)
        a_rw += tl.where(row_ok, r_w, 0.0)
        a_r += tl.sum(tl.where(ok, r, 0.0), axis=1)
    tl.store(loss_ptr, tl.sum(a_loss, axis=0) / B)
    tl.store(met_ptr + 0, tl.sum(a_chosen, axis=0) / B)
    tl.store(met_ptr + 1, tl.sum(a_rejected, axis=0) / B)
    tl.store(met_ptr + 2, tl.sum(a_margin, axis=0) / B)
    tl.store(met_ptr + 3, tl.sum(a_acc, axis=0) / B)
    tl.store(met_ptr + 4, tl.sum(a_lpw, axis=0) / B)
    tl.store(met_ptr + 5, tl.sum(a_lpl, axis=0) / B)
    tl.store(met_ptr + 6, tl.sum(a_rw, axis=0) / B)
    tl.store(met_ptr + 7, tl.sum(a_r, axis=0) / (B * K))


@triton.jit
def _dico_bwd_kernel(pi_ptr, ref_ptr, r_ptr, gout_ptr, dpi_ptr,
                     s_pi0, s_pi1, s_ref0, s_ref1, s_r0, s_r1, B, K,
                     beta: tl.constexpr, tau: tl.constexpr, ACC: tl.constexpr, RCMP: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, row_ok, ok, is_w, gamma, r, r_w, pi_w, pi_l, ref_w, ref_l, z = _group_terms(
        pi_ptr, ref_ptr, r_ptr, s_pi0, s_pi1, s_ref0, s_ref1, s_r0, s_r1,
        tl.program_id(0) * BLOCK_B, B, K, beta, tau, ACC, RCMP, BLOCK_B, BLOCK_K)
    g = tl.load(gout_ptr).to(ACC)
    # sigmoid(-z) without overflow for either sign of z.
    e = tl.exp(-tl.abs(z))
    sig_neg = tl.where(z >= 0, e / (1.0 + e), 1.0 / (1.0 + e))
    coef = -(g / B) * sig_neg * beta
    d = coef[:, None] * (tl.where(is_w, 1.0, 0.0) - gamma)
    cols = tl.arange(0, BLOCK_K)
    tl.store(dpi_ptr + rows[:, None] * K + cols[None, :], d.to(dpi_ptr.dtype.element_ty), mask=ok)


def _launch_args(pi: Tensor, ref: Tensor, r: Tensor, beta: float, tau: float):
    B, K = pi.shape
    block_k = max(2, triton.next_power_of_2(K))
    block_b = min(max(16, triton.next_power_of_2(B)), max(16, _TILE // block_k))
    acc = tl.float64 if pi.dtype == torch.float64 else tl.float32
    rcmp = tl.float64 if r.dtype == torch.float64 else tl.float32
    strides = (*pi.stride(), *ref.stride(), *r.stride())
    meta = dict(beta=float(beta), tau=float(tau), ACC=acc, RCMP=rcmp, BLOCK_B=block_b, BLOCK_K=block_k,
                num_warps=8 if block_b * block_k >= 2048 else 4)
    return strides, meta


def _forward(pi: Tensor, ref: Tensor, r: Tensor, beta: float, tau: float) -> Tuple[Tensor, Tensor]:
    B, K = pi.shape
    out_dtype = torch.float64 if pi.dtype == torch.float64 else torch.float32
    loss = _empty((), dtype=out_dtype, device=pi.device)
    metrics = _empty((len(METRIC_NAMES),), dtype=out_dtype, device=pi.device)
    strides, meta = _launch_args(pi, ref, r, beta, tau)
    _dico_fwd_kernel[(1,)](pi, ref, r, loss, metrics, *strides, B, K, **meta)
    return loss, metrics


class _DicoLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pi, ref, r, beta, tau):
        loss, metrics = _forward(pi, ref, r, beta, tau)
        ctx.save_for_backward(pi, ref, r)
        ctx.beta, ctx.tau = beta, tau
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_metrics):
        pi, ref, r = ctx.saved_tensors
        B, K = pi.shape
        dpi = _empty((B, K), dtype=pi.dtype, device=pi.device)
        strides, meta = _launch_args(pi, ref, r, ctx.beta, ctx.tau)
        grid = (triton.cdiv(B, meta["BLOCK_B"]),)
        _dico_bwd_kernel[grid](pi, ref, r, grad_loss.contiguous(), dpi, *strides, B, K, **meta)
        return dpi, None, None, None, None


def dico_loss_triton(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    beta: float = 0.2,
    tau: float = 300.0,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Triton DiCO loss; same contract as kernels.torch_path.dico_loss.

    Inputs [B, k], k >= 2, any float dtype (fp16/bf16/fp32 accumulate in fp32, fp64 in
    fp64). Gradient flows into policy_logps only. Metrics are 0-dim detached views of
    one device buffer written by the forward kernel.
    """
    check_dico_inputs(policy_logps, ref_logps, rewards)
    ref, r = ref_logps.detach(), rewards.detach()
    if torch.is_grad_enabled() and policy_logps.requires_grad:
        loss, metrics = _DicoLossFn.apply(policy_logps, ref, r, beta, tau)
    else:  # forward only: nothing saved, no autograd node
        loss, metrics = _forward(policy_logps.detach(), ref, r, beta, tau)
    return loss, {name: metrics[i] for i, name in enumerate(METRIC_NAMES)}
