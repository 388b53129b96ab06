"""benchmarks/head_bench.py --smoke: both heads run forward + backward, agree on the gradient, and are reported."""
import json
import subprocess
import sys


def test_head_benchmark_smoke(repo, tmp_path):
    out = tmp_path / "head.json"
    proc = subprocess.run([sys.executable, "benchmarks/head_bench.py", "--smoke", "--json", str(out)], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["shape"] for r in rows] == [[2, 3, 16, 1000], [4, 5, 16, 3001]]
    assert all(r["full_s"] > 0 and r["chunked_s"] > 0 for r in rows)
    assert rows[1]["chunked_logits_mib"] < rows[1]["full_logits_mib"]  # 4000 logits a chunk, not 20 x 3001
    assert "chunked MiB" in proc.stdout
    for path, problem in ((tmp_path, "is a folder; name the file to write"),
                          ("/proc/nope/x.json", "cannot be written (No such file or directory)")):  # before the work
        bad = subprocess.run([sys.executable, "benchmarks/head_bench.py", "--smoke", "--json", str(path)], cwd=repo,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr == f"head_bench.py: error: --json '{path}' {problem}\n"


def test_head_memory_benchmark_smoke(repo, tmp_path):
    """--memory: each path in its own process, its peak resident set measured; both paths give the same log-probs,
    plain and (--softcap) softcapped."""
    out = tmp_path / "mem.json"
    proc = subprocess.run([sys.executable, "benchmarks/head_bench.py", "--memory", "--smoke", "--softcap", "30",
                           "--json", str(out)], cwd=repo, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {(r["path"], r["backward"], r["softcap"]) for r in result["rows"]} == {
        (p, True, cap) for p in ("materialised", "chunked") for cap in (None, 30.0)}
    plain, capped = (t["chunked_s"] for t in result["table"])
    assert [t["softcap"] for t in result["table"]] == [None, 30.0] and plain > 0 and capped > 0
    assert all(r["extra_bytes"] > 0 for r in result["rows"]) and all(t["values_agree"] for t in result["table"])
    assert "forward + backward" in proc.stdout
