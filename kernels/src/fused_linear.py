"""Per-sequence log-probs straight from decoder states and the lm_head, never writing [N*T, V] logits.

fused_linear_sequence_logprobs_triton(hidden [N, T, H], weight [V, H], labels, mask) -> [N] fp32
equals torch_path.fused_linear_sequence_logprobs (with softcap: of Gemma 2's softcap * tanh(logits / softcap)).
Logits are matmul tiles that live only in registers: the forward keeps an online log-sum-exp
per row, the backward recomputes them.
Rows are addressed through index arrays, so compaction (masked-in rows only) and exact
dedup (bitwise-equal rows computed once) cost no copies of the hidden states (the sync-free path
without them reads masked rows as zeros, from one copy: _rows). docs/kernels.md has the design.
"""

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .logprobs import check_inputs
from .torch_path import check_labels, check_softcap, check_weight, once_differentiable

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Below this many token rows (N*T) "auto" neither compacts nor dedups: no host syncs, so the
# 40 x 20 paper shape (800 rows) captures in a CUDA graph; there the launches dominate anyway.
DEDUP_MIN_ROWS = 4096
# fp32 accumulator for one vocabulary chunk of dW; bounds the backward's extra memory.
DW_CHUNK_BYTES = 32 << 20
# Half-precision tiles in fp32 (tf32 dots), as the interpreter must: on a GPU, a diagnostic that tells the bf16 operand
# path's faults from the algorithm's (tests/test_gpu_kernels.py runs both).
UPCAST_HALF = False
# The dW operand as a logits tile of its own, W[cols] @ h[rows]^T, instead of the transpose of dh's probability tile:
# one more matmul per tile (4 instead of 3), and no tl.trans of a dot result, which Triton miscompiles on Hopper
# (triton-lang/triton#6124; flash-linear-attention #640, #984). On an H100 (triton 3.6, 2026-12-06) the tl.trans
# variant lost dhidden's softmax term with bf16 tiles at every autotune config, and this one passed at every config
# (tests/test_gpu_kernels.py::test_fused_linear_backward_per_config; BENCHMARKS.md). False: the tl.trans variant,
# kept for that test.
TRANSPOSE_FREE = True
# Blocks the interpreter runs with (autotune with several configs fails there).
_INTERP_META = dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=32)


def _tuned(configs, **kw):
    """@triton.autotune on a GPU; the bare kernel (fixed _INTERP_META blocks) in the interpreter."""
    def wrap(fn):
        return fn if INTERPRET else triton.autotune(configs, **kw)(fn)
    return wrap


def _cfgs(*specs):
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
            for m, n, k, w, s in specs]


# H100 guesses (bf16 inputs, fp32 accumulators): 128x128 / 128x256 tiles, K = 64.
_FWD_CONFIGS = _cfgs((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 4, 4))
_BWD_CONFIGS = _cfgs((128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4))


