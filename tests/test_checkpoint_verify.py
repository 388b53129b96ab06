"""Damaged checkpoints with 2 real DeepSpeed CPU ranks: a truncated file and a missing rank shard are skipped for the
previous complete tag, with one line naming the file; an explicit bad tag stops with exit 2; the MLflow run's status
is untouched until a checkpoint is loaded; a full disk is reported as such. (Another world size: test_elastic.py.)"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import check_ok, mlflow_uri, ranks_cmd
from mlflow.tracking import MlflowClient

from dico_scale.checkpoint import crc32, verify_local

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def _args(tmp: Path, out: Path) -> list[str]:
    return [f"data.root={tmp}/data", f"tracking.uri={mlflow_uri(tmp / 'mlflow.db')}", "data.synthetic.n_train=100",
            "data.synthetic.n_val=8", "data.synthetic.n_test=8", "data.synthetic.samples_per_shard=25",
            "data.samples_per_epoch=32", "data.shuffle_buffer=10", "train.micro_batch_size=2", "train.log_every=1",
            "train.val_every=0", "train.val_max_images=2", "train.save_every=2", "train.keep_checkpoints=5",
            "generation.max_len=4", "evaluator.weights=", "captioner.image_encoder_weights=", f"train.output_dir={out}"]


def _deepspeed(args: list[str], ranks: int = 2, timeout: int = 400):
    cmd = [*ranks_cmd("dico_scale/train.py", ranks), "--config", "configs/demo/xe.yaml", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def _run_status(tmp: Path) -> tuple[str, str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id])
    return run.info.run_id, run.info.status


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 ranks, 6 steps, complete checkpoints at steps 2, 4 and 6, each with a file manifest."""
    tmp = tmp_path_factory.mktemp("verify")
    out = tmp / "xe"
    check_ok(_deepspeed(_args(tmp, out) + ["train.max_steps=6"]))
    return tmp, out


def test_marker_records_every_file_with_size_and_checksum(trained):
    _, out = trained
    tag = out / "checkpoints" / "step_00000006"
    marker = json.loads((tag / "complete").read_text())
    assert marker["step"] == 6 and marker["world_size"] == 2 and marker["zero_stage"] == 2
    on_disk = sorted(str(p.relative_to(tag)) for p in tag.rglob("*") if p.is_file() and p.name != "complete")
    assert sorted(marker["files"]) == on_disk
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "config.yaml"} <= set(on_disk)
    for name, want in marker["files"].items():
        assert want == {"size": (tag / name).stat().st_size, "crc32": crc32(tag / name)}
    assert verify_local(tag) is None


