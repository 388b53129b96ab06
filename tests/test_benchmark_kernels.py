"""The kernel benchmark's --smoke mode runs end to end on the CPU (Triton interpreter) and reports every method."""
import json
import os
import subprocess
import sys

METHODS = ("naive fp32", "bf16 log_softmax", "torch.compile", "Liger FLCE", "Cut CE", "ours fused", "ours on logits")


def test_kernels_benchmark_smoke(repo, tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "benchmarks/kernel_bench.py", "--smoke", "--json", str(out)], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| N × T, H |"))
    for name in METHODS:
        assert f" {name} |" in header, name
    report = json.loads(out.read_text())
    assert [c["name"] for c in report["cases"]][-1].startswith("10 x 6, 64 beam-like")
    for case in report["cases"]:
        for name in ("naive fp32", "ours fused", "ours on logits"):  # these always run; values near exact
            r = case["results"][name]
            assert "ms" in r, (case["name"], name, r)
            assert r["val_err"] < 2e-2, (case["name"], name, r)
        assert case["results"]["ours fused"]["val_err"] < 1e-5
    assert 0 < report["cases"][-1]["shared_prefix_rate"] < 1
    assert set(report["dico_loss"]) == {"B=8, k=5", "B=40, k=5"}
    assert all(r["rel_err"] < 1e-5 for r in report["dico_loss"].values())
