"""What a hostile caller can hand the kernels' entry points (a sweep's findings): masked positions that hold NaN or inf,
labels outside the vocabulary, misshapen or mistyped inputs, a double backward, dtypes "auto" must route to torch.
Every path against float64 (the Triton kernels through the interpreter on the CPU)."""

import functools
import re

import pytest
import torch
from test_kernel_logprobs import ref64, rel

import dico_scale.kernels as kernels
from dico_scale.kernels import torch_path
from dico_scale.kernels.fused_linear import fused_linear_sequence_logprobs_triton
from dico_scale.kernels.loss import dico_loss_triton
from dico_scale.kernels.logprobs import sequence_logprobs_triton

N, T, H, V = 2, 4, 16, 300
HEADS = {"torch": torch_path.fused_linear_sequence_logprobs,
         "triton": fused_linear_sequence_logprobs_triton,
         "triton-dedup": functools.partial(fused_linear_sequence_logprobs_triton, dedup=True)}
LOGITS = {"torch": torch_path.sequence_logprobs, "triton": sequence_logprobs_triton}


def batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    labels = torch.randint(0, V, (N, T), generator=g)
    return hidden, weight, labels, torch.ones(N, T, dtype=torch.bool)


def padded(bad):
    """The last position of sequence 0 masked out, holding `bad` and a -100 label (padding after EOS)."""
    hidden, weight, labels, mask = batch()
    hidden[0, -1], labels[0, -1], mask[0, -1] = bad, -100, False
    return hidden, weight, labels, mask


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("head", ["torch", "triton", "triton-dedup", "triton-bias"])
def test_a_non_finite_state_under_the_mask_reaches_neither_result_nor_gradients(head, bad):
    """The sync-free Triton plan kept masked rows at weight 0: 0 * nan poisoned the sum and every dW entry."""
    hidden, weight, labels, mask = padded(bad)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(1)) if head == "triton-bias" else None
    fn = functools.partial(kernels.fused_linear_sequence_logprobs, kernel="triton") if bias is not None \
        else HEADS[head]
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fn(h, w, labels, mask) if bias is None else fn(h, w, labels, mask, bias=bias)
    g = torch.tensor([0.7, -1.3])
    out.backward(g)
    h64, w64 = hidden.double().nan_to_num(posinf=0.0).requires_grad_(), weight.double().requires_grad_()
    logits = h64 @ w64.T if bias is None else h64 @ w64.T + bias.double()
    want = ref64(logits, labels, mask)
    want.backward(g.double())
    assert rel(out, want) < 1e-5
    assert rel(h.grad, h64.grad) < 1e-5 and (h.grad[0, -1] == 0).all() and rel(w.grad, w64.grad) < 1e-5
    with torch.no_grad():  # the forward-only path (the reference model's) alike
        again = fn(hidden, weight, labels, mask) if bias is None else fn(hidden, weight, labels, mask, bias=bias)
    assert torch.allclose(again, out.detach())


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
@pytest.mark.parametrize("path", LOGITS)
def test_a_non_finite_logits_row_under_the_mask_reaches_neither_result_nor_gradient(path, bad):
    """The torch path multiplied by the mask (0 * nan) and its logsumexp's gradient was NaN on such a row."""
    _, _, labels, mask = padded(0.0)
    logits = torch.randn(N, T, V, generator=torch.Generator().manual_seed(2))
    logits[0, -1] = bad
    x = logits.clone().requires_grad_()
    out = LOGITS[path](x, labels, mask)
    out.sum().backward()
    x64 = logits.double().nan_to_num(neginf=0.0).requires_grad_()
    want = ref64(x64, labels, mask)
    want.sum().backward()
    assert rel(out, want) < 1e-6 and rel(x.grad, x64.grad) < 1e-5 and (x.grad[0, -1] == 0).all()


def _double_backward_cases():
    hidden, weight, labels, mask = batch()
    logits = torch.randn(N, T, V)
    pi = torch.randn(3, 4)
    yield "_ChunkedHeadLogprobs", lambda x: torch_path.fused_linear_sequence_logprobs(x, weight, labels, mask), hidden
    yield "_FusedLinearLogprobs", lambda x: fused_linear_sequence_logprobs_triton(x, weight, labels, mask), hidden
    yield "_SequenceLogprobs", lambda x: sequence_logprobs_triton(x, labels, mask), logits
    yield "_ScoredLogSumExp", lambda x: torch_path.sequence_logprobs(x, labels, mask), logits
    yield "_DicoLossFn", lambda x: dico_loss_triton(x, pi, pi.exp())[0], pi


