"""The plain-torch path of the DiCO loss kernels (`loss.kernel=torch`, and `auto` on the CPU).

The Triton kernels replace these behind the same names and signatures; these
stay as the CPU path and as the ground truth the kernels are tested against.
"""

import functools
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def once_differentiable(backward):
    """Marks a custom autograd Function's backward as not differentiable itself: a double backward (create_graph=True)
    raises at once. torch.autograd.function.once_differentiable raises only where the incoming gradient needs grad:
    otherwise it returns the gradient detached, and a gradient penalty would lose its second-order term silently."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # the engine runs backward with grad enabled only under create_graph=True
            raise RuntimeError(f"{type(ctx).__name__[:-len('Backward')]} has no double backward (create_graph=True)")
        return backward(ctx, *grads)
    return wrapper


def _compute_dtype(t: Tensor) -> torch.dtype:
    # Half-precision inputs are upcast: log-probabilities summed over a caption
    # lose too many bits in fp16/bf16. float64 stays float64 (gradcheck).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# Input dtypes each path takes: the Triton kernels fewer (kernels.triton_takes sends the others to torch under "auto").
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_FLOATS = FLOATS[:3]
INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
TRITON_INTS = (torch.int32, torch.int64)


def _names(dtypes) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


def check_inputs(x: Tensor, labels: Tensor, mask: Tensor, name: str, floats=FLOATS, ints=INTS) -> None:
    """Shape/dtype/device checks of every log-prob entry point (the Triton ones take fewer dtypes); one-line
    ValueErrors."""
    if x.dim() != 3 or x.shape[2] == 0:
        raise ValueError(f"{name} must be [N, T, *] with a last dimension >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in floats:
        raise ValueError(f"{name} must be {_names(floats)}, got {x.dtype}")
    if labels.shape != x.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(x.shape[:2])}, got {tuple(labels.shape)}")
    if labels.dtype not in ints:
        raise ValueError(f"labels must be {_names(ints)}, got {labels.dtype}")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    if mask.is_complex():
        raise ValueError(f"mask must be bool, integer or real, got {mask.dtype}")
    if labels.device != x.device or mask.device != x.device:
        raise ValueError(f"labels and mask must be on {name}'s device {x.device}")


def check_weight(weight: Tensor, H: int) -> None:
    """The output head is [V, H] with V >= 1."""
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, {H}] with V >= 1, got shape {tuple(weight.shape)}")


def check_labels(labels: Tensor, mask: Tensor, V: int) -> None:
    """Scored labels (mask nonzero) must index the vocabulary [0, V); labels under the mask are never read, so any id
    (-100, a pad id) is fine there. On CUDA a device-side assert instead of a host sync per call (the sync-free path
    captures in a CUDA graph), as torch's own gather and cross_entropy check their indices there."""
    if labels.dtype not in TRITON_INTS:  # V as an int8 wraps: 151936 compares as -128
        labels = labels.long()
    bad = ((labels < 0) | (labels >= V)) & (mask != 0)
    if labels.is_cuda:
        torch._assert_async(~bad.any(), f"labels must be in [0, {V}) where mask is set")
    elif bad.any():
        raise ValueError(f"labels must be in [0, {V}) where mask is set, got {labels[bad][0].item()}")


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence sum of masked token log-probabilities.

    logits [N, T, V] (any float dtype), labels [N, T] (integer; any id where masked), mask [N, T] (bool or float).
    Returns [N] in float32 (float64 for float64 logits); differentiable w.r.t. logits. Fully masked rows give 0.
    A masked row reaches neither the result nor the gradient (0 there), even a NaN or all -inf one.
    """
    check_inputs(logits, labels, mask, "logits")
    check_labels(labels, mask, logits.shape[2])
    scored = mask != 0
    # One upcast copy (a no-op for fp32/fp64). log p(label) = logit[label] - logsumexp,
    # which avoids materialising a second [N, T, V] tensor for the full log_softmax.
    x = logits.to(_compute_dtype(logits))
    picked = x.gather(-1, labels.masked_fill(~scored, 0).long().unsqueeze(-1)).squeeze(-1)
    token_logps = picked - _ScoredLogSumExp.apply(x, scored)
    # A select, not a product: 0 * nan is nan.
    return torch.where(scored, token_logps * mask.to(x.dtype), 0).sum(-1)


class _ScoredLogSumExp(torch.autograd.Function):
    """logsumexp over the last dimension, its gradient 0 on unscored rows: torch's, exp(x - lse) times the zero
    gradient, is NaN on a NaN or all -inf row, and would reach whatever made the logits."""

    @staticmethod
    def forward(ctx, x: Tensor, scored: Tensor) -> Tensor:
        lse = torch.logsumexp(x, dim=-1)
        ctx.save_for_backward(x, lse, scored)
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, lse, scored = ctx.saved_tensors
        g = (x - lse[..., None]).exp_().mul_(grad[..., None])
        return g.masked_fill_(~scored[..., None], 0), None


def check_dico_inputs(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor) -> None:
    """Shape checks shared with the Triton kernel, so both paths fail alike."""
    if policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must be [B, k], got shape {tuple(policy_logps.shape)}")
    if policy_logps.shape[1] < 2:
        raise ValueError(f"policy_logps needs k >= 2 candidates per image, got k={policy_logps.shape[1]}")
    if ref_logps.shape != policy_logps.shape:
        raise ValueError(f"ref_logps shape {tuple(ref_logps.shape)} != policy_logps shape {tuple(policy_logps.shape)}")
    if rewards.shape != policy_logps.shape:
        raise ValueError(f"rewards shape {tuple(rewards.shape)} != policy_logps shape {tuple(policy_logps.shape)}")


def dico_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    beta: float = 0.2,
    tau: float = 300.0,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """DiCO objective over k candidate captions per image.

    All inputs are [B, k], k >= 2. The winner is the first argmax of rewards;
    the k-1 losers are weighted by gamma = softmax(tau * (r_w - r_l)). Gradients
    flow into policy_logps only. Returns (scalar loss, dict of detached metrics).
    """
    check_dico_inputs(policy_logps, ref_logps, rewards)
    dtype = _compute_dtype(policy_logps)
    pi = policy_logps.to(dtype)
    ref = ref_logps.detach().to(dtype)  # frozen reference model: constant
    # Integer (or bool) rewards compare as float64: exact up to 2^53, so no new ties.
    r_raw = rewards.detach() if rewards.is_floating_point() else rewards.detach().double()
    k = pi.shape[1]

    # Winner = FIRST max index, stated explicitly rather than relying on argmax's
    # tie behaviour (ties are common with quantised or duplicate captions).
    # Found on the rewards as given, so a downcast cannot create new ties.
    # A nan reward never wins (an all-nan row: the first); its loss is nan all the same, a step the loop skips.
    idx = torch.arange(k, device=pi.device)
    r_key = r_raw.masked_fill(r_raw.isnan(), float("-inf"))
    is_max = r_key == r_key.max(dim=1, keepdim=True).values
    win = torch.where(is_max, idx, k).min(dim=1).values  # [B]
    chosen = F.one_hot(win, k).bool()  # [B, k]

    r = r_raw.to(dtype)
    r_w = r.gather(1, win[:, None])  # [B, 1]
    # Softmax over the losers only: the winner's slot is -inf, so its weight is exactly 0.
    # softmax subtracts the row max, so tau * diff ~ 150 does not overflow.
    scores = (tau * (r_w - r)).masked_fill(chosen, float("-inf"))
    gamma = torch.softmax(scores, dim=1)

    pi_w = pi.gather(1, win[:, None]).squeeze(1)
    ref_w = ref.gather(1, win[:, None]).squeeze(1)
    pi_l = (gamma * pi).sum(1)
    ref_l = (gamma * ref).sum(1)

    z = beta * ((pi_w - pi_l) - (ref_w - ref_l))
    loss = -F.logsigmoid(z).mean()

    with torch.no_grad():
        chosen_reward = beta * (pi_w - ref_w)
        rejected_reward = beta * (pi_l - ref_l)
        metrics = {
            "rewards/chosen": chosen_reward.mean(),
            "rewards/rejected": rejected_reward.mean(),
            "rewards/margin": (chosen_reward - rejected_reward).mean(),
            "rewards/accuracy": (z > 0).to(dtype).mean(),
            "logps/chosen": pi_w.mean(),
            "logps/rejected": pi_l.mean(),
            "score/winner": r_w.mean(),
            "score/mean": r.mean(),
        }
    return loss, metrics


# Models cap at 30-50; the Triton head's tanh loses precision as the cap grows (relative error 1e-5 at 1e4, 7e-4 at
# 1e6), and a cap this large bends no logit anyway.
MAX_SOFTCAP = 1e4


def check_softcap(softcap: float | None) -> None:
    """A logit softcap is None (off) or a positive number up to MAX_SOFTCAP; shared with the Triton head."""
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not 0 < softcap < float("inf")):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
    if softcap is not None and softcap > MAX_SOFTCAP:
        raise ValueError(f"softcap must be at most {MAX_SOFTCAP:g} (models use 30-50), got {softcap!r}")


# Elements in one block of the chunked head (64 MiB of fp32): a block of logits holds at most this many, and so
# does a vocabulary slice of a half-precision head weight upcast to fp32.
MAX_CHUNK_LOGITS = 1 << 24
HALF = (torch.float16, torch.bfloat16)


def _half_operands(h: Tensor, w: Tensor) -> bool:
    """Whether the head's matmuls take half-precision operands with fp32 results (CUDA: tensor cores, fp32
    accumulate, the fused kernel's arithmetic). Upcast to fp32, they ran 10x slower than the naive bf16 logits on an
    H100 (BENCHMARKS.md, 2026-12-06); the CPU has no such matmul (torch 2.14), so it upcasts."""
    return h.is_cuda and h.dtype in HALF and w.dtype == h.dtype


def _mm32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in fp32 from half-precision operands."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _block_shape(rows: int, V: int, H: int, sliced: bool, budget: int) -> tuple[int, int]:
    """(tokens, vocabulary rows) of one block. An fp32 weight is read in place (one slice: all of V); a half-precision
    one is read a slice at a time (upcast, or its fp32 gradient slice), the slice bounded by the budget too."""
    vocab = max(1, min(V, budget // max(1, H))) if sliced else V
    return max(1, min(rows, budget // vocab)), vocab


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """log softmax(h @ w.T + b)[label] of each row of h [R, H] under a head w [V, H] (any float dtype), in blocks of
    (tokens x vocabulary slice): the log-sum-exp is kept online across slices, so memory beyond the inputs and their
    gradients is one block of logits (two in a softcapped backward, or a kept one: the cap's slope), one slice of a
    half-precision head (fp32 on the CPU) and its fp32 gradient, and a per-token [R, H] gradient: never R x V, nor
    V x H in fp32, whatever the vocabulary. Logits and sums are fp32 (fp64 for fp64 inputs). A single block keeps its
    softmax for backward (no second matmul); otherwise forward keeps one log-sum-exp per row and backward recomputes
    blocks."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor | None, labels: Tensor, budget: int,
                softcap: float | None = None) -> Tensor:
        (R, H), V = h.shape, w.shape[0]
        dtype = _compute_dtype(h)
        ctx.half = _half_operands(h, w)  # the backward multiplies as the forward did
        operands = h.dtype if ctx.half else dtype
        hc, ho = h.to(dtype), h.to(operands)
        rows, vocab = _block_shape(R, V, H, w.dtype != dtype, budget)
        m, s, probs = hc.new_full((R,), float("-inf")), hc.new_zeros(R), None
        keep = rows >= R and vocab >= V  # one block: its softmax kept for backward
        for v0 in range(0, V, vocab):
            ws, bs = _slice(w, b, v0, vocab, operands)
            for r0 in range(0, R, rows):
                r1 = r0 + rows
                x, slope = _capped(_logits(ho[r0:r1], ws, bs), softcap, keep)
                top = torch.maximum(m[r0:r1], x.amax(-1))
                total = x.sub_(top[:, None]).exp_().sum(-1)  # x is now exp(logits - top): in place, one block
                s[r0:r1] = s[r0:r1] * (m[r0:r1] - top).exp() + total
                m[r0:r1] = top
                if keep:  # the softmax times the cap's slope: d logp / d raw logits
                    probs = x.div_(total[:, None]) if slope is None else x.div_(total[:, None]).mul_(slope)
        lse = m + s.log()
        picked = (hc * w[labels].to(dtype)).sum(-1)  # each row's own logit, without a gather from the blocks
        if b is not None:
            picked = picked + b[labels].to(dtype)
        picked, label_slope = _capped(picked, softcap, True)
        ctx.save_for_backward(h, w, b, labels, lse, probs, label_slope)
        ctx.block, ctx.softcap = (rows, vocab), softcap
        return picked - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        h, w, b, labels, lse, probs, label_slope = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        (R, H), V, (rows, vocab), softcap = h.shape, w.shape[0], ctx.block, ctx.softcap
        dtype, half = _compute_dtype(h), ctx.half
        hc = h.to(dtype)
        ho = h if half else hc
        c = grad_out.to(dtype)
        # d logp / d logits = onehot(label) - softmax, times each row's incoming gradient c (and, under a softcap, each
        # logit's slope 1 - tanh^2 through the cap). The one-hot part is added row by row (c * W[label] to dh,
        # c * h to dW[label]); the softmax part block by block.
        c1 = c if label_slope is None else c * label_slope
        grad_h = c1[:, None] * w[labels].to(dtype) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros(V, dtype=dtype, device=h.device) if need_b else None
        in_place = w.dtype == dtype
        for v0 in range(0, V, vocab):
            v1 = min(v0 + vocab, V)
            ws, bs = _slice(w, b, v0, vocab, ho.dtype)
            # the slice's weight gradient in the compute dtype: grad_w itself for an fp32 head, else one fp32 slice
            gws = None if not need_w else grad_w[v0:v1] if in_place else hc.new_zeros(v1 - v0, H)
            for r0 in range(0, R, rows):
                r1 = r0 + rows
                # -c * softmax, in the block's buffer (a kept softmax is copied: a second backward must still see it)
                g = probs.mul(-c[:, None]) if probs is not None else \
                    _softmax_slope(_logits(ho[r0:r1], ws, bs), lse[r0:r1], softcap).mul_(-c[r0:r1, None])
                if need_b:
                    grad_b[v0:v1] += g.sum(0)
                if half:  # the fused kernel's rounding: the softmax gradient meets the half operands in their dtype
                    g = g.to(h.dtype)
                if need_h:
                    _accumulate(grad_h[r0:r1], g, ws)
                if need_w:
                    _accumulate(gws, g.T, ho[r0:r1])
            if need_w:
                hit = (labels >= v0) & (labels < v1)
                gws.index_add_(0, labels[hit] - v0, c1[hit, None] * hc[hit])
                if not in_place:
                    grad_w[v0:v1] = gws
        if need_b:
            grad_b = grad_b.index_add_(0, labels, c1).to(b.dtype)
        return None if grad_h is None else grad_h.to(h.dtype), grad_w, grad_b, None, None, None


