"""Per-sequence log-prob kernels against their peers, forward + backward, on one GPU.

    python benchmarks/kernel_bench.py --json benchmarks/results/kernels.json   # the GPU run (a few minutes)
    python benchmarks/kernel_bench.py --smoke                                  # CPU plumbing check, < 30 s

From decoder states h [N, T, H] and the lm_head weight W [V, H] (bf16, V = 49,409): the [N] masked sums
of token log-probs, then backward with a random [N] upstream gradient, by naive fp32, the DiCO reference
code's bf16 log_softmax, torch.compile, Liger's fused linear CE and Cut Cross-Entropy (reduction="none",
ignore_index on padding, summed per sequence; Cut CE keeps its default gradient filtering, filter_eps="high"),
and ours (fused, on materialised logits, and the chunked torch head that loss.kernel=auto trains through). Cases:
the issue's three shapes, the same forward-only (the frozen reference model), beam-like candidates (k = 5, shared
prefixes -> bitwise-equal hidden rows), and vision-language models' vocabularies (#22): V = 151,936 (Qwen2-VL's
smaller models) and 262,208 (Gemma 3's), the head untied (W a trained [V, H] weight of its own, not the input
embedding), 8 images x 5 candidates x 30 tokens, forward + backward and forward-only.
Reported: median ms (CUDA events), peak MiB beyond inputs and their gradients, float64 errors of the first
run (gradient errors above 1e-2 listed), ratios to the best peer and to the floor 6*N*T*H*V / measured bf16 matmul rate; the copy bandwidth;
dico_loss_triton vs the plain-torch path; a CUDA-graph replay of the 40x20x512 fused forward + backward.

Peers run when importable. The GPU machine is offline: fetch their wheels beforehand with
benchmarks/fetch_wheels.sh and install them there with `pip install --no-deps benchmarks/wheels/*.whl`.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from dico_scale.kernels import torch_path
from dico_scale.kernels.loss import dico_loss_triton

V_FULL = 49409
SHAPES = [(40, 20, 512), (320, 30, 1024), (640, 32, 2048)]
BEAM_SHAPES = SHAPES[1:]
SMOKE_SHAPES, SMOKE_V = [(5, 6, 64), (10, 6, 64)], 512
# (N, T, H, V) of the untied VLM heads; H = 2048 as the largest shape above, so our kernels' autotune (keyed on H)
# runs once. torch.compile would recompile per shape (and hits dynamo's recompile limit): left out here.
VLM_HEADS, SMOKE_VLM_HEADS = [(40, 30, 2048, 151936), (40, 30, 2048, 262208)], [(8, 6, 64, 1500)]
UPCAST = "ours chunked torch, fp32 operands"  # the VLM heads only: the side-by-side ratio of the change
VLM_METHODS = ("naive fp32", "Liger FLCE", "Cut CE", "ours fused", "ours chunked torch", UPCAST)
IGNORE = -100
PEERS = ("naive fp32", "bf16 log_softmax", "torch.compile", "Liger FLCE", "Cut CE")
OURS = ("ours fused", "ours on logits", "ours chunked torch")
GRAD_FLAG = 1e-2  # gradient errors above this (3x the bf16 floor) are listed under the tables



def _gather_sum(logp, labels, mask):
    return (logp.gather(-1, labels[..., None]).squeeze(-1).float() * mask).sum(-1)


def naive_fp32(h, W, labels, mask):
    return _gather_sum((h @ W.T).float().log_softmax(-1), labels, mask)


def half_log_softmax(h, W, labels, mask):
    return _gather_sum((h @ W.T).log_softmax(-1), labels, mask)


def make_liger():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none")

    def liger(h, W, labels, mask):
        N, T, H = h.shape
        nll = loss(W, h.reshape(N * T, H), labels.masked_fill(mask == 0, IGNORE).reshape(-1))
        return -nll.float().view(N, T).sum(-1)
    return liger


def make_cce():
    from cut_cross_entropy import linear_cross_entropy

    def cce(h, W, labels, mask):
        nll = linear_cross_entropy(h, W, labels.masked_fill(mask == 0, IGNORE), ignore_index=IGNORE,
                                   reduction="none")
        # times mask: the gradient reaching CCE is then a dense tensor (sum's is an expanded view, which CCE's
        # backward cannot .view: 'view size is not compatible' on the H200, 2026-12-04)
        return -(nll.float() * mask).sum(-1)
    return cce


def make_ours():
    from dico_scale.kernels.fused_linear import fused_linear_sequence_logprobs_triton as fused
    from dico_scale.kernels.logprobs import sequence_logprobs_triton

    def on_logits(h, W, labels, mask):
        return sequence_logprobs_triton(h @ W.T, labels, mask)
    return fused, on_logits, torch_path.fused_linear_sequence_logprobs


def chunked_fp32_operands(h, W, labels, mask):
    """The chunked torch head as it multiplied until 2026-12-06 on CUDA too: each slice upcast to fp32 (its backward
    follows the forward's choice)."""
    half = torch_path._half_operands
    torch_path._half_operands = lambda *_: False
    try:
        return torch_path.fused_linear_sequence_logprobs(h, W, labels, mask)
    finally:
        torch_path._half_operands = half


def build_methods(smoke: bool) -> dict:
    """name -> callable, or name -> str saying why it does not run."""
    methods = {"naive fp32": naive_fp32, "bf16 log_softmax": half_log_softmax}
    methods["torch.compile"] = ("skipped in --smoke (compile time)" if smoke
                                else torch.compile(naive_fp32, dynamic=False))
    for name, make in (("Liger FLCE", make_liger), ("Cut CE", make_cce)):
        try:
            methods[name] = make()
        except ImportError as e:
            methods[name] = f"not installed ({e.name})"
    try:
        methods["ours fused"], methods["ours on logits"], methods["ours chunked torch"] = make_ours()
    except ImportError as e:
        methods["ours fused"] = methods["ours on logits"] = methods["ours chunked torch"] = f"not importable: {e}"
    methods[UPCAST] = chunked_fp32_operands
    return methods



def random_case(N, T, H, V, dev, gen):
    h = (torch.randn(N, T, H, generator=gen) * 0.5).to(torch.bfloat16)
    labels = torch.randint(V, (N, T), generator=gen)
    lengths = torch.randint(T // 2, T + 1, (N,), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return h.to(dev), labels.to(dev), mask.to(dev)


def beam_case(N, T, H, V, dev, gen, k=5):
    """k candidates per image as a random beam tree: candidate j copies j-1's tokens up to a random
    divergence step, then goes its own way. Hidden at t depends on the tokens before t only."""
    labels, lengths = torch.randint(V, (N, T), generator=gen), torch.randint(T // 2, T + 1, (N,), generator=gen)
    for n in range(N):
        if n % k:
            d = int(torch.randint(1, int(min(lengths[n], lengths[n - 1])), (1,), generator=gen))
            labels[n, :d] = labels[n - 1, :d]
            labels[n, d] = (labels[n - 1, d] + 1 + labels[n, d] % (V - 1)) % V  # differs from n-1 at d
    ids, pid = {}, torch.empty(N, T, dtype=torch.long)
    for n in range(N):
        row = labels[n].tolist()
        for t in range(T):  # position 0 (BOS only) is shared by the k candidates of an image
            pid[n, t] = ids.setdefault((n // k, tuple(row[:t])), len(ids))
    table = (torch.randn(len(ids), H, generator=gen) * 0.5).to(torch.bfloat16)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    seen = torch.unique(pid[mask.bool()]).numel()
    shared = 1.0 - seen / int(mask.sum())
    return table[pid].to(dev), labels.to(dev), mask.to(dev), shared


def torch_path64(h, W, labels, mask, g, grad, chunk=16):
    """float64 values (and gradients) a few sequences at a time, to bound memory."""
    W64 = W.detach().double().requires_grad_(grad)
    vals, dh = [], torch.empty(h.shape, dtype=torch.float64, device=h.device) if grad else None
    for s in range(0, h.shape[0], chunk):
        h64 = h[s:s + chunk].detach().double().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            v = torch_path.fused_linear_sequence_logprobs(h64, W64, labels[s:s + chunk], mask[s:s + chunk])
            if grad:
                v.backward(g[s:s + chunk].double())
                dh[s:s + chunk] = h64.grad
        vals.append(v.detach())
    return torch.cat(vals), dh, (W64.grad if grad else None)



def time_ms(fn, dev):
    """Milliseconds of one call: CUDA events on the GPU, wall clock on the CPU."""
    if dev == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def err_text(e: Exception) -> str:
    first = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def rel_err(x, ref, floor=1.0):
    return ((x.double() - ref).abs() / ref.abs().clamp_min(floor)).max().item()


def frob_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_method(fn, h, W, labels, mask, g, ref, train, dev, warmup, reps):
    """One method on one case: errors on the first run, then peak extra memory, then median time."""
    h, W = h.detach().requires_grad_(train), W.detach().requires_grad_(train)

    def step():
        h.grad = W.grad = None
        with torch.set_grad_enabled(train):
            out = fn(h, W, labels, mask)
            if train:
                out.backward(g)
        return out

    out = step()
    res = {"val_err": rel_err(out.detach(), ref[0])}
    if train:
        res["dh_err"], res["dW_err"] = frob_err(h.grad, ref[1]), frob_err(W.grad, ref[2])
    for _ in range(warmup):
        step()
    if dev == "cuda":  # inputs and their gradients stay allocated; count only what the method adds
        torch.cuda.synchronize()
        h.grad = W.grad = None
        grad_bytes = (h.numel() * h.element_size() + W.numel() * W.element_size()) if train else 0
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        res["mib"] = (torch.cuda.max_memory_allocated() - base - grad_bytes) / 2**20
    res["ms"] = statistics.median(time_ms(step, dev) for _ in range(reps))
    return res


def ceilings(dev, smoke):
    n = 512 if smoke else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = statistics.median([time_ms(lambda: a @ a, dev) for _ in range(5 if smoke else 20)][1:])
    x = torch.empty((1 << 22) if smoke else (1 << 30), dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms_copy = statistics.median([time_ms(lambda: y.copy_(x), dev) for _ in range(5 if smoke else 20)][1:])
    return {"matmul_tflops": 2 * n**3 / ms / 1e9, "copy_tbps": 2 * x.numel() / ms_copy / 1e9}



def run_case(case, methods, W, dev, args, ceil):
    h, labels, mask = case["h"], case["labels"], case["mask"]
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(h.shape[0], generator=gen).to(dev)
    ref = torch_path64(h, W, labels, mask, g, case["train"])
    N, T, H = h.shape
    case["floor_ms"] = 6 * N * T * H * W.shape[0] / (ceil["matmul_tflops"] * 1e9) * (1 if case["train"] else 1 / 3)
    results = {}
    for name, fn in methods.items():
        if name not in case.get("methods", PEERS + OURS):
            continue
        if isinstance(fn, str):
            results[name] = {"skip": fn}
            continue
        try:
            results[name] = run_method(fn, h, W, labels, mask, g, ref, case["train"], dev, args.warmup, args.reps)
        except Exception as e:  # a failing method is reported, the run goes on
            results[name] = {"error": err_text(e)}
        if dev == "cuda":
            torch.cuda.empty_cache()
        print(f"  {case['name']:<32} {name:<18} {fmt_cell(results[name])}", file=sys.stderr, flush=True)
    peer_ms = [r["ms"] for n, r in results.items() if n in PEERS and "ms" in r]
    for r in results.values():
        if "ms" in r:
            r["x_best_peer"] = r["ms"] / min(peer_ms) if peer_ms else None
            r["x_floor"] = r["ms"] / case["floor_ms"]
    return results


def make_cases(args, dev, V):
    gen = torch.Generator().manual_seed(0)
    shapes, beam_shapes = (SMOKE_SHAPES, SMOKE_SHAPES[1:]) if args.smoke else (SHAPES, BEAM_SHAPES)
    for N, T, H in shapes:
        h, labels, mask = random_case(N, T, H, V, dev, gen)
        yield dict(name=f"{N} x {T}, {H}", V=V, train=True, h=h, labels=labels, mask=mask)
    for N, T, H in shapes[:1] if args.smoke else shapes:
        h, labels, mask = random_case(N, T, H, V, dev, gen)
        yield dict(name=f"{N} x {T}, {H} fwd-only (ref model)", V=V, train=False, h=h, labels=labels, mask=mask)
    for N, T, H in beam_shapes:
        h, labels, mask, shared = beam_case(N, T, H, V, dev, gen)
        yield dict(name=f"{N} x {T}, {H} beam-like ({shared:.0%} shared)", V=V, train=True, h=h, labels=labels,
                   mask=mask, shared_prefix_rate=shared)
    for N, T, H, Vh in SMOKE_VLM_HEADS if args.smoke else VLM_HEADS:
        for train in (True, False):
            h, labels, mask = random_case(N, T, H, Vh, dev, gen)
            yield dict(name=f"{N} x {T}, {H} V={Vh:,} untied{'' if train else ' fwd-only'}", V=Vh, train=train,
                       h=h, labels=labels, mask=mask, methods=VLM_METHODS)


def bench_dico_loss(dev, args):
    out = {}
    for B in (8, 40) if args.smoke else (8, 4096):
        try:
            out[f"B={B}, k=5"] = time_dico_loss(B, dev, args)
        except Exception as e:
            out[f"B={B}, k=5"] = {"error": err_text(e)}
    return out


def time_dico_loss(B, dev, args):
    gen = torch.Generator().manual_seed(B)
    pi, ref, r = (torch.randn(B, 5, generator=gen).to(dev) for _ in range(3))
    row = {}
    for name, fn in (("triton", dico_loss_triton), ("torch", torch_path.dico_loss)):
        p = pi.clone().requires_grad_(True)

        def step():
            p.grad = None
            fn(p, ref, r)[0].backward()
        for _ in range(args.warmup + 1):
            step()
        row[name] = statistics.median(time_ms(step, dev) for _ in range(3 if args.smoke else 50))
    exp = torch_path.dico_loss(pi.double(), ref.double(), r.double())[0]
    row["rel_err"] = rel_err(dico_loss_triton(pi, ref, r)[0].detach(), exp, 1e-30)
    return row


def bench_graph(methods, dev, args):
    """Capture the 40x20x512 fused forward + backward in one CUDA graph; replay time."""
    fused = methods.get("ours fused")
    if dev != "cuda" or isinstance(fused, str):
        return {"skip": "needs CUDA and our fused kernel"}
    try:
        N, T, H = SHAPES[0]
        gen = torch.Generator().manual_seed(2)
        h, labels, mask = random_case(N, T, H, V_FULL, dev, gen)
        W = (torch.randn(V_FULL, H, generator=gen) * (4 / math.sqrt(H))).to(torch.bfloat16).to(dev)
        h.requires_grad_(True)
        W.requires_grad_(True)
        g = torch.randn(h.shape[0], device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and autotune outside the capture
            for _ in range(3):
                fused(h, W, labels, mask).backward(g)
        torch.cuda.current_stream().wait_stream(side)
        h.grad = W.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused(h, W, labels, mask)
            out.backward(g)
        graph.replay()
        ref = torch_path64(h, W, labels, mask, g, False)[0]
        return {"replay_ms": statistics.median(time_ms(graph.replay, dev) for _ in range(max(args.reps, 50))),
                "val_err": rel_err(out.detach(), ref)}
    except Exception as e:
        return {"error": err_text(e)}



def fmt_cell(r):
    if "ms" not in r:
        return r.get("skip") or f"error: {r['error']}"
    mib = f"{r['mib']:.1f}" if "mib" in r else "n/a"
    return f"{r['ms']:.2f} / {mib}"


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(report) -> str:
    names = list(PEERS + OURS + (UPCAST,))
    lines = [f"Device: {report['device']}; {report['date']}; {report['versions']}",
             f"Command: `{report['command']}`",
             f"Ceilings: {report['ceilings']['matmul_tflops']:.3g} TFLOP/s bf16 matmul, "
             f"{report['ceilings']['copy_tbps']:.3g} TB/s copy. Cells: median ms / peak MiB beyond inputs "
             f"and their gradients (forward + backward unless fwd-only).", "",
             "| N × T, H | floor | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for c in report["cases"]:
        cells = [fmt_cell(c["results"].get(n, {"skip": "-"})) for n in names]
        lines.append(f"| {c['name']} | {c['floor_ms']:.2f} ms | " + " | ".join(cells) + " |")
    lines += ["", "| case | method | ms | MiB | × best peer | × floor | max rel err values | rel err dh | rel err dW |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        for n in names:
            r = c["results"].get(n, {})
            if "ms" in r:
                lines.append(f"| {c['name']} | {n} | {r['ms']:.2f} | {fmt(r.get('mib'), '.1f')} | "
                             f"{fmt(r['x_best_peer'], '.2f')} | {r['x_floor']:.1f} | {r['val_err']:.1e} | "
                             f"{fmt(r.get('dh_err'), '.1e')} | {fmt(r.get('dW_err'), '.1e')} |")
    flagged = [f"{n} ({c['name']}): dh {fmt(r.get('dh_err'), '.1e')}, dW {fmt(r.get('dW_err'), '.1e')}"
               for c in report["cases"] for n, r in c["results"].items()
               if any(not e <= GRAD_FLAG for e in (r.get("dh_err", 0), r.get("dW_err", 0)))]  # NaN is flagged too
    lines += ["", f"Gradient errors above {GRAD_FLAG:g}: " + ("; ".join(flagged) if flagged else "none") + ". On the "
              "H200 (BENCHMARKS.md, 2026-12-04) our fused backward's dhidden lost the softmax term (6-9%), so "
              "loss.kernel=auto trains through the chunked torch head (ours chunked torch) and keeps the fused kernel "
              "for gradient-free calls."]
    lines += ["", "| DiCO loss fwd + bwd | dico_loss_triton ms | torch path ms | rel err vs fp64 |",
              "|---|---|---|---|"]
    for case, r in report["dico_loss"].items():
        lines.append(f"| {case} | error: {r['error']} | | |" if "error" in r else
                     f"| {case} | {r['triton']:.3f} | {r['torch']:.3f} | {r['rel_err']:.1e} |")
    gr = report["cuda_graph"]
    lines += ["", "CUDA graph, 40 × 20, 512 fused forward + backward: " +
              (f"replay {gr['replay_ms']:.3f} ms, max rel err {gr['val_err']:.1e}" if "replay_ms" in gr
               else gr.get("skip") or f"error: {gr['error']}")]
    lines += ["", "Cut CE runs with its default gradient filtering (filter_eps='high'): small gradient tiles are "
              "skipped, visible in its dh/dW error columns; the other methods are exact. Errors are against float64 on "
              "the same bf16 inputs; gradients are stored in bf16, so ~3e-3 is their rounding floor."]
    return "\n".join(lines)


def versions() -> str:
    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"
    return ", ".join([f"torch {torch.__version__}"] + [f"{p} {version(p)}" for p in
                                                      ("triton", "liger-kernel", "cut-cross-entropy")])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter, no CUDA calls")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        p.error("needs CUDA (use --smoke on the CPU)")
    dev, V = ("cpu", SMOKE_V) if args.smoke else ("cuda", V_FULL)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 3)
    args.reps = args.reps if args.reps is not None else (1 if args.smoke else 10)
    torch.manual_seed(0)
    methods = build_methods(args.smoke)
    ceil = ceilings(dev, args.smoke)
    weights = {}
    report = {"device": torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
              "date": datetime.datetime.now().isoformat(timespec="minutes"), "versions": versions(),
              "command": "python " + " ".join(sys.argv), "ceilings": ceil, "V": V, "cases": []}
    for case in make_cases(args, dev, V):
        key = case["V"], case["h"].shape[2]
        if key not in weights:  # logits std ~2 for hidden std 0.5
            gen = torch.Generator().manual_seed(key[1])
            weights[key] = (torch.randn(*key, generator=gen) * (4 / math.sqrt(key[1]))).to(torch.bfloat16).to(dev)
        try:
            results = run_case(case, methods, weights[key], dev, args, ceil)
        except Exception as e:  # e.g. the float64 reference out of memory: report, go on
            names = case.get("methods", methods)
            case["floor_ms"], results = float("nan"), {n: {"error": err_text(e)} for n in names}
        report["cases"].append({k: v for k, v in case.items() if k not in ("h", "labels", "mask", "methods")}
                               | {"results": results})
    report["dico_loss"] = bench_dico_loss(dev, args)
    report["cuda_graph"] = bench_graph(methods, dev, args)
    text = markdown(report)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report | {"markdown": text}, f, indent=1)


if __name__ == "__main__":
    main()
