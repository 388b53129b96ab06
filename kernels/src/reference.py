"""Plain-torch reference implementations of the DiCO loss kernels.

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


def fused_linear_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor,
                                   chunk_rows: int = 64) -> Tensor:
    """sequence_logprobs(hidden @ weight.T, labels, mask), a few sequences at a time.

    hidden [N, T, H], weight [V, H] (the lm_head). Chunking over sequences bounds the
    logits held at once to chunk_rows * T * V; the result is the same as one big call.
    Half-precision inputs are upcast before the matmul (fp32 logits, as in the Triton kernel).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [V, {hidden.shape[2]}], got shape {tuple(weight.shape)}")
    # Logits in fp32 (fp64 for fp64), as the Triton kernel accumulates them: bf16 logits would lose bits.
    dtype = _compute_dtype(hidden)
    w = weight.to(dtype)
    parts = [sequence_logprobs(h.to(dtype) @ w.T, lab, m) for h, lab, m in
             zip(hidden.split(chunk_rows), labels.split(chunk_rows), mask.split(chunk_rows))]
    if not parts:  # N == 0
        return hidden.new_zeros(0, dtype=_compute_dtype(hidden))
    return torch.cat(parts)
