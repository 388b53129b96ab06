"""Loss kernels for DiCO training (installed as ``dico_scale.kernels``)."""

# Plain-torch versions for now; a dispatcher will pick the Triton kernels on
# CUDA later, keeping these names and signatures.
from .reference import dico_loss, sequence_logprobs

__all__ = ["sequence_logprobs", "dico_loss"]