DOUBLE_BACKWARD = list(_double_backward_cases())


@pytest.mark.parametrize("name,fn,x", DOUBLE_BACKWARD, ids=[case[0] for case in DOUBLE_BACKWARD])
def test_a_double_backward_raises(name, fn, x):
    """Each custom Function's backward is not differentiable itself: create_graph=True raises at once instead of
    second-order gradients that were off by 87% (torch's once_differentiable alone returns them detached when the
    incoming gradient needs none, so a gradient penalty would lose its second-order term silently)."""
    x = x.clone().requires_grad_()
    out = fn(x).sum()
    with pytest.raises(RuntimeError, match=f"{name} has no double backward"):
        torch.autograd.grad(out, x, create_graph=True)
    assert torch.isfinite(torch.autograd.grad(fn(x).sum(), x)[0]).all()  # a first backward as before


def _entry_points():
    hidden, weight, _, _ = batch()
    logits = torch.randn(N, T, V)
    for name, head in HEADS.items():
        yield f"head-{name}", functools.partial(head, hidden, weight)
    for name, fn in LOGITS.items():
        yield f"logits-{name}", functools.partial(fn, logits)


ENTRY_POINTS = dict(_entry_points())


@pytest.mark.parametrize("bad", [-1, V, V + 10**6])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_scored_label_outside_the_vocabulary_is_refused(entry, bad):
    """The torch head read W[V - 1] for -1; the Triton kernels read out of bounds (a segfault at V + 1e6)."""
    _, _, labels, mask = batch()
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=re.escape(f"labels must be in [0, {V}) where mask is set, got {bad}")):
        ENTRY_POINTS[entry](labels, mask)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_any_label_under_the_mask_is_accepted(entry):
    """docs/kernels.md: masked labels may be any id (-100, a pad id); torch_path.sequence_logprobs raised on -100."""
    _, _, labels, mask = padded(0.0)
    labels[1, 0], mask[1, 0] = V + 10**6, False
    out = ENTRY_POINTS[entry](labels, mask)
    clean = labels.masked_fill(~mask, 0)
    assert torch.allclose(out, ENTRY_POINTS[entry](clean, mask)) and out.shape == (N,)


def test_narrow_integer_labels_are_checked_against_the_vocabulary_exactly():
    """An int8 compared with 151,936 wraps it to -128: every label would have been out of range."""
    mask = torch.ones(1, 2)
    torch_path.check_labels(torch.tensor([[5, 127]], dtype=torch.int8), mask, 151936)
    with pytest.raises(ValueError, match="got -1"):
        torch_path.check_labels(torch.tensor([[5, -1]], dtype=torch.int8), mask, 151936)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_the_heads_check_shapes_and_dtypes_alike(path):
    """The torch head took labels [N, T, 1] (an [R, R, H] intermediate), failed on mask [N] with a Python unpacking
    error, and truncated float labels."""
    hidden, weight, labels, mask = batch()
    head = HEADS[path]
    cases = [("labels must have shape", (hidden, weight, labels[..., None], mask)),
             ("mask must have shape", (hidden, weight, labels, mask[:, 0])),
             ("labels must be", (hidden, weight, labels.float(), mask)),
             ("hidden must be", (hidden[0], weight, labels, mask)),
             ("weight must be", (hidden, weight[:, :3], labels, mask)),
             ("weight must be", (hidden, weight[:0], labels, mask))]  # V = 0 was a ZeroDivisionError
    for message, args in cases:
        with pytest.raises(ValueError, match=message):
            head(*args)


@pytest.mark.parametrize("path", LOGITS)
def test_the_logits_paths_check_shapes_and_dtypes_alike(path):
    _, _, labels, mask = batch()
    with pytest.raises(ValueError, match="labels must be"):  # the torch path truncated float labels
        LOGITS[path](torch.randn(N, T, V), labels.float(), mask)
    with pytest.raises(ValueError, match="logits must be"):  # V = 0 was a ZeroDivisionError
        LOGITS[path](torch.randn(N, T, 0), labels, mask)


def test_the_torch_paths_take_float64_and_narrow_integer_labels():
    hidden, weight, labels, mask = batch(dtype=torch.float64)
    want = ref64(hidden @ weight.T, labels, mask)
    for short in (labels.short(), labels.int()):
        got = torch_path.fused_linear_sequence_logprobs(hidden, weight, short, mask)
        assert got.dtype == torch.float64 and rel(got, want) < 1e-12
        assert rel(torch_path.sequence_logprobs(hidden @ weight.T, short, mask), want) < 1e-12