def _capped(x: Tensor, softcap: float | None, slope: bool) -> tuple[Tensor, Tensor | None]:
    """softcap * tanh(x / softcap) in place of x (Gemma 2's final_logit_softcapping), and if asked its slope
    1 - tanh^2 (a tensor of x's size); (x, None) without a cap."""
    if softcap is None:
        return x, None
    t = x.div_(softcap).tanh_()
    d = _slope(t) if slope else None  # before t becomes the capped logits
    return t.mul_(softcap), d


def _slope(t: Tensor) -> Tensor:
    """1 - t^2 in one new tensor."""
    return torch.square(t).neg_().add_(1)


def _softmax_slope(x: Tensor, lse: Tensor, softcap: float | None) -> Tensor:
    """softmax(capped logits) times the cap's slope, from the raw logits x of a block (in place of x; under a cap
    the slope is a second block)."""
    x, slope = _capped(x, softcap, True)
    x.sub_(lse[:, None]).exp_()
    return x if slope is None else x.mul_(slope)


def _slice(w: Tensor, b: Tensor | None, v0: int, vocab: int, dtype: torch.dtype):
    """Vocabulary rows [v0, v0 + vocab) of the head in the operands' dtype (a copy only to upcast a half head)."""
    return w[v0:v0 + vocab].to(dtype), (b[v0:v0 + vocab].to(dtype) if b is not None else None)


