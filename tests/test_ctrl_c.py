"""Ctrl-C is a preemption (a checkpoint at the next step, exit 3), Ctrl-C twice exits at once (130); and a run folder
belongs to one stage. Real signals to real processes; one 2-rank launch under the deepspeed launcher."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import launch_xe, steps_logged, wait_for, xe_args

from dico_scale.config import ConfigError, load_config
from dico_scale.preflight import check_history, check_lone_export, check_stage, finished_run
from dico_scale.supervision import SAME_CTRL_C_S

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def _ours_in_a_traceback(text: str) -> bool:
    """A traceback frame in this project's code (deepspeed's own runner prints a traceback of its own on Ctrl-C)."""
    return re.search(r'File "[^"]*/dico_scale/', text) is not None


@pytest.mark.distributed
def test_ctrl_c_on_a_2_rank_launch_checkpoints_and_the_folder_then_refuses_another_stage(tmp_path):
    out, log = tmp_path / "xe", tmp_path / "launch.log"
    launcher, tree = launch_xe(tmp_path, out, log)
    try:
        os.killpg(launcher.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
        launcher.wait(timeout=120)
        wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 120,
                 "every rank to exit")
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    text = log.read_text()
    assert not _ours_in_a_traceback(text), text[-3000:]
    assert "stopping at step" in text and ": SIGINT" in text, text[-3000:]
    assert "preempted: checkpoint saved at step" in text and "train.resume=auto" in text, text[-3000:]
    tags = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "complete").is_file())
    assert tags, text[-3000:]
    marker = json.loads((tags[-1] / "complete").read_text())
    assert marker["stage"] == "xe" and marker["init_from"] == ""

    # issue 23's third attack: a dico run resuming in the xe folder, from the xe export
    proc = subprocess.run([sys.executable, "dico_scale/train.py", "--config", "configs/demo/dico.yaml",
                           f"train.output_dir={out}", "train.resume=auto", "evaluator.weights=",
                           "captioner.image_encoder_weights=", "train.init_from=", f"data.root={tmp_path}/data"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dico_scale: config error: train.output_dir '{out}': its newest checkpoint {tags[-1].name} belongs to the "
        "xe stage, this run is dico: use one train.output_dir per stage (and train.init_from=<the other "
        "folder>/model.pt)")
    assert "stage: xe" in (out / "config.yaml").read_text()  # refused before it wrote anything


def test_ctrl_c_twice_exits_at_once_without_a_traceback(tmp_path):
    out, db, log = tmp_path / "xe", tmp_path / "mlflow.db", tmp_path / "run.log"
    with open(log, "w") as f:
        run = subprocess.Popen([sys.executable, "dico_scale/train.py", *xe_args(tmp_path, out)], cwd=REPO, env=ENV,
                               start_new_session=True, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: steps_logged(db) >= 1, 240, "a training step")
        os.kill(run.pid, signal.SIGINT)
        wait_for(lambda: "Ctrl-C again to exit at once" in log.read_text(), 10, "the first Ctrl-C's line", every=0.02)
        # Frozen while it stops (a step and a checkpoint away): the second Ctrl-C surely comes before it is done,
        # and later than SAME_CTRL_C_S (sooner it would count as the same Ctrl-C, forwarded by a launcher).
        os.kill(run.pid, signal.SIGSTOP)
        time.sleep(SAME_CTRL_C_S + 0.2)
        os.kill(run.pid, signal.SIGINT)
        os.kill(run.pid, signal.SIGCONT)
        assert run.wait(timeout=30) == 130
    finally:
        os.killpg(run.pid, signal.SIGKILL) if run.poll() is None else None
    text = log.read_text()
    assert "Traceback" not in text and "dico_scale: Ctrl-C again: exiting now, without a checkpoint" in text, text
    assert not list(out.glob("checkpoints/step_*/complete"))  # it did not wait for the checkpoint


def _cfg(out: Path, stage: str, resume: str = "none"):
    return load_config(str(REPO / "configs/demo/xe.yaml"), [
        f"train.output_dir={out}", f"train.stage={stage}", f"train.resume={resume}", "evaluator.weights=",
        "captioner.image_encoder_weights=", "generation.candidates=2"])


def test_a_folder_with_another_stages_export_is_refused_and_an_unrecorded_stage_warns(tmp_path, capsys):
    torch.save({"state_dict": {}, "stage": "xe"}, tmp_path / "model.pt")
    check_stage(_cfg(tmp_path, "xe"), rank=0)  # the stage's own folder: fine
    with pytest.raises(ConfigError, match=f"train.output_dir '{tmp_path}': its model.pt belongs to the xe stage, "
                                          "this run is dico: use one train.output_dir per stage"):
        check_stage(_cfg(tmp_path, "dico"), rank=0)
    old = tmp_path / "checkpoints" / "step_00000002"  # a tag from before stages were recorded, config.yaml lost
    old.mkdir(parents=True)
    (old / "complete").write_text(json.dumps({"step": 2}))
    check_stage(_cfg(tmp_path, "dico", "auto"), rank=0)  # the newest checkpoint decides, not the export
    assert capsys.readouterr().err.strip() == (f"dico_scale: warning: {old} does not record its stage (written before "
                                               "stages were recorded); make sure it is a dico run's")
    (old / "config.yaml").write_text("train:\n  stage: scst\n")  # older tags: the config saved beside them
    with pytest.raises(ConfigError, match="its newest checkpoint step_00000002 belongs to the scst stage"):
        check_stage(_cfg(tmp_path, "dico", "auto"), rank=0)


def test_a_run_never_starts_beside_checkpoints_of_another_history(tmp_path):
    """Fresh, or from another folder's tag, beside complete checkpoints; or from an older tag of its own beside later
    ones: refused (a later resume=auto, a requeued job's, would continue those, and the pruning would keep them
    over this run's). Continuing the newest (auto, or its own tag) is fine; so is a folder without complete tags."""
    ckpts = tmp_path / "checkpoints"
    for n in (2, 4):
        (ckpts / f"step_{n:08d}").mkdir(parents=True)
    (ckpts / "step_00000006").mkdir()  # never completed: no history
    check_history(_cfg(tmp_path, "xe"))
    for n in (2, 4):
        (ckpts / f"step_{n:08d}" / "complete").write_text("{}")
    other = tmp_path / "elsewhere" / "step_00000009"
    other.mkdir(parents=True)
    refused = {"none": "another run's checkpoints (up to step_00000004) and this run starts fresh",
               str(ckpts / "step_00000002"): "checkpoints after step_00000002 (up to step_00000004) and this run "
                                             "resumes step_00000002",
               str(other): f"another run's checkpoints (up to step_00000004) and this run starts from {other}"}
    for resume, needle in refused.items():
        with pytest.raises(ConfigError) as e:
            check_history(_cfg(tmp_path, "xe", resume))
        assert str(e.value) == (f"train.output_dir '{tmp_path}' holds {needle}: a later train.resume=auto would "
                                "continue those instead; continue them with train.resume=auto, or remove them (or "
                                "use another output_dir) to start over")
    for resume in ("auto", str(ckpts / "step_00000004"), str(tmp_path / "checkpoints" / ".." / "checkpoints" /
                                                               "step_00000004")):
        check_history(_cfg(tmp_path, "xe", resume))


def test_a_model_pt_without_checkpoints_is_never_replaced_by_a_run_that_starts_over(tmp_path):
    """A finished run's folder whose checkpoints were removed (to save space), its job resubmitted: the run would
    train from the start and overwrite model.pt at its end. Refused, fresh or resume=auto, and beside a tag that never
    completed; with a complete checkpoint the run continues it (check_history and finished_run decide)."""
    torch.save({"state_dict": {}, "stage": "xe", "step": 40}, tmp_path / "model.pt")
    (tmp_path / "checkpoints" / "step_00000040").mkdir(parents=True)  # never completed
    for resume in ("none", "auto"):
        with pytest.raises(ConfigError) as e:
            check_lone_export(_cfg(tmp_path, "xe", resume))
        assert str(e.value) == (f"train.output_dir '{tmp_path}' holds a model.pt of step 40 and no checkpoint to "
                                "continue: this run would start over and replace it at its end; move it away (or use "
                                "another output_dir)")
    (tmp_path / "model.pt").write_bytes(b"not a torch file")  # still the user's file: refused, without a step
    with pytest.raises(ConfigError, match="holds a model.pt and no checkpoint to continue"):
        check_lone_export(_cfg(tmp_path, "xe", "auto"))
    (tmp_path / "checkpoints" / "step_00000040" / "complete").write_text("{}")
    check_lone_export(_cfg(tmp_path, "xe", "auto"))


def test_a_finished_run_resumed_does_nothing(tmp_path, capsys, clean_env):
    """train.resume=auto on a folder whose newest checkpoint is at train.max_steps with model.pt of that step (a
    finished Slurm job resubmitted): exit 0 with one line, nothing built, model.pt untouched. Without the export of
    that step, or with another max_steps, the run goes on."""
    from dico_scale import train

    tag = tmp_path / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (tag / "complete").write_text(json.dumps({"stage": "xe", "step": 4}))
    torch.save({"state_dict": {}, "stage": "xe", "step": 3}, tmp_path / "model.pt")
    assert finished_run(_cfg(tmp_path, "xe", "auto")) is None  # exported before the last checkpoint: not done
    torch.save({"state_dict": {}, "stage": "xe", "step": 4}, tmp_path / "model.pt")
    for resume, steps in (("none", 4), ("auto", 5), ("auto", 3)):  # a lower max_steps: the resume decides as before
        assert finished_run(load_config(str(REPO / "configs/demo/xe.yaml"), [
            f"train.output_dir={tmp_path}", f"train.resume={resume}", f"train.max_steps={steps}",
            "evaluator.weights=", "captioner.image_encoder_weights="])) is None
    before = (tmp_path / "model.pt").stat().st_mtime_ns
    assert train.main(["--config", str(REPO / "configs/demo/xe.yaml"), f"train.output_dir={tmp_path}",
                       "train.resume=auto", "train.max_steps=4", "evaluator.weights=",
                       "captioner.image_encoder_weights=", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]) == 0
    assert capsys.readouterr().out == (f"train.output_dir '{tmp_path}': the run finished at step 4 ({tmp_path}/"
                                       "model.pt); nothing to do (raise train.max_steps to train on)\n")
    assert (tmp_path / "model.pt").stat().st_mtime_ns == before and not (tmp_path / "mlflow.db").exists()

