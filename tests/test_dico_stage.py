"""The dico stage's two log-prob paths on a real step: the fused head + Triton kernels (interpreted on the CPU) give
the loss and gradients of the plain-torch path (loss.kernel=torch: the chunked torch head). On a GPU (marker gpu,
`make gpu-check`) the same comparison at the demo's sizes is the check that training through the fused backward is
right, which loss.kernel=auto waits for (docs/kernels.md)."""
import pytest
import torch

from dico_scale.config import ConfigError, load_config
from dico_scale.stages.dico import DicoStage

BLANK = ["train.init_from=", "captioner.image_encoder_weights=", "evaluator.weights=", "tracking.enabled=false"]
TINY = BLANK + ["captioner.width=64", "captioner.heads=4", "captioner.decoder_layers=1", "captioner.encoder_layers=1",
                "generation.candidates=2", "generation.max_len=4"]


class Local:
    """What the stage needs of a DeepSpeed engine: `module` and a forward call."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _step(kernel: str, pixels: torch.Tensor, overrides=TINY, device="cpu", dtype=torch.float32):
    """One dico step and its backward, the module in `dtype` (as DeepSpeed casts it), no optimizer:
    (stage, step output, fp32 gradients by parameter name)."""
    cfg = load_config("configs/demo/dico.yaml", overrides + [f"loss.kernel={kernel}"])
    torch.manual_seed(0)
    stage = DicoStage(cfg, torch.device(device))
    stage.module.to(device, dtype)
    engine = Local(stage.module)
    stage.setup(engine)
    out = stage.step(engine, {"pixels": pixels.to(device)})
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in stage.module.named_parameters() if p.grad is not None}
    return stage, out, grads


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def check_fused_step_equals_torch(pixels, overrides, device, dtype, tol, param_tol):
    """The step through the fused head (loss.kernel=triton) against the torch head, on the same candidates: the
    loss and its log-prob metrics, every gradient together within `tol` (relative norm), each within `param_tol`."""
    ref_stage, ref, ref_grads = _step("torch", pixels, overrides, device, dtype)
    tri_stage, tri, tri_grads = _step("triton", pixels, overrides, device, dtype)
    assert not ref_stage.fused and tri_stage.fused
    assert ref.metrics["dico/candidate_len"] == tri.metrics["dico/candidate_len"]  # the same rollout
    for key, got, want in [("loss", tri.loss, ref.loss)] + [(k, tri.metrics[k], ref.metrics[k]) for k in (
            "rewards/margin", "logps/chosen", "logps/rejected", "score/winner")]:  # relative, or absolute below 1
        got, want = (float(torch.as_tensor(x).detach()) for x in (got, want))
        assert abs(got - want) <= tol * max(abs(want), 1.0), (key, got, want)
    assert ref_grads.keys() == tri_grads.keys()
    names = sorted(ref_grads)
    whole = _relative(torch.cat([tri_grads[n].flatten() for n in names]), torch.cat([ref_grads[n].flatten()
                                                                                     for n in names]))
    worst = sorted(((_relative(tri_grads[n], ref_grads[n]), n) for n in names
                    if ref_grads[n].abs().sum() > 0), reverse=True)
    assert whole < tol and worst[0][0] < param_tol, (whole, worst[:5])
    return (ref, ref_grads), (tri, tri_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_triton_path_matches_the_torch_path(dtype):
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]  # bf16: the kernels' half inputs in fp32 tiles here
    (ref, ref_grads), (tri, tri_grads) = check_fused_step_equals_torch(pixels, TINY, "cpu", dtype, tol, 5 * tol)
    if dtype == torch.float32:  # the step's own clock, and every gradient element, tightly
        phases = {f"time/{p}_s" for p in ("generate", "reward", "policy", "reference")}
        assert phases <= ref.metrics.keys() and all(ref.metrics[k] > 0 for k in phases)
        torch.testing.assert_close(tri.loss, ref.loss, rtol=1e-5, atol=1e-6)
        assert "decoder.wte.weight" in ref_grads
        for name, g in ref_grads.items():
            assert g.abs().sum() > 0 or name.startswith("image_encoder"), name
            torch.testing.assert_close(tri_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_on_cuda_the_fused_backward_trains_as_the_torch_head(dtype):
    """The demo's captioner (configs/demo/dico.yaml: 8 images x 5 candidates x 16 tokens) on CUDA: the fused head's
    forward and backward against the torch head. The H200 and H100 runs lost dhidden's softmax term to tl.trans (a
    5-9% error); bf16 rounding gives ~1e-3."""
    pixels = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    check_fused_step_equals_torch(pixels, BLANK, "cuda", dtype, tol, 5 * tol)


def test_triton_kernel_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = load_config("configs/demo/dico.yaml", TINY + ["loss.kernel=triton"])
    with pytest.raises(ConfigError, match="loss.kernel=triton needs CUDA"):
        DicoStage(cfg, torch.device("cpu"))


def test_images_whose_rewards_all_tie_add_no_loss(monkeypatch):
    """An image whose candidates all score the same (every cosine clamped to 0, a CIDEr of 0) has no winner: its row
    adds nothing, else the first beam would be reinforced for its position; a batch of such rows trains nothing."""
    from dico_scale.kernels import dico_loss

    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    cfg = load_config("configs/demo/dico.yaml", TINY + ["loss.kernel=torch"])
    for rewards, tied in (([[0.0, 0.0], [0.3, 0.1]], 0.5), ([[0.2, 0.2], [0.0, 0.0]], 1.0)):
        torch.manual_seed(0)
        stage = DicoStage(cfg, torch.device("cpu"))
        engine = Local(stage.module)
        stage.setup(engine)
        logps, sequence_logprobs = [], stage.rollout.sequence_logprobs  # the policy's, then the reference's
        monkeypatch.setattr(stage.rollout, "sequence_logprobs", lambda *a: logps.append(sequence_logprobs(*a))
                            or logps[-1])
        monkeypatch.setattr(stage, "score_candidates", lambda batch, candidates: torch.tensor(rewards))
        out = stage.step(engine, {"pixels": pixels})
        out.loss.backward()
        grads = [p.grad for p in stage.module.parameters() if p.grad is not None]
        assert float(out.metrics["dico/tied"]) == tied and len(logps) == 2
        if tied == 1.0:
            assert float(out.loss.detach()) == 0.0 and grads and all(float(g.abs().sum()) == 0 for g in grads)
        else:  # the loss of the other image alone
            policy, ref = (x.view(2, 2)[1:].detach() for x in logps)
            want, _ = dico_loss(policy, ref, torch.tensor(rewards[1:]), beta=0.2, tau=300.0)
            torch.testing.assert_close(out.loss.detach(), want)
            assert any(float(g.abs().sum()) > 0 for g in grads)


def test_xe_trains_through_the_head_loss_kernel_names(monkeypatch):
    """loss.kernel=triton reaches the fused Triton head in XE too (its step passed `fused` alone, so the captioner's
    default 'auto' kept the gradient pass on the torch head), with the torch head's loss and gradients."""
    import dico_scale.kernels.fused_linear as fused_linear
    from dico_scale.stages.xe import XEStage

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls, triton_head = [], fused_linear.fused_linear_sequence_logprobs_triton
    monkeypatch.setattr(fused_linear, "fused_linear_sequence_logprobs_triton",
                        lambda *a, **kw: calls.append(1) or triton_head(*a, **kw))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    out = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        stage = XEStage(load_config("configs/demo/xe.yaml", TINY + [f"loss.kernel={kernel}"]), torch.device("cpu"))
        engine = Local(stage.module)
        stage.setup(engine)
        t = stage.tokenizer
        tokens = torch.tensor([[t.bos, 320, 1929, t.eos, t.pad], [t.bos, 320, 3720, 4839, t.eos]])
        step = stage.step(engine, {"tokens": tokens, "pixels": pixels})
        step.loss.backward()
        out[kernel] = step.loss.detach(), stage.module.decoder.wte.weight.grad.clone()
        assert len(calls) == (kernel == "triton")
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-4, atol=1e-6)