def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in acc's dtype; half-precision operands through _mm32."""
    if a.dtype in HALF:
        acc += _mm32(a, b)
    else:
        acc.addmm_(a, b)


def _logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """h @ w.T (+ b): fp32 (fp64) logits; from half-precision operands through _mm32."""
    if h.dtype in HALF:
        x = _mm32(h, w.T)
        return x if b is None else x.add_(b.float())
    return h @ w.T if b is None else torch.addmm(b, h, w.T)


def fused_linear_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor,
                                   max_chunk_logits: int | None = None, bias: Tensor | None = None,
                                   softcap: float | None = None) -> Tensor:
    """sequence_logprobs(hidden @ weight.T + bias, labels, mask) without the [N, T, V] logits (with softcap, of
    softcap * tanh(logits / softcap), as Gemma 2's heads write them).

    hidden [N, T, H], weight [V, H] (the output head, tied or not), bias [V] or None. Only the scored tokens (mask) go
    through the head, in blocks of at most max_chunk_logits logits, forward and backward (_ChunkedHeadLogprobs): the
    extra memory stays bounded at any vocabulary size. Labels under the mask are never read. Logits are fp32 (fp64 for
    fp64 inputs), as in the Triton kernel: a half-precision head multiplies in its own dtype with fp32 results on CUDA
    and is upcast a vocabulary slice at a time on the CPU, never whole; the gradients come back in the inputs' dtypes.
    """
    check_inputs(hidden, labels, mask, "hidden")
    check_weight(weight, hidden.shape[2])
    if bias is not None and tuple(bias.shape) != weight.shape[:1]:
        raise ValueError(f"bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    check_softcap(softcap)
    if max_chunk_logits is not None and (isinstance(max_chunk_logits, bool) or not isinstance(max_chunk_logits, int)
                                         or max_chunk_logits < 1):
        raise ValueError(f"max_chunk_logits must be None or a positive int, got {max_chunk_logits!r}")
    check_labels(labels, mask, weight.shape[0])
    scored = mask != 0
    rows = scored.nonzero()[:, 0]  # the sequence of each scored token
    tokens = _ChunkedHeadLogprobs.apply(hidden[scored], weight, bias, labels[scored].long(),
                                        max_chunk_logits or MAX_CHUNK_LOGITS, softcap)
    tokens = tokens * mask[scored].to(tokens.dtype)  # a float mask weighs its tokens
    return tokens.new_zeros(hidden.shape[0]).index_add(0, rows, tokens)
