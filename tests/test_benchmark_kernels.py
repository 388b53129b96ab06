"""The kernel benchmark's --smoke mode runs end to end on the CPU (Triton interpreter) and reports every method."""
import json
import os
import subprocess
import sys

METHODS = ("naive fp32", "bf16 log_softmax", "torch.compile", "Liger FLCE", "Cut CE", "ours fused", "ours on logits",
           "ours chunked torch")


def test_kernels_benchmark_smoke(repo, tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "benchmarks/kernel_bench.py", "--smoke", "--json", str(out)], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| N × T, H |"))
    for name in METHODS:
        assert f" {name} |" in header, name
    assert "Gradient errors above 0.01: none." in proc.stdout
    report = json.loads(out.read_text())
    names = [c["name"] for c in report["cases"]]
    assert names[3].startswith("10 x 6, 64 beam-like") and 0 < report["cases"][3]["shared_prefix_rate"] < 1
    # the untied VLM head (a small V here), forward + backward and forward-only, without the logits-bound methods
    assert names[4:] == ["8 x 6, 64 V=1,500 untied", "8 x 6, 64 V=1,500 untied fwd-only"]
    assert [c["V"] for c in report["cases"]] == [512] * 4 + [1500] * 2
    assert set(report["cases"][4]["results"]) == {"naive fp32", "Liger FLCE", "Cut CE", "ours fused",
                                                  "ours chunked torch", "ours chunked torch, fp32 operands"}
    assert all("ours chunked torch, fp32 operands" not in c["results"] for c in report["cases"][:4])
    for case in report["cases"][4:]:  # the same numbers (on the CPU both upcast)
        r = case["results"]["ours chunked torch, fp32 operands"]
        assert "ms" in r and r["val_err"] < 1e-5 and r.get("dh_err", 0) < 1e-2, r
    for case in report["cases"]:
        for name in ("naive fp32", "ours fused", "ours chunked torch"):  # these always run; values near exact
            r = case["results"][name]
            assert "ms" in r, (case["name"], name, r)
            assert r["val_err"] < 2e-2, (case["name"], name, r)
            assert ("dh_err" in r) == case["train"] and r.get("dh_err", 0) < 1e-2, (case["name"], name, r)
        assert case["results"]["ours fused"]["val_err"] < 1e-5
        assert case["results"]["ours chunked torch"]["val_err"] < 1e-5
    assert set(report["dico_loss"]) == {"B=8, k=5", "B=40, k=5"}
    assert all(r["rel_err"] < 1e-5 for r in report["dico_loss"].values())
