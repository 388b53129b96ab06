"""The dico stage's two log-prob paths on a real step: the fused head + Triton kernels (interpreted on the CPU) give
the loss and gradients of the plain-torch path (loss.kernel=torch: the chunked torch head)."""
import pytest
import torch

from dico_scale.config import ConfigError, load_config
from dico_scale.stages.dico import DicoStage

TINY = ["train.init_from=", "captioner.image_encoder_weights=", "evaluator.weights=", "captioner.width=64",
        "captioner.heads=4", "captioner.decoder_layers=1", "captioner.encoder_layers=1", "generation.candidates=2",
        "generation.max_len=4", "tracking.enabled=false"]


class Local:
    """What the stage needs of a DeepSpeed engine: `module` and a forward call."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _step(kernel: str, pixels: torch.Tensor):
    cfg = load_config("configs/demo/dico.yaml", TINY + [f"loss.kernel={kernel}"])
    torch.manual_seed(0)
    stage = DicoStage(cfg, torch.device("cpu"))
    engine = Local(stage.module)
    stage.setup(engine)
    out = stage.step(engine, {"pixels": pixels})
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in stage.module.named_parameters() if p.grad is not None}
    return stage, out, grads


def test_fused_triton_path_matches_the_torch_path():
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ref_stage, ref, ref_grads = _step("torch", pixels)
    tri_stage, tri, tri_grads = _step("triton", pixels)
    assert not ref_stage.fused and tri_stage.fused
    phases = {f"time/{p}_s" for p in ("generate", "reward", "policy", "reference")}  # the step's own clock
    assert phases <= ref.metrics.keys() and all(ref.metrics[k] > 0 for k in phases)
    torch.testing.assert_close(tri.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for key in ("rewards/margin", "logps/chosen", "logps/rejected", "score/winner"):
        torch.testing.assert_close(torch.as_tensor(tri.metrics[key]), torch.as_tensor(ref.metrics[key]),
                                   rtol=1e-4, atol=1e-5)
    assert ref_grads.keys() == tri_grads.keys() and "decoder.wte.weight" in ref_grads
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0 or name.startswith("image_encoder"), name
        torch.testing.assert_close(tri_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_triton_kernel_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = load_config("configs/demo/dico.yaml", TINY + ["loss.kernel=triton"])
    with pytest.raises(ConfigError, match="loss.kernel=triton needs CUDA"):
        DicoStage(cfg, torch.device("cpu"))
