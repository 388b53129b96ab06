"""The CPU output head: full [N*T, V] logits + cross-entropy (the path before the chunked head) against the chunked
torch head (dico_scale.kernels.torch_path.fused_linear_sequence_logprobs), forward + backward, side by side.

    python benchmarks/head_bench.py --json runs/bench/head.json   # about a minute on 2 cores
    python benchmarks/head_bench.py --smoke                       # tiny shapes, a plumbing check

Reported per shape: median seconds of each, their ratio, and the logits each holds at once (the full path holds
N*T*V fp32 logits plus their gradient; the chunked one at most torch_path.MAX_CHUNK_LOGITS, whatever V).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from dico_scale.kernels import torch_path

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
