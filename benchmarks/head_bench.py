"""The CPU output head: full [N*T, V] logits + cross-entropy (the path before the chunked head) against the chunked
torch head (dico_scale.kernels.torch_path.fused_linear_sequence_logprobs), forward + backward, side by side.

    python benchmarks/head_bench.py --json runs/bench/head.json   # about a minute on 2 cores
    python benchmarks/head_bench.py --smoke                       # tiny shapes, a plumbing check
    python benchmarks/head_bench.py --memory --json runs/bench/head_memory.json   # measured memory, ~2 minutes

Reported per shape: median seconds of each, their ratio, and the logits each holds at once (the full path holds
N*T*V fp32 logits plus their gradient; the chunked one at most torch_path.MAX_CHUNK_LOGITS, whatever V).

--memory measures instead of computing: the extra memory of the sequence log-prob path (forward + backward, and
forward alone as the reference model runs it) at N = 40 sequences x 30 tokens, H = 2048, V = 151,936 (--softcap 30:
also with Gemma 2's logit softcap, both paths, side by side): the materialised
path (torch_path.sequence_logprobs over h @ w.T, what the DiCO code does) against the chunked head. Each run is its own
process: the peak resident set (the kernel's VmHWM) beyond the resident set once the inputs exist, less the inputs'
gradients when they are kept. Large CPU tensors are mmapped by malloc and given back on free, so the peak is the
tensors' peak; torch keeps no CPU cache.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from dico_scale.errors import OneLineParser
from dico_scale.kernels import torch_path
from dico_scale.preflight import out_file_problem

SHAPES = [(16, 20, 256, 49409), (40, 20, 256, 49409), (8, 20, 256, 151936)]  # N, T, H, V
SMOKE_SHAPES = [(2, 3, 16, 1000), (4, 5, 16, 3001)]


def full_logits(h, w, labels):
    return F.cross_entropy((h @ w.T).flatten(0, 1), labels.flatten(), reduction="sum")


def chunked(h, w, labels):
    return -torch_path.fused_linear_sequence_logprobs(h, w, labels, torch.ones_like(labels, dtype=torch.bool)).sum()


def bench(N, T, H, V, repeats):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, T, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (N, T), generator=g)
    times = {"full": [], "chunked": []}
    for i in range(repeats + 1):  # alternate the two so that load on the machine hits both alike; 1st is warm-up
        grads = {}
        for name, fn in (("full", full_logits), ("chunked", chunked)):
            h.grad = w.grad = None
            t0 = time.perf_counter()
            fn(h, w, labels).backward()
            if i:
                times[name].append(time.perf_counter() - t0)
            grads[name] = w.grad
    assert torch.allclose(grads["full"], grads["chunked"], rtol=1e-3, atol=1e-5), "the two heads disagree"
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": [N, T, H, V], "full_s": med["full"], "chunked_s": med["chunked"],
            "chunked_over_full": med["chunked"] / med["full"], "full_logits_mib": N * T * V * 4 / 2**20,
            "chunked_logits_mib": min(N * T * V, torch_path.MAX_CHUNK_LOGITS) * 4 / 2**20}


MEMORY_SHAPE = (40, 30, 2048, 151936)
SMOKE_MEMORY_SHAPE = (4, 5, 64, 30011)
PATHS = {"materialised": lambda h, w, lab, m, cap=None: torch_path.sequence_logprobs(_capped(h @ w.T, cap), lab, m),
         "chunked": lambda h, w, lab, m, cap=None: torch_path.fused_linear_sequence_logprobs(h, w, lab, m, softcap=cap)}


def _capped(logits, cap):
    """Gemma 2's softcapped logits as its forward writes them (cap None: as they are)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def memory_worker(path: str, N: int, T: int, H: int, V: int, dtype: str, backward: bool, cap=None) -> dict:
    """One path once, in this (fresh) process: bytes of peak resident set beyond the inputs (and their gradients)."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, T, H, generator=g).to(dt).requires_grad_(backward)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dt).requires_grad_(backward)
    labels = torch.randint(0, V, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.bool)
    with torch.no_grad():  # warm-up at a tiny size: kernels, thread pools and lazy imports are not the path's memory
        PATHS[path](h[:1, :1].detach(), w[:8].detach(), labels[:1, :1] % 8, mask[:1, :1], cap)
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS, so the peak below is this call's
        f.write("5")
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        out = PATHS[path](h, w, labels, mask, cap)
        if backward:
            out.sum().backward()
    seconds = time.perf_counter() - t0
    grads = sum(t.grad.nbytes for t in (h, w) if t.grad is not None)
    extra = (_rss_kib("VmHWM") - base) * 1024 - grads
    return {"path": path, "backward": backward, "dtype": dtype, "softcap": cap, "extra_bytes": extra,
            "grad_bytes": grads,
            "seconds": seconds, "value": float(out.detach().double().sum())}


def measure_memory(shape, dtypes, repeats: int, passes=(True, False), caps=(None,)) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for backward in passes:
            for _ in range(repeats):  # alternate the paths (and caps): the machine's state hits them alike
                for path, cap in ((p, c) for c in caps for p in PATHS):
                    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", path, "--dtype", dtype,
                           "--shape", *map(str, shape)] + ([] if backward else ["--forward-only"]) + \
                        ([] if cap is None else ["--softcap", str(cap)])
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                    rows.append(json.loads(out.splitlines()[-1]))
    return rows


def memory_table(shape, rows) -> list[dict]:
    """Per (dtype, softcap, backward): the median extra bytes and seconds of each path and chunked / materialised."""
    out = []
    for dtype, cap, backward in dict.fromkeys((r["dtype"], r["softcap"], r["backward"]) for r in rows):
        key = (dtype, cap, backward)
        mine = [r for r in rows if (r["dtype"], r["softcap"], r["backward"]) == key]
        med = {p: statistics.median(r["extra_bytes"] for r in mine if r["path"] == p) for p in PATHS}
        secs = {p: statistics.median(r["seconds"] for r in mine if r["path"] == p) for p in PATHS}
        vals = [r["value"] for r in mine]
        out.append({"shape": list(shape), "dtype": dtype, "softcap": cap, "backward": backward,
                    "materialised_s": secs["materialised"], "chunked_s": secs["chunked"],
                    "materialised_mib": med["materialised"] / 2**20, "chunked_mib": med["chunked"] / 2**20,
                    "chunked_over_materialised": med["chunked"] / med["materialised"],
                    "values_agree": max(vals) - min(vals) <= 1e-3 * max(1.0, abs(max(vals)))})
    return out


def main(argv=None) -> int:
    p = OneLineParser(prog="head_bench.py", description=__doc__.splitlines()[0])  # a bad argument: one line
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    p.add_argument("--memory", action="store_true", help="measure the extra memory at N=40 x T=30, H=2048, V=151,936")
    p.add_argument("--dtypes", nargs="+", default=["float32"], help="--memory: input dtypes (the CPU trains fp32)")
    p.add_argument("--softcap", type=float, default=None, help="--memory: also measure both paths with this logit "
                   "softcap (Gemma 2's 30.0), side by side with the plain ones; worker: the cap")
    p.add_argument("--memory-worker", choices=list(PATHS), help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--shape", nargs=4, type=int, help=argparse.SUPPRESS)
    p.add_argument("--forward-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:  # a median of no timings otherwise
        p.error(f"--repeats {args.repeats} must be at least 1")
    if args.json and (problem := out_file_problem(args.json)):  # before the work, not after it
        p.error(f"--json {problem}")
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, *args.shape, args.dtype, not args.forward_only,
                                       args.softcap)))
        return 0
    if args.memory:
        return memory_main(args)
    if args.smoke:
        torch_path.MAX_CHUNK_LOGITS = 4000  # several chunks even at these shapes
    rows = [bench(*s, 1 if args.smoke else args.repeats) for s in (SMOKE_SHAPES if args.smoke else SHAPES)]
    print(f"{'N x T x H, V':<22} {'full s':>8} {'chunked s':>10} {'ratio':>6} {'full logits MiB':>16} "
          f"{'chunked MiB':>12}")
    for r in rows:
        N, T, H, V = r["shape"]
        print(f"{f'{N}x{T}x{H}, {V}':<22} {r['full_s']:>8.3f} {r['chunked_s']:>10.3f} {r['chunked_over_full']:>6.2f} "
              f"{r['full_logits_mib']:>16.0f} {r['chunked_logits_mib']:>12.0f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "threads": torch.get_num_threads(), "machine": platform.platform(),
                       "date": datetime.date.today().isoformat()}, f, indent=1)
    return 0


def memory_main(args) -> int:
    shape = SMOKE_MEMORY_SHAPE if args.smoke else MEMORY_SHAPE
    rows = measure_memory(shape, args.dtypes, 1 if args.smoke else args.repeats,
                          (True,) if args.smoke else (True, False),  # smoke: forward + backward only
                          (None,) if args.softcap is None else (None, args.softcap))
    table = memory_table(shape, rows)
    N, T, H, V = shape
    print(f"extra memory of the sequence log-prob path, N={N} x T={T}, H={H}, V={V:,} (median of "
          f"{1 if args.smoke else args.repeats} processes each; peak RSS beyond inputs and their gradients)")
    print(f"{'dtype':<9} {'softcap':>7} {'pass':<18} {'materialised MiB':>17} {'chunked MiB':>12} {'ratio':>7} "
          f"{'materialised s':>15} {'chunked s':>10}")
    for r in table:
        print(f"{r['dtype']:<9} {r['softcap'] or '-':>7} {'forward + backward' if r['backward'] else 'forward':<18} "
              f"{r['materialised_mib']:>17.1f} {r['chunked_mib']:>12.1f} {r['chunked_over_materialised']:>7.3f} "
              f"{r['materialised_s']:>15.2f} {r['chunked_s']:>10.2f}")
    if not all(r["values_agree"] for r in table):
        print("the two paths' log-probs disagree", file=sys.stderr)
        return 1
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "table": table, "threads": torch.get_num_threads(), "machine": platform.platform(),
                       "max_chunk_logits": torch_path.MAX_CHUNK_LOGITS, "date": datetime.date.today().isoformat()},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
