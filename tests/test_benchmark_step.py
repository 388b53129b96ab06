"""benchmarks/dico_step.py runs end to end (tiny models, CPU) and reports what it measured."""
import json
import subprocess
import sys


def test_dico_step_benchmark_smoke(repo, tmp_path):
    """The built-in captioner and a vision-language model with LoRA adapters (a random Idefics3 of --hf-size, its
    images through its own processor; the reference is the policy with its adapters disabled)."""
    out = tmp_path / "step.json"
    cmd = [sys.executable, "benchmarks/dico_step.py", "--config", "configs/demo/dico.yaml", "--kernels", "torch",
           "--batch", "2", "--steps", "2", "--warmup", "1", "--captioners", "builtin,idefics3:lora", "--hf-size",
           "32,1,2,32", "--models", str(tmp_path / "models"), "--json", str(out), "generation.candidates=2",
           "generation.max_len=4"]
    p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for row in ("| builtin | dico | torch | False | 2 |", "| idefics3:lora | dico | torch | False | 2 |"):
        assert row in p.stdout, row
    rows = json.loads(out.read_text())["rows"]
    assert [r["captioner"] for r in rows] == ["builtin", "idefics3:lora"] and [r["lora_r"] for r in rows] == [0, 16]
    for r in rows:
        assert r["images_per_s"] > 0 and r["candidate_tokens_per_step"] > 0
        assert 0 < r["median_reward_s"] < r["median_step_s"] and r["phase_shares"]["reference"] > 0
    assert rows[1]["trainable_params"] == 4 * 2 * 16 * 32  # only the adapters: A and B of q, k, v, o in 1 layer
    assert (tmp_path / "models" / "width32-layers1-heads2-image_size32" / "idefics3" / "config.json").is_file()
    for args, message in ((["--config", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
                          (["--captioners", "nosuchrow"], "--captioners: nosuchrow not among builtin"),
                          (["--steps", "0", "--warmup", "0"], "--steps 0 must be at least 1")):  # before any model
        bad = subprocess.run([sys.executable, "benchmarks/dico_step.py", "--device", "cpu", *args], cwd=repo,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr.startswith(f"dico_step.py: error: {message}"), bad.stderr[-2000:]
        assert bad.stderr.count("\n") == 1


def test_dico_ranks_benchmark_smoke(repo, tmp_path):
    """benchmarks/dico_ranks.py: the real trainer, one process here (the 2-rank numbers are in BENCHMARKS.md), its
    images/s read back from the run's MLflow store."""
    out = tmp_path / "ranks.json"
    cmd = [sys.executable, "benchmarks/dico_ranks.py", "--captioners", "builtin", "--ranks", "1", "--batch", "2",
           "--steps", "3", "--warmup", "1", "--rounds", "1", "--workdir", str(tmp_path / "w"), "--json", str(out),
           "generation.candidates=2", "generation.max_len=4", "train.val_max_images=2"]
    p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "| builtin | " in p.stdout and "| 1.00x | generate " in p.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["captioner"] == "builtin" and row["images_per_s"] > 0 and len(row["per_round"]) == 1
    # the trainer's phase clock, logged by every step and read back from MLflow
    assert set(row["phase_seconds"]) == {"generate", "reward", "policy", "reference", "backward"}
    assert all(v > 0 for v in row["phase_seconds"].values()) and abs(sum(row["phase_shares"].values()) - 1) < 1e-9
    bad = subprocess.run([sys.executable, "benchmarks/dico_ranks.py", "--steps", "2", "--warmup", "2"], cwd=repo,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--steps 2 must be more than --warmup 2" in bad.stderr
    bad = subprocess.run([sys.executable, "benchmarks/dico_ranks.py", "--captioners", "builtin,gpt5"], cwd=repo,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--captioners: gpt5 not among builtin, hf_encoder_decoder" in bad.stderr
    bad = subprocess.run([sys.executable, "benchmarks/dico_ranks.py", "--ranks", "0"], cwd=repo, capture_output=True,
                         text=True, timeout=60)  # a ZeroDivisionError after the runs before
    assert bad.returncode == 2 and bad.stderr == "dico_ranks.py: error: --ranks 0 must be at least 1\n"
