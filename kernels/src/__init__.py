"""Loss kernels for DiCO training (installed as ``dico_scale.kernels``).

Each entry point takes `kernel`: "triton" runs the Triton kernel (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1), "torch" the plain-torch path in torch_path.py, "auto" Triton for CUDA tensors of the dtypes it
takes (triton_takes) and the plain-torch path otherwise. The Triton modules are imported on first use, so a CPU-only
install never compiles anything.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import torch_path

KERNELS = ("auto", "triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(kernel: str, tensor: Tensor) -> bool:
    return _triton_for(kernel, tensor.is_cuda)


def _triton_for(kernel: str, is_cuda: bool) -> bool:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "auto":
        return is_cuda
    if kernel == "triton" and not is_cuda and not interpreting():
        raise ValueError("kernel='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to interpret on the CPU)")
    return kernel == "triton"


def triton_takes(x: torch.dtype, labels: torch.dtype, weight: torch.dtype | None = None) -> bool:
    """Whether the Triton kernels take inputs of these dtypes (logits or hidden states, labels, the head's weight):
    fp32/fp16/bf16, int32/int64 labels, a head in the states' dtype. "auto" sends any other (fp64, an fp32 head under
    bf16 states as autocast leaves them, int16 labels) to the torch path; "triton" refuses them."""
    return x in torch_path.TRITON_FLOATS and labels in torch_path.TRITON_INTS and weight in (None, x)


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor, kernel: str = "auto") -> Tensor:
    """[N] sums of masked log-softmax(logits)[labels]; logits [N, T, V]."""
    if use_triton(kernel, logits) and (kernel == "triton" or triton_takes(logits.dtype, labels.dtype)):
        from .logprobs import sequence_logprobs_triton
        return sequence_logprobs_triton(logits, labels, mask)
    return torch_path.sequence_logprobs(logits, labels, mask)


def fused_head_uses_triton(kernel: str, is_cuda: bool, needs_grad: bool, takes: bool = True) -> bool:
    """Whether fused_linear_sequence_logprobs runs the Triton kernel. "auto" runs it on CUDA for gradient-free calls
    only (the reference model, generation scoring): on an H200 (BENCHMARKS.md, 2026-12-04) its forward matched float64
    to 1e-6 but its backward's dhidden missed the softmax term (6-9% error against a 3e-3 bf16 floor), and the
    chunked torch head was as fast in a whole DiCO step; and only for inputs it takes (takes: triton_takes).
    "triton" runs it regardless; "torch" never."""
    return _triton_for(kernel, is_cuda) and (kernel != "auto" or (takes and not needs_grad))


def fused_linear_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor,
                                   kernel: str = "auto", bias: Tensor | None = None,
                                   softcap: float | None = None) -> Tensor:
    """The same from decoder states hidden [N, T, H] and the output head weight [V, H] (and bias [V]), the logits
    softcapped with softcap (Gemma 2's final_logit_softcapping; None: plain); the Triton kernel never materialises the
    [N*T, V] logits, nor does the torch head (it runs in blocks of tokens x vocabulary)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    takes = triton_takes(hidden.dtype, labels.dtype, weight.dtype)
    if fused_head_uses_triton(kernel, hidden.is_cuda, needs_grad, takes):
        from .fused_linear import fused_linear_sequence_logprobs_triton
        if bias is not None:  # the kernel has no bias: one more input column, [h, 1] @ [W, b]^T
            hidden = torch.cat([hidden, hidden.new_ones(*hidden.shape[:-1], 1)], dim=-1)
            weight = torch.cat([weight, bias[:, None].to(weight.dtype)], dim=1)
        return fused_linear_sequence_logprobs_triton(hidden, weight, labels, mask, softcap=softcap)
    return torch_path.fused_linear_sequence_logprobs(hidden, weight, labels, mask, bias=bias, softcap=softcap)


def dico_loss(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, beta: float = 0.2, tau: float = 300.0,
              kernel: str = "auto"):
    """(scalar loss, detached metrics) of DiCO over [B, k] candidates; see torch_path.dico_loss."""
    if use_triton(kernel, policy_logps):
        from .loss import dico_loss_triton
        return dico_loss_triton(policy_logps, ref_logps, rewards, beta=beta, tau=tau)
    return torch_path.dico_loss(policy_logps, ref_logps, rewards, beta=beta, tau=tau)


__all__ = ["KERNELS", "sequence_logprobs", "fused_linear_sequence_logprobs", "dico_loss", "use_triton",
           "fused_head_uses_triton", "triton_takes", "interpreting"]
