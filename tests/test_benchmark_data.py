"""benchmarks/data.py runs end to end at a tiny size: dataset generation, shard writing, both loaders, the report."""
import json
import subprocess
import sys


def test_loader_benchmark_smoke(repo, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(repo / "benchmarks" / "data.py"), "--dir", str(tmp_path / "data"), "--images", "24",
           "--width", "96", "--height", "64", "--samples-per-shard", "6", "--workers", "1,2", "--batch-size", "4",
           "--epochs", "1", "--warmup", "0", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| workers | pipeline samples/s | folder samples/s | ratio |" in p.stdout
    report = json.loads(out.read_text())
    assert [r["workers"] for r in report["results"]] == [1, 2]
    assert all(r["pipeline_samples_per_s"] > 0 and r["folder_samples_per_s"] > 0 for r in report["results"])
    manifest = json.loads((tmp_path / "data" / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["images"] == 24 and manifest["splits"]["train"]["shards"] == 4
    assert len(list((tmp_path / "data" / "images").glob("*.jpg"))) == 24