def test_damaged_newest_tags_fall_back_to_the_previous_complete_one(trained, tmp_path):
    tmp, out = trained
    run_id, status = _run_status(tmp)
    assert status == "FINISHED"
    work = tmp_path / "xe"
    shutil.copytree(out, work)
    model = work / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt"
    os.truncate(model, model.stat().st_size // 2)  # a truncated model state in the newest tag
    (work / "checkpoints" / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # a lost shard
    # a stale lock from a crashed run: the holder died of SIGKILL with the lock file in place
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dico_scale.supervision import "
                               "OutputDirLock; OutputDirLock(sys.argv[1]).acquire(); print('locked', flush=True); "
                               "time.sleep(600)", str(work)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert (work / ".lock").read_text().startswith(f"pid {holder.pid} ")
    # what a save of step 3 that died left (no marker): a shard of another world size, a stale conversion
    dead = work / "checkpoints" / "step_00000003"
    (dead.parent / "step_00000003_universal").mkdir(parents=True)
    dead.mkdir()
    (dead / "zero_pp_rank_5_mp_rank_00_optim_states.pt").write_bytes(b"stale")

    proc = check_ok(_deepspeed(_args(tmp, work) + ["train.max_steps=3", "train.resume=auto"]))
    lines = proc.stdout.splitlines()
    skip6 = [l for l in lines if l.startswith(f"skipping checkpoint {work}/checkpoints/step_00000006:")]
    skip4 = [l for l in lines if l.startswith(f"skipping checkpoint {work}/checkpoints/step_00000004:")]
    assert len(skip6) == 1 and "mp_rank_00_model_states.pt has" in skip6[0] and "the marker recorded" in skip6[0]
    assert skip4 == [f"skipping checkpoint {work}/checkpoints/step_00000004: "
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"]
    assert f"resumed from {work}/checkpoints/step_00000002 at step 2" in proc.stdout
    assert (f"resuming {work}/checkpoints/step_00000002 with this run's config; 2 setting(s) differ from the "
            f"checkpoint's: train.max_steps 6 -> 3, train.output_dir {out} -> {work}") in lines  # a moved, shorter run
    assert "Traceback" not in proc.stderr
    assert _run_status(tmp) == (run_id, "FINISHED")  # resumed on the same run, finished again
    marker = json.loads((dead / "complete").read_text())
    assert marker["step"] == 3 and not any("rank_5" in name for name in marker["files"])  # the stale shard was not
    assert not (dead / "zero_pp_rank_5_mp_rank_00_optim_states.pt").exists()  # kept: a resume at 6 ranks would read it
    assert not (dead.parent / "step_00000003_universal").exists() and verify_local(dead) is None


def test_a_tag_folder_rank_0_cannot_make_fails_every_rank_in_one_line(tmp_path):
    """DeepSpeed makes the tag folder on rank 0 alone, before its first barrier: when that failed (checkpoints/ a
    file, or a link to a scratch volume gone since the start) rank 0 waited in our agreement and the others in
    DeepSpeed's barrier until gloo's 10-minute timeout. fresh_tag_folder makes it first, and every rank agrees."""
    (tmp_path / "checkpoints").write_text("a file")
    script = tmp_path / "save.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nimport torch.distributed as dist\n"
        "from dico_scale.checkpoint import fresh_tag_folder\nfrom dico_scale.errors import CheckpointError\n"
        "dist.init_process_group('gloo')\ntry:\n"
        f"    fresh_tag_folder(Path({str(tmp_path / 'checkpoints' / 'step_00000002')!r}))\n"
        "except CheckpointError as e:\n"
        f"    Path({str(tmp_path)!r}, f'rank{{dist.get_rank()}}.txt').write_text(str(e))\n"
        # as the trainer ends: gloo's threads torn down by the interpreter's exit aborted rank 0 (SIGABRT) 1 run in 3
        "dist.barrier()\ndist.destroy_process_group()\nfrom dico_scale.exit_codes import leave\nleave(0)\n")
    check_ok(subprocess.run(ranks_cmd(str(script)), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120))
    why = f"checkpoint {tmp_path}/checkpoints/step_00000002: saving failed: NotADirectoryError"
    for rank in (0, 1):  # each rank's own file: the launcher interleaves their output
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith(why)


def test_explicit_bad_tag_exits_2_and_leaves_the_run_alone(trained, tmp_path):
    tmp, out = trained
    run_id, _ = _run_status(tmp)
    work = tmp_path / "xe"
    shutil.copytree(out, work)
    optim = work / "checkpoints" / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(optim, "r+b") as f:  # same size, one byte flipped: only the checksum sees it
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    start = time.time()
    proc = _deepspeed(_args(tmp, work) + ["train.max_steps=8", f"train.resume={work}/checkpoints/step_00000006"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("dico_scale:")]
    assert errors and set(errors) == {
        f"dico_scale: config error: train.resume={work}/checkpoints/step_00000006: checkpoint fails verification: "
        f"zero_pp_rank_0_mp_rank_00_optim_states.pt is damaged (CRC-32 {crc32(optim)}, the marker recorded "
        f"{json.loads((optim.parent / 'complete').read_text())['files'][optim.name]['crc32']})"}
    assert "Traceback" not in proc.stderr and "resumed from" not in proc.stdout
    assert time.time() - start < 120
    assert _run_status(tmp) == (run_id, "FINISHED")


def test_an_export_that_cannot_be_written_fails_every_rank_in_one_line(trained, tmp_path):
    """The run's model.pt written on rank 0 alone: its failure (a full disk: torch's 'unexpected pos') was a
    traceback there while the other ranks waited. Here model.pt.tmp is a folder; the checkpoint is kept (a resume
    exports it again)."""
    tmp, out = trained
    work = tmp_path / "xe"
    shutil.copytree(out, work)
    (work / "model.pt").unlink()  # a run that stopped before its export
    (work / "model.pt.tmp").mkdir()
    proc = _deepspeed(_args(tmp, work) + ["train.max_steps=6", "train.resume=auto"])  # resumed at 6: exports
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = {l for l in proc.stderr.splitlines() if l.startswith("dico_scale:")}
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = lines.pop()  # torch's writer: "RuntimeError: [enforce fail ...] open file failed with strerror: Is a ..."
    assert line.startswith(f"dico_scale: checkpoint error: export {work}/model.pt: saving failed: ") and \
        line.endswith("Is a directory"), line
    assert not (work / "model.pt").exists() and verify_local(work / "checkpoints" / "step_00000006") is None


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_while_saving_names_the_folder_and_leaves_no_marker(tmp_path, small_disk):
    """48 MB hold the model states (~31 MB) but not the optimizer shards (~42 MB each at 2 ranks)."""
    out = small_disk / "xe"
    proc = _deepspeed(_args(tmp_path, out) + ["train.max_steps=2"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = {l for l in proc.stderr.splitlines() if l.startswith("dico_scale:")}
    tag = out / "checkpoints" / "step_00000002"
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith(f"dico_scale: checkpoint error: checkpoint {tag}: no space left on device (")
    assert line.endswith(f"bytes free in {out / 'checkpoints'})")
    assert tag.is_dir() and not (tag / "complete").exists()
    _, status = _run_status(tmp_path)
    assert status == "FAILED"
