"""Best checkpoint selection (train.select_best / select_floor) and early stopping (train.patience).

Unit tests of the selection rules and of the config checks; one process running the real loop with a scripted
stage (this file run as a script: improvements, patience, resume, a missing metric); two real training runs."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import mlflow_uri

REPO = Path(__file__).resolve().parent.parent
XE = str(REPO / "configs" / "demo" / "xe.yaml")
BLANK = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]


# --- the selection rules ---------------------------------------------------------------------------------------------

def _sel(metric="score", mode="max", floor=None, patience=0):
    from dico_scale.selection import Selection
    return Selection(metric, mode, floor, patience)


def _run(sel, values, **extra):
    """Feeds validations 1, 2, ... to sel; returns (best, since_best, improved steps, first step it would stop)."""
    best, since, improved, stop = None, 0, [], None
    for step, v in enumerate(values, 1):
        metrics = {"score": v, **{k: vs[step - 1] for k, vs in extra.items()}}
        best, since, up = sel.observe(best, since, metrics, step)
        improved += [step] if up else []
        if stop is None and sel.should_stop(best, since):
            stop = step
    return best, since, improved, stop


def test_max_and_min_ties_are_no_improvement():
    best, since, improved, _ = _run(_sel(), [1, 3, 3, 2, 4, 4])
    assert improved == [1, 2, 5] and best["step"] == 5 and best["value"] == 4 and since == 1
    assert best["metric"] == "val/score" and best["metrics"] == {"val/score": 4.0}
    best, since, improved, _ = _run(_sel(mode="min"), [3, 1, 1, 2, 0.5])
    assert improved == [1, 2, 5] and best["value"] == 0.5 and since == 0


def test_nan_never_improves_and_never_becomes_the_best():
    nan = float("nan")
    best, since, improved, _ = _run(_sel(patience=2), [nan, nan, 1, nan, 2])
    assert improved == [3, 5] and best["value"] == 2
    assert _run(_sel(mode="min"), [nan])[0] is None
    best, since, _, stop = _run(_sel(patience=2), [1, nan, nan])
    assert stop == 3 and since == 2 and best["step"] == 1  # a nan validation is one without improvement


def test_floor_must_hold_for_a_validation_to_be_selected():
    sel = _sel(floor=("cider", ">=", 0.5), patience=2)
    best, since, improved, stop = _run(sel, [9, 1, 2, 8, 1], cider=[0.1, 0.5, 0.4, 0.7, float("nan")])
    assert improved == [2, 4] and best["value"] == 8 and best["metrics"]["val/cider"] == 0.7 and since == 1
    best, _, improved, _ = _run(_sel(floor=("loss", "<=", 2.0)), [1, 5, 9], loss=[3, 2, 2.5])
    assert improved == [2] and best["value"] == 5


def test_patience_counts_validations_after_the_first_best():
    # nothing counts before a first validation passed the floor: early validations below it never stop the run
    _, since, _, stop = _run(_sel(floor=("cider", ">=", 1), patience=1), [1, 2, 3], cider=[0, 0, 0])
    assert stop is None and since == 0
    best, since, improved, stop = _run(_sel(patience=3), [1, 3, 2, 3, 5, 4, 4, 4])
    assert improved == [1, 2, 5] and stop == 8 and best["step"] == 5 and since == 3
    assert _run(_sel(patience=0), [1, 1, 1, 1])[3] is None  # 0: never


def test_problem_names_the_missing_metric_and_what_was_logged():
    assert _sel().problem({"score": 1.0}, 4) is None
    assert _sel(metric="cidr").problem({"cider": 0.1, "images": 4}, 2) == (
        "train.select_best: the validation at step 2 logged no val/cidr (it logged val/cider, val/images)")
    assert _sel(floor=("clip", ">=", 1)).problem({"score": 1.0}, 3) == (
        "train.select_floor: the validation at step 3 logged no val/clip (it logged val/score)")
    assert _sel().problem({}, 1).endswith("logged no val/score (it logged no metric)")


def test_saved_best_fits_only_the_same_selection():
    best = _run(_sel(), [1, 2], cider=[0.2, 0.6])[0]
    assert _sel().fits(best) and not _sel(mode="min").fits(best) and not _sel(metric="cider").fits(best)
    assert _sel(floor=("cider", ">=", 0.5)).fits(best) and not _sel(floor=("cider", ">=", 0.7)).fits(best)


def test_loop_state_carries_the_best_and_the_patience_count():
    from dico_scale.loop import LoopState
    state = LoopState(epoch=1, batch_in_epoch=2, best={"metric": "val/cider", "mode": "max", "value": 0.5, "step": 4,
                                                      "metrics": {"val/cider": 0.5}}, since_best=2)
    assert LoopState.from_client_state(state.client_state(step=6)) == state
    old = LoopState.from_client_state({"epoch": 1, "batch_in_epoch": 0})  # a checkpoint from before the selection
    assert old.best is None and old.since_best == 0


def test_config_parses_the_selection():
    from dico_scale.config import ConfigError, load_config
    from dico_scale.selection import Selection
    t = load_config(XE, BLANK + ["train.val_every=5", "train.select_best=val/mean_length",
                                 "train.select_floor=val/cider >= 0.25", "train.patience=3"]).train
    assert Selection.from_config(t) == Selection("mean_length", "max", ("cider", ">=", 0.25), 3)
    t = load_config(str(REPO / "configs" / "demo" / "evaluator.yaml"),
                    ["train.val_every=5", "train.select_best=val/i2t_r1:min"]).train
    assert Selection.from_config(t) == Selection("i2t_r1", "min", None, 0)
    with pytest.raises(ConfigError, match=r"the evaluator stage's validation logs no val/cider here \(it logs "
                                          r"val/i2t_r1, val/i2t_r5, val/t2i_r1, val/t2i_r5\)"):  # before any step
        load_config(str(REPO / "configs" / "demo" / "evaluator.yaml"), ["train.val_every=5",
                                                                       "train.select_best=val/cider"])
    assert Selection.from_config(load_config(XE, BLANK).train) is None


def test_the_evaluator_score_is_selectable_where_the_stage_builds_its_evaluator(tmp_path):
    """DiCO always builds it; SCST where its reward reads it or evaluator.weights names one; XE on the weights."""
    import torch

    from dico_scale.config import ConfigError, load_config

    torch.save({"state_dict": {}}, tmp_path / "evaluator.pt")
    pick = ["train.val_every=2", "train.select_best=val/evaluator_score"]
    weights = f"evaluator.weights={tmp_path}/evaluator.pt"
    for stage, overrides in (("dico", ["dico.reward=cider"]), ("scst", []), ("xe", [weights])):
        cfg = load_config(str(REPO / "configs" / "demo" / f"{stage}.yaml"), [*BLANK, *pick, *overrides])
        assert cfg.train.select_best == "val/evaluator_score"
    with pytest.raises(ConfigError, match="the scst stage's validation logs no val/evaluator_score"):
        load_config(str(REPO / "configs" / "demo" / "scst.yaml"), [*BLANK, *pick, "scst.reward=cider"])


@pytest.mark.parametrize("overrides,message", [
    (["train.select_best=cider"], "'train.select_best': 'cider' is not val/<metric>, val/<metric>:max or "
                                  "val/<metric>:min"),
    (["train.select_best=val/cider:best"], "'train.select_best': 'val/cider:best' is not val/<metric>"),
    (["train.select_best=val/cider", "train.select_floor=val/cider>0.5"],
     "'train.select_floor': 'val/cider>0.5' is not val/<metric>>=<number> or val/<metric><=<number>"),
    (["train.select_best=val/cider", "train.select_floor=val/cider>=nan"], "'train.select_floor': 'val/cider>=nan'"),
    (["train.select_best=val/cider", "train.select_floor=cider>=1"], "'train.select_floor': 'cider>=1' is not"),
    (["train.select_floor=val/cider>=0.5"], "'train.select_floor': needs train.select_best"),
    (["train.patience=3"], "'train.patience': 3 needs train.select_best (the metric whose improvement it waits for)"),
    (["train.patience=-1"], "'train.patience': -1 must be >= 0"),
    (["train.val_every=0", "train.select_best=val/cider"],
     "'train.select_best': needs train.val_every > 0 (with 0 the run validates only at the end: nothing to select "
     "from)"),
    (["train.select_best=val/cider", "data.synthetic.n_val=0"],
     "'train.select_best': needs a val split (data.val_shards, or data.synthetic.n_val > 0)"),
    # what a captioner stage's validation logs is known from its config: a metric it never logs, refused now
    (["train.select_best=val/evaluator_score"],
     "'train.select_best': 'val/evaluator_score': the xe stage's validation logs no val/evaluator_score here (it logs "
     "val/cider, val/images, val/mean_length, val/repetition, val/vocab_size; evaluator.weights adds "
     "val/evaluator_score)"),
    (["train.select_best=val/cider", "train.select_floor=val/bleu4>=0.1"],
     "'train.select_floor': 'val/bleu4>=0.1': the xe stage's validation logs no val/bleu4 here"),
])
def test_bad_selection_settings_fail_with_one_line(overrides, message):
    from dico_scale.config import ConfigError, load_config
    with pytest.raises(ConfigError) as e:
        load_config(XE, BLANK + ["train.val_every=2", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)


# --- the real loop, with a stage whose validations return scripted values ---------------------------------------------

def test_loop_selects_exports_stops_and_resumes(tmp_path):
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=400, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads((tmp_path / "result.json").read_text())
    import torch
    from mlflow.tracking import MlflowClient

    assert r["compiler"] is False  # five ZeRO engines built, and torch.compile's backend never imported (~1.5 s)
    assert r["mlflow_at_init"] is False  # nor MLflow by DeepSpeed (~1.1 s a rank), which the trackers import later

    # A: improvements at 1, 2, 5; patience 3 runs out at 8; best/ holds the weights the step-5 validation saw
    a = r["A"]
    assert (a["step"], a["stopped_early"], a["best"]["step"], a["best"]["value"]) == (8, True, 5, 5.0)
    assert a["validations"] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert ("early stop at step 8: no improvement of val/score for 3 validations (best 5 at step 5)"
            in proc.stdout)
    best = json.loads((tmp_path / "A" / "best" / "best.json").read_text())
    assert best == {"metric": "val/score", "mode": "max", "value": 5.0, "step": 5,
                    "metrics": {"val/images": 4.0, "val/score": 5.0}}
    blob = torch.load(tmp_path / "A" / "best" / "model.pt", weights_only=True)
    assert blob["step"] == 5 and blob["best"] == best and blob["stage"] == "xe"
    assert blob["mlflow_run_id"] == a["run_id"] and "config" in blob
    seen = torch.load(tmp_path / "A" / "snapshot_5.pt", weights_only=True)
    assert blob["state_dict"].keys() == seen.keys()
    assert all(torch.equal(blob["state_dict"][k], seen[k]) for k in seen)
    final = torch.load(tmp_path / "A" / "snapshot_8.pt", weights_only=True)
    assert not all(torch.equal(final[k], seen[k]) for k in seen)  # the weights moved after the best
    assert (tmp_path / "A" / "checkpoints" / "step_00000008" / "complete").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    history = sorted((m.step, m.value) for m in client.get_metric_history(a["run_id"], "best/score"))
    assert history == [(1, 1.0), (2, 3.0), (5, 5.0)]
    assert sorted(m.value for m in client.get_metric_history(a["run_id"], "best/step")) == [1, 2, 5]
    tags = client.get_run(a["run_id"]).data.tags
    assert (tags["best_step"], tags["best_metric"], tags["stopped_early_at"]) == ("5", "val/score", "8")

    # B1 ends at step 4 (best 3 at step 2, 2 validations without improvement); B2 resumes it: its first validation
    # (2, below the saved best) is the third without improvement: patience 3 stops it at step 5
    b1, b2, b3, b4 = r["B1"], r["B2"], r["B3"], r["B4"]
    assert (b1["step"], b1["stopped_early"], b1["best"]["step"]) == (4, False, 2)
    assert (b2["step"], b2["stopped_early"], b2["best"]["step"], b2["best"]["value"]) == (5, True, 2, 3.0)
    assert b2["validations"] == [5] and b2["run_id"] == b1["run_id"]
    assert json.loads((tmp_path / "B" / "best" / "best.json").read_text())["step"] == 2
    # B3 resumes the early-stopped run: nothing left to do
    assert (b3["step"], b3["stopped_early"], b3["validations"]) == (5, True, [])
    assert ("early stop at step 5: no improvement of val/score for 3 validations (best 3 at step 2) "
            "(before this resume)") in proc.stdout
    # B4 resumes the step-1 checkpoint (best 1 at step 1) while best/ holds step 2: the selection starts over
    assert "does not hold the resumed checkpoint's best (step 1); the selection starts over at step 1" in proc.stdout
    assert (b4["step"], b4["best"]["step"], b4["best"]["value"]) == (2, 2, 0.5)
    assert json.loads((tmp_path / "B" / "best" / "best.json").read_text())["value"] == 0.5

    # a metric the validation does not log: one line, on every rank at the first validation
    assert r["D"] == "train.select_best: the validation at step 1 logged no val/nope (it logged val/images, val/score)"
    # (a captioner stage's config says what its validation logs: test_bad_selection_settings_fail_with_one_line)

    # a diverged run through train.py's main: train.max_nonfinite_steps ends it with one line, FAILED (exit and run)
    assert r["main"] == 1
    lines = [l for l in re.split(r"[\r\n]", proc.stderr) if l.startswith("dico_scale:")]
    assert lines == ["dico_scale: training error: 2 non-finite losses in a row at step 1 (train.max_nonfinite_steps="
                     "2): lower optim.lr, or check the rewards and the data"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id],
                                filter_string=f"params.`train.output_dir` = '{tmp_path}/main'")
    assert run.info.status == "FAILED"


# --- real training runs ----------------------------------------------------------------------------------------------

TINY = ["train.micro_batch_size=4", "data.synthetic.n_train=40", "data.synthetic.n_val=4", "data.synthetic.n_test=2",
        "data.synthetic.samples_per_shard=20", "data.samples_per_epoch=16", "train.val_max_images=4",
        "generation.max_len=4", "generation.candidates=2", "train.log_every=1", "optim.lr=1e-2",
        "optim.warmup_steps=0", "train.max_steps=8", "train.val_every=2"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("best-data")


def _train(tmp_path, data_root, *overrides):
    cmd = [sys.executable, "dico_scale/train.py", "--config", XE, *BLANK, f"data.root={data_root}/data",
           f"tracking.uri={mlflow_uri(tmp_path / 'mlflow.db')}", f"train.output_dir={tmp_path}/run", *TINY, *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)


def test_training_keeps_the_best_validation_checkpoint(tmp_path, data_root):
    import torch
    from mlflow.tracking import MlflowClient

    from dico_scale.models.clip import create_clip

    torch.manual_seed(0)  # a random evaluator: its score moves with the captions, CIDEr of 8 steps hardly does
    torch.save({"state_dict": create_clip("dico-tiny", "")[0].state_dict()}, tmp_path / "evaluator.pt")
    proc = _train(tmp_path, data_root, f"evaluator.weights={tmp_path}/evaluator.pt",
                  "train.select_best=val/evaluator_score")
    assert proc.returncode == 0, proc.stderr[-4000:]
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id])[0].info.run_id
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/evaluator_score"))
    assert [s for s, _ in history] == [2, 4, 6, 8]
    top = max(v for _, v in history)
    assert best["step"] == next(s for s, v in history if v == top)  # the first of the highest: a tie is no gain
    assert best["metric"] == "val/evaluator_score" and math.isclose(best["value"], top, rel_tol=1e-6)
    assert set(best["metrics"]) == {"val/cider", "val/evaluator_score", "val/images", "val/mean_length",
                                    "val/repetition", "val/vocab_size"}
    blob = torch.load(tmp_path / "run" / "best" / "model.pt", weights_only=True)
    assert blob["step"] == best["step"] and blob["best"] == best and blob["mlflow_run_id"] == run_id
    last = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert last["step"] == 8 and "best" not in last and blob["state_dict"].keys() == last["state_dict"].keys()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["best_step"] == str(best["step"])
    assert run.data.metrics["best/step"] == best["step"]
    assert math.isclose(run.data.metrics["best/evaluator_score"], top, rel_tol=1e-6)
    assert "stopped_early_at" not in run.data.tags


def test_patience_stops_the_run_early_with_exit_0(tmp_path, data_root):
    # val/images is 4 at every validation: the second one (step 4) is the first without improvement
    proc = _train(tmp_path, data_root, "train.select_best=val/images:max", "train.patience=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"^early stop at step 4: no improvement of val/images for 1 validations \(best 4 at step 2\)$",
                     proc.stdout, re.M), proc.stdout[-3000:]
    assert "done: stage=xe step=4 " in proc.stdout
    out = tmp_path / "run"
    assert (out / "checkpoints" / "step_00000004" / "complete").is_file()
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 2
    import torch
    assert torch.load(out / "model.pt", weights_only=True)["step"] == 4


def test_a_run_that_selects_no_validation_says_so(tmp_path, data_root):
    """A floor that no validation passed (val/images is 4): exit 0, no best/, and a line saying why, not a plain done."""
    proc = _train(tmp_path, data_root, "train.select_best=val/images:max", "train.select_floor=val/images>=5",
                  "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ("dico_scale: warning: train.select_best=val/images:max selected no validation (none passed "
            "train.select_floor=val/images>=5 or its val/images was never a number): there is no best/model.pt, and "
            "model.pt holds the last step") in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert not (tmp_path / "run" / "best").exists() and (tmp_path / "run" / "model.pt").is_file()


# --- this file as a script: the real loop (one CPU rank, real DeepSpeed engines) with a scripted stage ---------------

def _script(out: str) -> None:
    import torch

    from dico_scale.checkpoint import load_checkpoint
    from dico_scale.config import load_config
    from dico_scale.engine import build_engine, init_distributed, setup_environment
    from dico_scale.loop import LoopState, train_loop
    from dico_scale.selection import SelectionError
    from dico_scale.stages.base import Stage, StepOutput
    from dico_scale.tracking import Tracker

    class ScriptedStage(Stage):
        name = "best-check"

        def __init__(self, values, snapshots=None):
            self.module, self.values, self.snapshots = torch.nn.Linear(4, 1), list(values), snapshots
            self.validations = []

        def step(self, engine, batch):
            return StepOutput(engine(torch.ones(4, 4)).sub(1).pow(2).mean(), {}, images=4, tokens=0)

        def validate(self, engine, loader):
            step = engine.global_steps
            self.validations.append(step)
            if self.snapshots:
                torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()},
                           f"{self.snapshots}/snapshot_{step}.pt")
            return {"score": self.values.pop(0), "images": 4.0}, {}

    def segment(name, values, steps, select="val/score", resume=None, snapshots=False):
        cfg = load_config(XE, [f"train.output_dir={out}/{name}", f"tracking.uri={mlflow_uri(f'{out}/mlflow.db')}",
                               f"train.max_steps={steps}", "train.val_every=1", "train.save_every=1",
                               "train.keep_checkpoints=20", "train.micro_batch_size=4", "optim.lr=0.05",
                               "optim.warmup_steps=0", "train.select_best=val/cider", "train.patience=3", *BLANK])
        cfg.train.select_best = select  # the scripted stage's metric: the xe config's check knows xe's alone
        os.makedirs(cfg.train.output_dir, exist_ok=True)
        torch.manual_seed(0)
        stage = ScriptedStage(values, f"{out}/{name}" if snapshots else None)
        engine = build_engine(cfg, stage.module, on_gpu=False)
        stage.setup(engine)
        state = LoopState()
        if resume:
            state = LoopState.from_client_state(load_checkpoint(engine, f"{out}/{name}/checkpoints/{resume}"))
        tracker = Tracker(cfg, 0, state.mlflow_run_id)
        state.mlflow_run_id = tracker.run_id
        summary = train_loop(cfg, stage, engine, tracker, lambda epoch, start: [{}] * 4, lambda: [], state)
        tracker.finish()
        return {"step": summary["step"], "stopped_early": summary["stopped_early"], "best": summary["best"],
                "validations": stage.validations, "run_id": tracker.run_id}

    setup_environment(load_config(XE, BLANK))
    init_distributed()
    # DeepSpeed's autotuner imported without MLflow (engine.py): not imported yet, and the segments' trackers log
    mlflow_at_init = "mlflow" in sys.modules or sys.modules["deepspeed.autotuning.autotuner"].has_mlflow
    r = {"A": segment("A", [1, 3, 2, 3, 5, 4, 4, 4, 9], 20, snapshots=True),
         "B1": segment("B", [1, 3, 2, 2.5], 4)}
    r["B2"] = segment("B", [2, 9], 20, resume="step_00000004")
    r["B3"] = segment("B", [9], 20, resume="step_00000005")
    r["B4"] = segment("B", [0.5], 2, resume="step_00000001")
    try:
        segment("D", [1], 3, "val/nope")
    except SelectionError as e:
        r["D"] = str(e)
    r["compiler"] = "torch._inductor.compile_fx" in sys.modules  # DeepSpeed's Muon imported uncompiled (engine.py)
    r["mlflow_at_init"] = mlflow_at_init
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(r, f)
    from dico_scale.train import main  # last: its shutdown ends the process group
    # a real XE run through train.py's main whose learning rate sends its weights to inf
    r["main"] = main(["--config", XE, *BLANK, f"data.root={out}/data", f"tracking.uri={mlflow_uri(f'{out}/mlflow.db')}",
                      f"train.output_dir={out}/main", *TINY, "optim.lr=1e30", "train.max_nonfinite_steps=2"])
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(r, f)


if __name__ == "__main__":
    _script(sys.argv[1])
