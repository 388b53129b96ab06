"""The plain-torch path of the DiCO loss kernels (`loss.kernel=torch`, and `auto` on the CPU).

The Triton kernels replace these behind the same names and signatures; these
stay as the CPU path and as the ground truth the kernels are tested against.
"""

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    # Half-precision inputs are upcast: log-probabilities summed over a caption
    # lose too many bits in fp16/bf16. float64 stays float64 (gradcheck).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence sum of masked token log-probabilities.

    logits [N, T, V], labels [N, T] (int64, any valid id where masked),
    mask [N, T] (bool or float). Returns [N] in float32 (float64 for float64
    logits); differentiable w.r.t. logits. Fully masked rows give 0.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, T, V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    if mask.shape != logits.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(logits.shape[:2])}, got {tuple(mask.shape)}")

    # One upcast copy (a no-op for fp32/fp64). log p(label) = logit[label] - logsumexp,
    # which avoids materialising a second [N, T, V] tensor for the full log_softmax.
    x = logits.to(_compute_dtype(logits))
    picked = x.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(x, dim=-1)
    return (token_logps * mask.to(x.dtype)).sum(-1)


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
    r_raw = rewards.detach()
    k = pi.shape[1]

    # Winner = FIRST max index, stated explicitly rather than relying on argmax's
    # tie behaviour (ties are common with quantised or duplicate captions).
    # Found on the rewards as given, so a downcast cannot create new ties.
    idx = torch.arange(k, device=pi.device)
    is_max = r_raw == r_raw.max(dim=1, keepdim=True).values
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


# Logits held at once by the chunked head, in elements (64 MiB of fp32): a chunk is max(1, this // V) tokens.
MAX_CHUNK_LOGITS = 1 << 24


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """log softmax(h @ w.T)[label] of each row of h [R, H], a few rows at a time. Memory beyond the inputs and their
    gradients: one chunk of logits (chunk x V), never R x V, whatever the vocabulary: each chunk's softmax is computed
    in its logits' buffer (in place). When all rows fit one chunk the softmax is kept for backward (no second matmul);
    otherwise forward keeps one logsumexp per row and backward recomputes each chunk's softmax."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, labels: Tensor, chunk: int) -> Tensor:
        out, lse, probs = h.new_empty(h.shape[0]), h.new_empty(h.shape[0]), None
        for s in range(0, h.shape[0], chunk):
            x = h[s:s + chunk] @ w.T
            picked, m = x.gather(1, labels[s:s + chunk, None]).squeeze(1), x.amax(-1)
            total = x.sub_(m[:, None]).exp_().sum(-1)  # x is now exp(logits - max)
            lse[s:s + chunk] = m + total.log()
            out[s:s + chunk] = picked - lse[s:s + chunk]
            if chunk >= h.shape[0]:
                probs = x.div_(total[:, None])
        ctx.save_for_backward(h, w, labels, lse, probs)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, w, labels, lse, probs = ctx.saved_tensors
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], ctx.chunk):
            e = s + ctx.chunk
            # d logp / d logits = onehot(label) - softmax, scaled by each row's incoming gradient; built in the one
            # chunk buffer (the kept softmax is copied once: a second backward through the graph must still see it)
            g = probs.neg() if probs is not None else (h[s:e] @ w.T).sub_(lse[s:e, None]).exp_().neg_()
            g.scatter_add_(1, labels[s:e, None], g.new_ones(g.shape[0], 1))
            g.mul_(grad_out[s:e, None])
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[s:e])
            if grad_w is not None:
                grad_w.addmm_(g.T, h[s:e])
        return grad_h, grad_w, None, None


def fused_linear_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor,
                                   max_chunk_logits: int | None = None) -> Tensor:
    """sequence_logprobs(hidden @ weight.T, labels, mask) without the [N, T, V] logits.

    hidden [N, T, H], weight [V, H] (the output head, tied or not). Only the scored tokens (mask) go through the
    head, max(1, max_chunk_logits // V) at a time, forward and backward (_ChunkedHeadLogprobs): the extra memory
    stays bounded at any vocabulary size. Labels under the mask are never read. Half-precision inputs are upcast
    before the matmul (fp32 logits, as in the Triton kernel); the gradients come back in the inputs' dtypes.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [V, {hidden.shape[2]}], got shape {tuple(weight.shape)}")
    # Logits in fp32 (fp64 for fp64), as the Triton kernel accumulates them: bf16 logits would lose bits.
    dtype = _compute_dtype(hidden)
    scored = mask.bool()
    rows = scored.nonzero()[:, 0]  # the sequence of each scored token
    chunk = max(1, (max_chunk_logits or MAX_CHUNK_LOGITS) // max(1, weight.shape[0]))
    tokens = _ChunkedHeadLogprobs.apply(hidden[scored].to(dtype), weight.to(dtype), labels[scored].long(), chunk)
    tokens = tokens * mask[scored].to(dtype)  # a float mask weighs its tokens
    return tokens.new_zeros(hidden.shape[0]).index_add(0, rows, tokens)