@triton.jit
def _logits_tile(h_ptr, hrows, row_ok, w_ptr, cols, col_ok, H, stride_h, stride_w,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 tile of h[hrows] @ W[cols].T, summed over H in BLOCK_K steps."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_ptr + hrows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter's half-precision tl.dot is wrong
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _cap(x, SOFTCAP: tl.constexpr):
    """SOFTCAP * tanh(x / SOFTCAP), tanh through exp (the interpreter has no libdevice): exact at +-inf, and
    its error near 0 (~1e-7 of SOFTCAP) is below an fp32 logit's own rounding at the caps models use (30)."""
    e = tl.exp(-2.0 * tl.abs(x / SOFTCAP))
    t = (1.0 - e) / (1.0 + e)
    return SOFTCAP * tl.where(x < 0, -t, t)


@triton.jit
def _grad_probs(x, lse, ok, SOFTCAP: tl.constexpr):
    """d log-softmax / d raw logits' dense part of a tile of raw logits x: softmax(capped x) (lse broadcast to x),
    under a softcap times the cap's slope 1 - tanh^2; 0 where not ok."""
    if SOFTCAP > 0:
        x = _cap(x, SOFTCAP)
    p = tl.where(ok, tl.exp(x - lse), 0.0)
    if SOFTCAP > 0:
        p = p * (1.0 - (x / SOFTCAP) * (x / SOFTCAP))
    return p


@_tuned(_FWD_CONFIGS, key=["H"])
@triton.jit
def _lse_kernel(h_ptr, urow_ptr, w_ptr, part_ptr, U, V, H, split_len, stride_h, stride_w,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    # Program (row tile, vocabulary split): online log-sum-exp over the split's tiles, written
    # to part[split, row]; torch merges the splits. Splits keep the GPU busy when rows are few.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < U
    hrows = tl.load(urow_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    v_begin = pid_s * split_len
    v_end = tl.minimum(v_begin + split_len, V)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_N):  # every tile has >= 1 valid column, so m is finite after it
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_end
        x = _logits_tile(h_ptr, hrows, row_ok, w_ptr, cols.to(tl.int64), col_ok, H, stride_h, stride_w,
                         BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        if SOFTCAP > 0:
            x = _cap(x, SOFTCAP)
        x = tl.where(col_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
    tl.store(part_ptr + pid_s * U + rows, m + tl.log(s), mask=row_ok)


@triton.jit
def _label_logit_kernel(h_ptr, trow_ptr, w_ptr, lab_ptr, tmask_ptr, out_ptr, H, stride_h, stride_w,
                        BLOCK_H: tl.constexpr, SOFTCAP: tl.constexpr):
    # One program per token: fp32 dot W[label] . h (per token, not per unique row: labels differ), capped.
    i = tl.program_id(0)
    acc = tl.zeros([BLOCK_H], tl.float32)
    if tl.load(tmask_ptr + i) != 0:  # masked tokens may carry invalid label ids: never read them
        hrow = tl.load(trow_ptr + i).to(tl.int64)
        lab = tl.load(lab_ptr + i).to(tl.int64)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            h = tl.load(h_ptr + hrow * stride_h + ks, mask=ks < H, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + lab * stride_w + ks, mask=ks < H, other=0.0).to(tl.float32)
            acc += h * w
    z = tl.sum(acc, 0)
    if SOFTCAP > 0:
        z = _cap(z, SOFTCAP)
    tl.store(out_ptr + i, z)


@_tuned(_BWD_CONFIGS, key=["H"], reset_to_zero=["g_ptr", "d_ptr"])
@triton.jit
def _bwd_kernel(h_ptr, urow_ptr, w_ptr, lse_ptr, coef_ptr, g_ptr, d_ptr, U, H, v_begin, v_end,
                stride_h, stride_w, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr, TRANSPOSE_FREE: tl.constexpr, SOFTCAP: tl.constexpr):
    # Program (row tile, vocabulary tile): recompute p = softmax tile (under a softcap, times the cap's slope
    # 1 - tanh^2: the gradient reaches the raw logits), then per H block
    #   G[u] += p @ W[cols]             (the dense part of dh)
    #   D[cols] += (coef_u * p).T @ h_u  (the dense part of dW)
    # with fp32 atomics. One pass recomputes each logit once: 3 matmuls in all, like the
    # forward-plus-backward floor of 6*R*V*H flops (4 with TRANSPOSE_FREE).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < U
    hrows = tl.load(urow_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = v_begin + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < v_end
    cols64 = cols.to(tl.int64)
    x = _logits_tile(h_ptr, hrows, row_ok, w_ptr, cols64, col_ok, H, stride_h, stride_w,
                     BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    p = _grad_probs(x, lse[:, None], row_ok[:, None] & col_ok[None, :], SOFTCAP)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    if TRANSPOSE_FREE:  # the same probabilities [BLOCK_N, BLOCK_M], transposed by the matmul's operand order
        xt = _logits_tile(w_ptr, cols64, col_ok, h_ptr, hrows, row_ok, H, stride_w, stride_h,
                          BLOCK_N, BLOCK_M, BLOCK_K, UPCAST, PRECISION)
        pct = _grad_probs(xt, lse[None, :], col_ok[:, None] & row_ok[None, :], SOFTCAP) * coef[None, :]
    else:
        pct = tl.trans(p * coef[:, None])
    # Both probability operands are cast once, to the input dtype (bf16 on GPU: tensor cores,
    # half the registers), before the H loop; fp32 accumulate. The interpreter keeps fp32.
    if UPCAST:
        p_in = p
        pct_in = pct
    else:
        p_in = p.to(w_ptr.dtype.element_ty)
        pct_in = pct.to(h_ptr.dtype.element_ty)
    rows64 = rows.to(tl.int64)
    dcols = (cols - v_begin).to(tl.int64)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        hk = tl.load(h_ptr + hrows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wk = tl.load(w_ptr + cols64[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            hk = hk.to(tl.float32)
            wk = wk.to(tl.float32)
        g = tl.dot(p_in, wk, input_precision=PRECISION)
        tl.atomic_add(g_ptr + rows64[:, None] * H + ks[None, :], g, mask=row_ok[:, None] & k_ok[None, :])
        d = tl.dot(pct_in, hk, input_precision=PRECISION)
        tl.atomic_add(d_ptr + dcols[:, None] * H + ks[None, :], d, mask=col_ok[:, None] & k_ok[None, :])


@triton.jit
def _onehot_dw_kernel(h_ptr, trow_ptr, lab_ptr, c_ptr, d_ptr, H, v_begin, v_end, stride_h, BLOCK_H: tl.constexpr):
    # D[label_i] -= c_i * h_i for tokens whose label falls in this vocabulary chunk.
    i = tl.program_id(0)
    c = tl.load(c_ptr + i)
    lab = tl.load(lab_ptr + i).to(tl.int64)
    if (c != 0) & (lab >= v_begin) & (lab < v_end):
        hrow = tl.load(trow_ptr + i).to(tl.int64)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            h = tl.load(h_ptr + hrow * stride_h + ks, mask=ks < H, other=0.0).to(tl.float32)
            tl.atomic_add(d_ptr + (lab - v_begin) * H + ks, -c * h, mask=ks < H)


@triton.jit
def _dh_kernel(w_ptr, lab_ptr, c_ptr, c1_ptr, inv_ptr, trow_ptr, g_ptr, dh_ptr, H, stride_w, BLOCK_H: tl.constexpr):
    # dh[row_i] = c1_i * W[label_i] - c_i * G[u(i)] (c1 = c times the label logit's slope under a softcap); rows with
    # c_i = 0 are left as allocated (zeros).
    i = tl.program_id(0)
    c = tl.load(c_ptr + i)
    if c != 0:
        c1 = tl.load(c1_ptr + i)
        lab = tl.load(lab_ptr + i).to(tl.int64)
        u = tl.load(inv_ptr + i).to(tl.int64)
        hrow = tl.load(trow_ptr + i).to(tl.int64)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            w = tl.load(w_ptr + lab * stride_w + ks, mask=ks < H, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + u * H + ks, mask=ks < H, other=0.0)
            tl.store(dh_ptr + hrow * H + ks, (c1 * w - c * g).to(dh_ptr.dtype.element_ty), mask=ks < H)


@dataclass
class _Plan:
    """Which hidden rows are tokens (trow), which are unique (urow), and token -> unique (inv)."""
    trow: Tensor  # [Rt] int64 hidden row of each token that counts
    lab: Tensor   # [Rt] labels of those tokens
    tmask: Tensor  # [Rt] fp32 mask weights of those tokens
    urow: Tensor  # [U] int64 hidden row of each unique row
    inv: Tensor   # [Rt] int64 index into urow


def _dedups(R: int, dedup) -> bool:
    """dedup resolved: "auto" compacts and dedups from DEDUP_MIN_ROWS rows on."""
    return R >= DEDUP_MIN_ROWS if dedup == "auto" else bool(dedup)


def _rows(h2: Tensor, mask: Tensor, dedup: bool) -> Tensor:
    """The hidden rows the kernels read. The sync-free plan keeps masked rows at weight 0, and 0 * nan is nan: a NaN or
    inf state there (padding after EOS, a VLM's left padding) would reach the sums and every dW entry, so those rows
    are read as zeros (one copy of the states, no sync). A dedup plan never reads them."""
    return h2 if dedup else h2.masked_fill(mask[:, None] == 0, 0)


def _plan(h2: Tensor, labels: Tensor, mask: Tensor, dedup) -> _Plan:
    R = h2.shape[0]
    if not _dedups(R, dedup):  # sync-free: every row is its own unique row, masked rows carry weight 0
        idx = torch.arange(R, device=h2.device)
        return _Plan(idx, labels, mask, idx, idx)
    trow = mask.nonzero().squeeze(1)  # compaction: padding costs nothing (host sync)
    # Bitwise-equal rows compare equal as integers (unlike floats: -0.0 == 0.0, nan != nan).
    as_int = {2: torch.int16, 4: torch.int32}[h2.element_size()]
    _, inv = torch.unique(h2[trow].view(as_int), dim=0, return_inverse=True)
    U = int(inv.max()) + 1 if trow.numel() else 0
    # First token row of each unique row as its representative (any would do: they are equal).
    urow = torch.full((U,), R, device=h2.device, dtype=torch.int64).scatter_reduce_(0, inv, trow, "amin")
    return _Plan(trow, labels[trow], mask[trow], urow, inv)


def _num_splits(U: int, V: int, device: torch.device) -> int:
    # Enough (row tile, split) programs to fill the GPU: ~4 per SM, splits of >= 1024 columns.
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(triton.cdiv(4 * sms, max(1, triton.cdiv(U, 128))), triton.cdiv(V, 1024)))


def _flags(x: Tensor) -> dict:
    return dict(UPCAST=(INTERPRET or UPCAST_HALF) and x.dtype != torch.float32,
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32")


def _meta() -> dict:
    return dict(_INTERP_META) if INTERPRET else {}


def _forward(h2: Tensor, weight: Tensor, plan: _Plan, N: int, T: int, softcap: float):
    U, Rt, (V, H) = plan.urow.numel(), plan.trow.numel(), weight.shape
    dev = h2.device
    splits = _num_splits(U, V, dev)
    split_len = triton.cdiv(triton.cdiv(V, splits), 256) * 256
    splits = triton.cdiv(V, split_len)
    part = torch.empty((splits, U), device=dev, dtype=torch.float32)
    if U:
        grid = lambda meta: (triton.cdiv(U, meta["BLOCK_M"]), splits)  # noqa: E731
        _lse_kernel[grid](h2, plan.urow, weight, part, U, V, H, split_len, h2.stride(0), weight.stride(0),
                          SOFTCAP=softcap, **_flags(h2), **_meta())
    lse = torch.logsumexp(part, 0)
    z = torch.empty(Rt, device=dev, dtype=torch.float32)
    if Rt:
        _label_logit_kernel[(Rt,)](h2, plan.trow, weight, plan.lab, plan.tmask, z, H, h2.stride(0),
                                   weight.stride(0), BLOCK_H=min(1024, triton.next_power_of_2(H)), SOFTCAP=softcap)
    tok = plan.tmask * (z - lse[plan.inv])
    if Rt != N * T:  # compacted: scatter back (unique indices, so deterministic)
        tok = torch.zeros(N * T, device=dev, dtype=torch.float32).index_put_((plan.trow,), tok)
    return tok.view(N, T).sum(1), lse, z


def _backward(h2: Tensor, weight: Tensor, plan: _Plan, lse: Tensor, z: Tensor, grad_out: Tensor, T: int,
              softcap: float):
    U, Rt, (V, H) = plan.urow.numel(), plan.trow.numel(), weight.shape
    dev = h2.device
    c = grad_out.float()[plan.trow // T] * plan.tmask  # upstream coefficient per token
    c1 = c * (1 - (z / softcap) ** 2) if softcap else c  # ... of its label's (capped) logit z
    coef = torch.zeros(U, device=dev, dtype=torch.float32).index_add_(0, plan.inv, c)
    g = torch.zeros((U, H), device=dev, dtype=torch.float32)
    dw = torch.empty_like(weight)
    block_h = min(1024, triton.next_power_of_2(H))
    chunk = max(256, DW_CHUNK_BYTES // (4 * H) // 256 * 256)
    for v0 in range(0, V, chunk):  # dW one vocabulary chunk at a time: a bounded fp32 accumulator
        v1 = min(v0 + chunk, V)
        d = torch.zeros((v1 - v0, H), device=dev, dtype=torch.float32)
        if U:
            grid = lambda meta: (triton.cdiv(U, meta["BLOCK_M"]), triton.cdiv(v1 - v0, meta["BLOCK_N"]))  # noqa: E731
            _bwd_kernel[grid](h2, plan.urow, weight, lse, coef, g, d, U, H, v0, v1, h2.stride(0),
                              weight.stride(0), TRANSPOSE_FREE=TRANSPOSE_FREE, SOFTCAP=softcap, **_flags(h2),
                              **_meta())
        if Rt:
            _onehot_dw_kernel[(Rt,)](h2, plan.trow, plan.lab, c1, d, H, v0, v1, h2.stride(0), BLOCK_H=block_h)
        torch.neg(d, out=d)
        dw[v0:v1] = d  # dW = sum_i c_i onehot(l_i) h_i^T - sum_u coef_u p_u^T h_u
    dh = torch.zeros((h2.shape[0], H), device=dev, dtype=h2.dtype)
    if Rt:
        _dh_kernel[(Rt,)](weight, plan.lab, c, c1, plan.inv, plan.trow, g, dh, H, weight.stride(0), BLOCK_H=block_h)
    return dh, dw


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, dedup, softcap):
        N, T, H = hidden.shape
        h2, dedup = hidden.reshape(N * T, H), _dedups(N * T, dedup)
        plan = _plan(h2, labels, mask, dedup)
        out, lse, z = _forward(_rows(h2, mask, dedup), weight, plan, N, T, softcap)
        ctx.save_for_backward(hidden, weight, lse, z, plan.trow, plan.lab, plan.tmask, plan.urow, plan.inv)
        ctx.softcap, ctx.dedup = softcap, dedup
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, lse, z, *plan = ctx.saved_tensors
        N, T, H = hidden.shape
        plan = _Plan(*plan)  # without dedup its tmask is the whole mask: the same rows zeroed as in the forward
        h2 = _rows(hidden.reshape(N * T, H), plan.tmask, ctx.dedup)
        dh, dw = _backward(h2, weight, plan, lse, z, grad_out, T, ctx.softcap)
        return dh.view(N, T, H), dw, None, None, None, None


def fused_linear_sequence_logprobs_triton(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor,
                                          dedup="auto", softcap: float | None = None) -> Tensor:
    """[N] fp32 sums of masked token log-probs under logits = hidden @ weight.T (softcap * tanh(logits / softcap)
    with a softcap).

    dedup: "auto" (compact + dedup at >= DEDUP_MIN_ROWS rows, else none: no host syncs),
    True or False. Exact either way. Without grad nothing is saved.
    """
    check_inputs(hidden, labels, mask, "hidden")
    check_weight(weight, hidden.shape[2])
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight must match hidden's dtype and device, got {weight.dtype} on {weight.device}")
    if dedup not in ("auto", True, False):
        raise ValueError(f"dedup must be 'auto', True or False, got {dedup!r}")
    check_softcap(softcap)
    check_labels(labels, mask, weight.shape[0])  # the kernels would read out of bounds
    softcap = float(softcap or 0.0)  # a constexpr of the kernels: 0.0 is off
    hidden = hidden if hidden.stride(2) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    lab = labels.reshape(-1).contiguous()
    msk = mask.reshape(-1).to(torch.float32).contiguous()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearLogprobs.apply(hidden, weight, lab, msk, dedup, softcap)
    N, T, H = hidden.shape
    h2, dedup = hidden.reshape(N * T, H), _dedups(N * T, dedup)
    return _forward(_rows(h2, msk, dedup), weight, _plan(h2, lab, msk, dedup), N, T, softcap)[0]