@pytest.mark.parametrize("chunk", [-5, 0, 0.5, True, "8"])
def test_max_chunk_logits_must_be_a_positive_int(chunk):
    hidden, weight, labels, mask = batch()
    with pytest.raises(ValueError, match=re.escape(f"max_chunk_logits must be None or a positive int, got {chunk!r}")):
        torch_path.fused_linear_sequence_logprobs(hidden, weight, labels, mask, max_chunk_logits=chunk)


def test_triton_takes_names_the_dtypes_auto_may_send_to_the_kernels():
    f32, bf16 = torch.float32, torch.bfloat16
    assert kernels.triton_takes(bf16, torch.int64, bf16) and kernels.triton_takes(f32, torch.int32)
    assert not kernels.triton_takes(torch.float64, torch.int64, torch.float64)
    assert not kernels.triton_takes(bf16, torch.int64, f32)  # autocast's bf16 states under an fp32 head
    assert not kernels.triton_takes(f32, torch.int16, f32)
    use = kernels.fused_head_uses_triton
    assert use("auto", is_cuda=True, needs_grad=False, takes=True)
    assert not use("auto", is_cuda=True, needs_grad=False, takes=False)
    assert use("triton", is_cuda=True, needs_grad=False, takes=False)  # "triton" refuses them itself


@pytest.mark.parametrize("case,want", [("fp32", "triton"), ("fp64", "torch"), ("bf16 states, fp32 head", "torch"),
                                       ("int16 labels", "torch"), ("bias needs grad", "torch")])
def test_auto_on_cuda_sends_inputs_the_kernel_refuses_to_torch(case, want, monkeypatch):
    """On CUDA "auto" sent the Triton kernels fp64, mixed dtypes and int16 labels (ValueErrors there), and the
    Triton head a bias that needs grad. CUDA is pretended: the dispatch sees CUDA, the kernels run interpreted."""
    monkeypatch.setattr(kernels, "_triton_for", lambda kernel, is_cuda: kernel != "torch")
    paths = []
    for name in ("fused_linear_sequence_logprobs", "sequence_logprobs"):
        real = getattr(torch_path, name)
        monkeypatch.setattr(torch_path, name, lambda *a, _real=real, **kw: paths.append("torch") or _real(*a, **kw))
    hidden, weight, labels, mask = batch()
    hidden = {"fp64": hidden.double(), "bf16 states, fp32 head": hidden.bfloat16()}.get(case, hidden)
    weight = weight.double() if case == "fp64" else weight
    labels = labels.short() if case == "int16 labels" else labels
    bias = torch.zeros(V, requires_grad=True) if case == "bias needs grad" else None
    kernels.fused_linear_sequence_logprobs(hidden, weight, labels, mask, kernel="auto", bias=bias)
    assert paths == ([] if want == "triton" else ["torch"])
    if case in ("fp32", "fp64", "int16 labels"):  # the logits kernel's dispatch alike
        paths.clear()
        kernels.sequence_logprobs(torch.randn(N, T, V, dtype=hidden.dtype), labels, mask, kernel="auto")
        assert paths == ([] if want == "triton" else ["torch"])


@pytest.mark.parametrize("softcap", [1e4 + 1, 1e6, 1e9])
def test_a_softcap_beyond_the_kernels_precision_is_refused(softcap):
    """The Triton head's tanh lost precision as the cap grew (61% at 1e9); models cap at 30-50."""
    hidden, weight, labels, mask = batch()
    for head in (torch_path.fused_linear_sequence_logprobs, fused_linear_sequence_logprobs_triton):
        with pytest.raises(ValueError, match=re.escape(f"softcap must be at most 10000 (models use 30-50), got "
                                                       f"{softcap!r}")):
            head(hidden, weight, labels, mask, softcap=softcap)
        head(hidden, weight, labels, mask, softcap=1e4)


def test_integer_rewards_are_taken_as_float_on_both_paths():
    """The torch dico_loss crashed on integer rewards (masked_fill of -inf); the Triton one took them."""
    g = torch.Generator().manual_seed(4)
    pi, ref = -torch.rand(3, 4, generator=g) * 10, -torch.rand(3, 4, generator=g) * 10
    rewards = torch.randint(0, 3, (3, 4), generator=g)  # ties, too
    want = torch_path.dico_loss(pi.double(), ref.double(), rewards.double())[0]
    for fn in (torch_path.dico_loss, dico_loss_triton):
        assert torch.allclose(fn(pi, ref, rewards)[0].double(), want, rtol=1e-5)
