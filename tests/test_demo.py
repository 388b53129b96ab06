"""`make demo`'s driver end to end at a few steps per stage: evaluator -> xe -> dico with 2 CPU ranks, then the table."""
import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed


def test_demo_runs_all_stages_and_prints_the_table(demo):
    """The session's demo run (conftest), whose evaluator and XE weights the other chain tests start from."""
    tmp_path, proc = demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "XE vs DiCO on 12 held-out test images" in proc.stdout
    table = re.findall(r"^(XE|DiCO) +(-?[\d.]+|nan) +([\d.]+)$", proc.stdout, flags=re.M)
    assert [row[0] for row in table] == ["XE", "DiCO"]
    # a console a person reads: it ends with the table and where to look next; no library warning at every step
    tail = proc.stdout.strip().splitlines()[-8:]
    assert tail[0].startswith("DiCO ") and "Where to look next" in tail[2], "\n".join(tail)
    assert "mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db" in tail[-4]
    assert "FutureWarning" not in proc.stderr + proc.stdout
    assert "attention_mask" not in proc.stderr + proc.stdout  # transformers' padding false alarm (builtin decoder)
    # the launcher's own lines are not for a person (deepspeed's runner had INFO lines, torchrun an OMP banner)
    assert "[INFO] [launch.py" not in proc.stdout and "OMP_NUM_THREADS" not in proc.stderr + proc.stdout
    summary = json.loads((tmp_path / "runs" / "demo" / "summary.json").read_text())
    for name in ("XE", "DiCO"):
        assert summary[name]["metrics"]["images"] == 12
        assert 0.0 <= summary[name]["metrics"]["evaluator_score"] <= 2.5
    for stage in ("evaluator", "xe", "dico"):
        assert (tmp_path / "runs" / "demo" / stage / "model.pt").is_file()
    assert (tmp_path / "runs" / "demo" / "mlflow.db").is_file()


def test_demo_keep_keeps_finished_stages_and_continues_the_others(demo, tmp_path):
    """--keep on a demo whose dico stage did not export: evaluator and xe are kept as they are (byte for byte: dico's
    reference is xe's file), dico continues its checkpoint, and the table is printed again."""
    import shutil

    from conftest import DEMO_STEPS
    from helpers import demo_overrides

    work, proc = demo
    assert proc.returncode == 0
    copy = tmp_path / "work"
    shutil.copytree(work / "runs", copy / "runs")
    (copy / "runs" / "demo" / "dico" / "model.pt").unlink()
    xe = (copy / "runs" / "demo" / "xe" / "model.pt").read_bytes()
    data = [o for o in demo_overrides(copy / "runs" / "demo") if not o.startswith("tracking.uri")]
    again = subprocess.run([sys.executable, "-m", "dico_scale.demo", "--workdir", str(copy), "--keep", *data,
                            *DEMO_STEPS], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for stage in ("evaluator", "xe"):
        assert f"=== {stage}: kept from the earlier demo (runs/demo/{stage}/model.pt)" in again.stdout
    assert "resumed from runs/demo/dico/checkpoints/step_00000002 at step 2" in again.stdout + again.stderr
    assert (copy / "runs" / "demo" / "dico" / "model.pt").is_file() and "XE vs DiCO on 12" in again.stdout
    assert (copy / "runs" / "demo" / "xe" / "model.pt").read_bytes() == xe


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "stage evaluator: config error: unknown config key 'optim.lrr' (override optim.lrr=1)"),
    # only the dico stage needs 2 candidates: found before the evaluator and xe stages train, not after
    ("generation.candidates=1", "stage dico: config error: bad value for config key 'generation.candidates'"),
    # the evaluator stage trained into it, then xe stopped on its missing runs/demo/evaluator/model.pt
    ("train.output_dir=/tmp/elsewhere", "'train.output_dir=/tmp/elsewhere': the demo sets train.stage, "
                                        "train.output_dir, train.init_from, evaluator.weights, "
                                        "captioner.image_encoder_weights per stage"),
])
def test_demo_bad_override_fails_with_one_line_before_any_stage_trains(tmp_path, capsys, override, message):
    from dico_scale import demo

    origin = os.getcwd()
    try:
        assert demo.main(["--workdir", str(tmp_path), override]) == 2
    finally:
        os.chdir(origin)  # --workdir moved this process
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dico_scale.demo: {message}"), err
    assert not (tmp_path / "runs" / "demo").exists()


@pytest.mark.parametrize("args,message", [
    (["--ranks", "0"], "dico_scale.demo: --ranks 0 must be >= 1"),
    (["--workdir", "{file}"], "dico_scale.demo: --workdir '{file}': File exists"),
    (["--workdir", "{file}/sub"], "dico_scale.demo: --workdir '{file}/sub': Not a directory"),
])
def test_demo_bad_arguments_fail_with_one_line(tmp_path, capsys, args, message):
    from dico_scale import demo

    file = tmp_path / "a_file"
    file.write_text("")
    assert demo.main([a.format(file=file) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [message.format(file=file)]


def test_where_to_look_next_gives_compare_the_demo_s_captioner_and_folder(capsys, monkeypatch, tmp_path):
    """A demo on a Hugging Face captioner: its compare needs the same captioner overrides (make compare's configs
    describe the built-in one, whose runs would refuse the VLM's XE export); a demo in another folder (--workdir)
    names compare's config by its full path (make compare is the repository's)."""
    from dico_scale import demo
    from dico_scale.config import REPO_ROOT

    monkeypatch.chdir(REPO_ROOT)
    demo.print_next(10.0)
    assert capsys.readouterr().out.splitlines()[-1].split() == ["DiCO", "vs", "SCST", "make", "compare"]
    pali = ["captioner.model=hf_vlm", "captioner.hf_path=/m/pali", "captioner.prompt=<image>caption en"]
    demo.print_next(10.0, None, pali)
    assert capsys.readouterr().out.splitlines()[-1] == (
        "  DiCO vs SCST          python -m dico_scale.compare --config configs/demo/compare.yaml captioner.model=hf_vlm "
        "captioner.hf_path=/m/pali 'captioner.prompt=<image>caption en'")
    monkeypatch.chdir(tmp_path)
    demo.print_next(10.0, str(tmp_path))
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"  DiCO vs SCST          python -m dico_scale.compare --config {REPO_ROOT}/configs/demo/compare.yaml")
