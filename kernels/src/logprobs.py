"""Triton per-sequence log-probabilities from full logits.

sequence_logprobs_triton(logits [N, T, V], labels [N, T], mask [N, T]) -> [N] fp32:
sum over t of mask * (logits[label] - logsumexp(logits)), the same as
torch_path.sequence_logprobs. One program per (n, t) row streams the vocabulary
in blocks with an online log-sum-exp; the backward recomputes the softmax from
the saved logits and the per-row lse, so no fp32 copy of the logits is made.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import torch_path

BLOCK_V = 1024  # columns per step; 4 KiB of fp32 per program, enough to stream at full bandwidth


def check_inputs(logits_or_hidden: Tensor, labels: Tensor, mask: Tensor, name: str) -> None:
    """torch_path's input checks, with the dtypes the Triton kernels take (shared with the fused linear path)."""
    torch_path.check_inputs(logits_or_hidden, labels, mask, name, torch_path.TRITON_FLOATS, torch_path.TRITON_INTS)


@triton.jit
def _fwd_kernel(x_ptr, labels_ptr, mask_ptr, lse_ptr, tok_ptr, T, V, stride_n, stride_t,
                BLOCK: tl.constexpr):
    row = tl.program_id(0)
    w = tl.load(mask_ptr + row)
    if w != 0:
        # int64 offsets: N*T*V passes 2^31 at the shapes.
        base = x_ptr + (row // T).to(tl.int64) * stride_n + (row % T).to(tl.int64) * stride_t
        cols = tl.arange(0, BLOCK)
        # Per-lane running max and sum of exp(x - m). A finite start keeps lanes past V (and
        # -inf logits) at exp(-inf) = 0 instead of exp(-inf - -inf) = nan.
        m = tl.full([BLOCK], -1e30, tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for v0 in range(0, V, BLOCK):
            x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        mx = tl.max(m, 0)
        lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
        picked = tl.load(base + tl.load(labels_ptr + row)).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(tok_ptr + row, w * (picked - lse))
    else:
        # Masked rows: nothing read (labels there may be any id, even invalid).
        tl.store(lse_ptr + row, 0.0)
        tl.store(tok_ptr + row, 0.0)


@triton.jit
def _bwd_kernel(x_ptr, labels_ptr, coef_ptr, lse_ptr, g_ptr, T, V, stride_n, stride_t,
                BLOCK: tl.constexpr):
    # grad[row] = coef[row] * (onehot(label) - softmax(x[row])), coef = grad_out[n] * mask[row].
    row = tl.program_id(0)
    c = tl.load(coef_ptr + row)
    cols = tl.arange(0, BLOCK)
    g_base = g_ptr + row.to(tl.int64) * V
    if c != 0:
        base = x_ptr + (row // T).to(tl.int64) * stride_n + (row % T).to(tl.int64) * stride_t
        lse = tl.load(lse_ptr + row)
        label = tl.load(labels_ptr + row)
        for v0 in range(0, V, BLOCK):
            inb = v0 + cols < V
            x = tl.load(base + v0 + cols, mask=inb, other=0.0).to(tl.float32)
            g = c * (tl.where(v0 + cols == label, 1.0, 0.0) - tl.exp(x - lse))
            tl.store(g_base + v0 + cols, g.to(g_ptr.dtype.element_ty), mask=inb)
    else:
        for v0 in range(0, V, BLOCK):
            zero = tl.zeros([BLOCK], tl.float32).to(g_ptr.dtype.element_ty)
            tl.store(g_base + v0 + cols, zero, mask=v0 + cols < V)


def _strided(logits: Tensor) -> Tensor:
    # Any [N, T] strides are fine (e.g. logits[:, :-1]); the vocabulary must be contiguous.
    return logits if logits.stride(2) == 1 else logits.contiguous()


def _forward(logits: Tensor, labels: Tensor, mask: Tensor):
    N, T, V = logits.shape
    x = _strided(logits)
    lse = torch.empty(N * T, device=x.device, dtype=torch.float32)
    tok = torch.empty(N * T, device=x.device, dtype=torch.float32)
    if N * T > 0:
        _fwd_kernel[(N * T,)](x, labels, mask, lse, tok, T, V, x.stride(0), x.stride(1), BLOCK=BLOCK_V)
    # Per-sequence sum in a fixed order (deterministic, unlike atomics).
    return tok.view(N, T).sum(1), lse


class _SequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, mask):
        out, lse = _forward(logits, labels, mask)
        ctx.save_for_backward(logits, labels, mask, lse)
        return out

    @staticmethod
    @torch_path.once_differentiable
    def backward(ctx, grad_out):
        logits, labels, mask, lse = ctx.saved_tensors
        N, T, V = logits.shape
        x = _strided(logits)
        coef = (grad_out.float()[:, None] * mask.view(N, T)).reshape(-1).contiguous()
        grad = torch.empty((N, T, V), device=x.device, dtype=logits.dtype)
        if N * T > 0:
            _bwd_kernel[(N * T,)](x, labels, coef, lse, grad, T, V, x.stride(0), x.stride(1), BLOCK=BLOCK_V)
        return grad, None, None


def prepare_labels_mask(labels: Tensor, mask: Tensor):
    """Contiguous flat int labels and a float32 mask the kernels can index by row."""
    return labels.reshape(-1).contiguous(), mask.reshape(-1).to(torch.float32).contiguous()


def sequence_logprobs_triton(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence masked sum of token log-probs, [N] fp32; differentiable w.r.t. logits.

    Without grad (torch.no_grad() or logits.requires_grad False, e.g. the frozen
    reference model) nothing is saved and the result has no grad_fn.
    """
    check_inputs(logits, labels, mask, "logits")
    torch_path.check_labels(labels, mask, logits.shape[2])
    lab, msk = prepare_labels_mask(labels, mask)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SequenceLogprobs.apply(logits, lab, msk)
    return _forward(logits, lab, msk)[0]
