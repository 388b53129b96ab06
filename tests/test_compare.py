"""`python -m dico_scale.compare` at a tiny size: DiCO and SCST from the session's XE captioner, per seed, as child
runs of one MLflow run, the figure, the held-out table; and its bad-input errors (exit 2, one line)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, check_ok, mlflow_uri

from dico_scale import compare, compare_results

TINY = ["train.micro_batch_size=2", "generation.candidates=2", "scst.candidates=2", "generation.max_len=6",
        "optim.lr=1e-3", "optim.warmup_steps=0"]


def _config(tmp: Path, chain_dir: Path, **keys) -> Path:
    """A compare YAML extending the demo's, pointed at the session's chain."""
    values = {"xe_checkpoint": f"{chain_dir}/xe/model.pt", "output_dir": f"{tmp}/compare", "steps": 2,
              "val_every": 1, "examples": 2, "scst_cider": False, "figure": f"{tmp}/figure.png", **keys}
    path = tmp / "compare.yaml"
    path.write_text(f"extends: {REPO}/configs/demo/compare.yaml\n" +
                    "".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return path


@pytest.mark.distributed
def test_compare_runs_dico_and_scst_per_seed_as_child_runs_and_draws_the_figure(chain, tmp_path):
    chain_dir, weights = chain
    db = tmp_path / "mlflow.db"
    from helpers import demo_overrides
    training = [o for o in demo_overrides(chain_dir) if not o.startswith("tracking.uri")]
    # one rank a run (four runs): compare starts them as the demo starts its 2-rank stages (launch.train_stage)
    proc = subprocess.run([sys.executable, "-m", "dico_scale.compare", "--config",
                           str(_config(tmp_path, chain_dir, seeds=[0, 1])), "--ranks", "1",
                           f"tracking.uri={mlflow_uri(db)}", *training, *weights, *TINY],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    check_ok(proc)
    assert "selected checkpoints on 12 held-out test images, mean ± std over 2 seeds" in proc.stdout
    assert "DiCO - SCST, paired by seed: evaluator_score " in proc.stdout

    import matplotlib.image
    png = matplotlib.image.imread(tmp_path / "figure.png")
    assert png.ndim == 3 and png.shape[0] > 500 and png.shape[1] > 800

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("dico-demo").experiment_id
    (parent,) = client.search_runs([exp], filter_string="tags.stage = 'compare'")
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["dico_seed0", "dico_seed1", "scst_seed0", "scst_seed1"]
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    for child in children:
        method, seed = child.info.run_name.split("_seed")
        assert child.data.params["train.stage"] == method and child.data.params["train.seed"] == seed
        assert child.data.params["train.init_from"] == f"{chain_dir}/xe/model.pt"
        assert child.data.params["train.max_steps"] == "2"
        assert child.data.params[f"{method}.reward"] == "evaluator"  # the same reward
        for key in ("val/evaluator_score", "val/cider", "val/mean_length", "val/repetition", "val/vocab_size"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [1, 2], key
        assert child.data.tags["best_step"] in ("1", "2")
    # the seed changes the run (data order): the two seeds' last losses differ (DiCO's first is log 2 at any data)
    losses = {r.info.run_name: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id,
                                                                                          "train/loss"))[-1]
              for r in children}
    assert losses["dico_seed0"] != losses["dico_seed1"] and losses["scst_seed0"] != losses["scst_seed1"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"figure.png", "summary.json"} <= artifacts
    for label in ("xe", "dico", "scst"):
        for metric in ("evaluator_score", "cider", "repetition", "vocab_size"):
            assert f"test/{label}/{metric}" in parent.data.metrics, (label, metric)
    assert "test/dico/cider_std" in parent.data.metrics and "test/dico_minus_scst/evaluator_score" in parent.data.metrics

    summary = json.loads((tmp_path / "compare" / "summary.json").read_text())
    assert list(summary["test"]) == ["XE", "DiCO", "SCST"]
    keys = [[e["key"] for e in r["examples"]] for r in summary["test"].values()]
    assert keys[0] == keys[1] == keys[2] and len(keys[0]) == 2  # the table shows the same images for every model
    for label in ("DiCO", "SCST"):
        test = summary["test"][label]
        assert sorted(test["seeds"]) == ["0", "1"]  # JSON keys
        mean = sum(s["cider"] for s in test["seeds"].values()) / 2
        assert abs(test["metrics"]["cider"] - mean) < 1e-9
        assert [run["seed"] for run in summary["runs"][label]] == [0, 1]
        for run in summary["runs"][label]:
            assert run["best_step"] in (1, 2) and [s for s, _ in run["curves"]["cider"]] == [1, 2]
        for seed in ("0", "1"):
            name = f"{label.lower()}_seed{seed}"
            assert summary["selected"][name].endswith(os.path.join(name, "best", "model.pt"))
    assert summary["dico_minus"]["SCST"]["cider"]["seeds"] == 2
    assert summary["start"]["images"] == 12  # XE at step 0: the whole val split, as the runs validate it


@pytest.mark.parametrize("args,message", [
    (["xe_checkpoint=/nonexistent/model.pt"], "XE checkpoint '/nonexistent/model.pt' not found"),
    (["steps=0"], "bad value for compare key 'steps': 0 must be >= 1"),
    (["reward=bleu"], "bad value for compare key 'reward': 'bleu': unknown reward 'bleu'"),
    (["select_best=cider"], "bad value for compare key 'select_best'"),
    (["figure=out.svg"], "bad value for compare key 'figure'"),
    (["figure=/proc/none/figure.png"], "bad value for compare key 'figure': '/proc/none/figure.png' cannot be written"),
    (["output_dir=/proc/none"], "bad value for compare key 'output_dir': '/proc/none' cannot be created or written"),
    (["stepz=3"], "unknown config key 'stepz'"),
    (["train.lrr=1"], "run dico: unknown config key 'train.lrr'"),
    (["--ranks", "0"], "--ranks 0 must be >= 1"),
    (["seeds=[]"], "bad value for compare key 'seeds': [] must be distinct integers >= 0"),
    (["seeds=[0,-1]"], "bad value for compare key 'seeds': [0, -1]"),
    (["seeds=[2,2]"], "bad value for compare key 'seeds': [2, 2]"),
    (["seeds=[0,x]"], "seeds"),
    (["train.seed=3"], "'train.seed=3': compare sets each run's train.seed from its key 'seeds'"),
    # the keys compare sets per run: an override would make DiCO and SCST unequal (or share one folder)
    (["dico.reward=cider"], "'dico.reward=cider': compare sets each run's dico.reward from its key 'reward', the "
                            "same for DiCO and SCST"),
    (["train.max_steps=3"], "'train.max_steps=3': compare sets each run's train.max_steps from its key 'steps'"),
    (["train.output_dir=/tmp/x"], "compare sets each run's train.output_dir from its key 'output_dir'"),
    (["overrides=[train.resume=auto]"], "compare sets each run's train.resume itself (--resume continues"),
    (["train.select_best=val/foo"], "compare sets each run's train.select_best from its key 'select_best'"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    xe = tmp_path / "xe.pt"
    xe.write_bytes(b"")  # exists: the runs' configs are checked (train.init_from must exist)
    cfg = ["evaluator.weights=", "captioner.image_encoder_weights="]
    assert compare.main(["--config", str(_config(tmp_path, tmp_path, xe_checkpoint=str(xe))), *args, *cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dico_scale.compare: config error: ") and message in err[0], err


def test_a_transformers_folder_as_start_is_read_by_the_row_of_its_architecture(tmp_path, capsys):
    vlm, lm, empty = (tmp_path / name for name in ("vlm", "lm", "empty"))
    for folder, arch in ((vlm, "Qwen2VLForConditionalGeneration"), (lm, "GPT2LMHeadModel"), (empty, None)):
        folder.mkdir()
        if arch:
            (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    dico = compare.plan(compare.CompareConfig(xe_checkpoint=str(vlm)), [])[0]
    assert dico["overrides"][:3] == ["captioner.model=hf_vlm", f"captioner.hf_path={vlm}", "train.init_from="]
    assert compare.main(["--config", str(_config(tmp_path, tmp_path, xe_checkpoint=str(vlm))),
                         f"captioner.hf_path={lm}"]) == 2  # the folder names the runs' captioner, not an override
    assert capsys.readouterr().err.strip() == (f"dico_scale.compare: config error: 'captioner.hf_path={lm}': every run "
                                               f"starts from the transformers folder xe_checkpoint={vlm} (its "
                                               "captioner row and folder)")
    for folder, message in ((lm, f"'{lm}': architecture GPT2LMHeadModel is not a captioner dico_scale reads ("),
                            (empty, f"'{empty}' is a folder without config.json (neither a model.pt export nor a "
                                    "transformers folder)")):
        assert compare.main(["--config", str(_config(tmp_path, tmp_path, xe_checkpoint=str(folder)))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dico_scale.compare: config error: bad value for compare key "
                                                   "'xe_checkpoint': ") and message in err[0], err


def test_missing_splits_stop_the_compare_before_anything_trains(tmp_path, tiny_shards, capsys):
    xe = tmp_path / "xe.pt"
    xe.write_bytes(b"")
    shards = ["data.synthetic.enabled=false", f"data.train_shards={tiny_shards['train']}",
              f"data.val_shards={tiny_shards['val']}"]
    for data, message in (
            (shards + ["data.test_shards="], "run dico: data.test_shards is empty: compare trains on train, draws its "
                                             "curves on val and its table on test"),
            (shards + ["data.test_shards=/nowhere/test-{0..1}.tar"],
             "run dico: bad value for config key 'data.test_shards': no shard of '/nowhere/test-{0..1}.tar' exists")):
        assert compare.main(["--config", str(_config(tmp_path, tmp_path, xe_checkpoint=str(xe))), *data,
                             "evaluator.weights=", "captioner.image_encoder_weights="]) == 2
        assert capsys.readouterr().err.strip() == f"dico_scale.compare: config error: {message}"
        assert not (tmp_path / "compare" / "dico").exists()


def test_ranks_are_cpu_processes_or_the_gpus_the_runs_train_on(tmp_path, capsys):
    import torch

    from dico_scale.config import load_config

    cpu = load_config("configs/demo/dico.yaml", ["evaluator.weights=", "captioner.image_encoder_weights=",
                                                 "train.init_from="])
    assert (compare.run_ranks(None, cpu), compare.run_ranks(3, cpu)) == (2, 3)
    if torch.cuda.is_available():
        return
    xe = tmp_path / "xe.pt"
    xe.write_bytes(b"")
    assert compare.main(["--config", str(_config(tmp_path, tmp_path, xe_checkpoint=str(xe))), "train.device=cuda",
                         "evaluator.weights=", "captioner.image_encoder_weights="]) == 2
    assert capsys.readouterr().err.strip() == ("dico_scale.compare: config error: train.device=cuda, but torch sees no "
                                               "CUDA device here (train.device=auto uses one when there is one)")
    assert not (tmp_path / "compare" / "dico").exists()


def test_the_table_takes_the_selected_checkpoint_or_says_why_not(tmp_path, capsys):
    """best/model.pt; a run that selected nothing: its final model.pt, in a line; a best/ whose weights are gone
    (a --resume after they were removed): one line, never the final model under the selected heading."""
    from dico_scale.compare_results import selected_model

    run = tmp_path / "scst"
    (run / "best").mkdir(parents=True)
    assert selected_model(str(run)) == f"{run}/model.pt"
    assert capsys.readouterr().out.strip() == (f"{run}: no validation was selected (no {run}/best/model.pt): the table "
                                               "takes its final model.pt")
    (run / "best" / "best.json").write_text('{"step": 1}')
    with pytest.raises(compare.ConfigError) as e:
        selected_model(str(run))
    assert str(e.value) == (f"{run}/best/best.json names the run's selected checkpoint, but {run}/best/model.pt is "
                            "missing: train the compare again (without --resume)")
    (run / "best" / "model.pt").write_bytes(b"")
    assert selected_model(str(run)) == f"{run}/best/model.pt"


def test_a_run_that_refuses_its_input_stops_the_compare_with_its_code_and_its_line(capfd):
    """The trainer's one line, then compare's: no torchrun failure banner between them, exit 2 (not 1)."""
    from dico_scale.launch import train_stage

    with pytest.raises(SystemExit) as e:
        train_stage("xe", 1, ["train.lrr=1"], prog="dico_scale.compare", name="dico")
    assert e.value.code == 2
    err = [line for line in capfd.readouterr().err.strip().splitlines() if line.startswith("dico_scale")]
    assert err[-2:] == ["dico_scale: config error: unknown config key 'train.lrr' (override train.lrr=1)",
                        "dico_scale.compare: stage dico stopped with exit code 2 (its error is above)"], err


def test_plan_runs_every_method_once_per_seed_seed_by_seed():
    one = compare.plan(compare.CompareConfig(output_dir="out"), ["optim.lr=1", "scst.candidates=2", "dico.beta=0.1"])
    assert [r["name"] for r in one] == ["dico", "scst", "scst_cider"]
    assert "train.seed=0" in one[0]["overrides"] and one[0]["overrides"][-2:] == ["optim.lr=1", "dico.beta=0.1"]
    assert one[1]["overrides"][-2:] == ["optim.lr=1", "scst.candidates=2"]  # each run its own stage's keys
    runs = compare.plan(compare.CompareConfig(output_dir="out", seeds=[3, 0], scst_cider=False), [])
    assert [(r["name"], r["method"], r["seed"]) for r in runs] == [
        ("dico_seed3", "dico", 3), ("scst_seed3", "scst", 3), ("dico_seed0", "dico", 0), ("scst_seed0", "scst", 0)]
    for r in runs:
        assert f"train.seed={r['seed']}" in r["overrides"]
        assert f"train.output_dir={os.path.join('out', r['name'])}" in r["overrides"]
        assert f"tracking.run_name={r['name']}" in r["overrides"]


def _session(p) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:  # gone meanwhile
        return None


def _metrics(score, cider, length=10.0):
    return {"evaluator_score": score, "cider": cider, "mean_length": length, "repetition": 0.5, "vocab_size": 40.0,
            "images": 12.0}


def test_several_seeds_give_mean_std_and_differences_paired_by_seed(tmp_path, capsys):
    runs = compare.plan(compare.CompareConfig(seeds=[0, 1, 2], scst_cider=False), [])
    dico, scst = {0: (1.7, 1.3), 1: (1.8, 1.2), 2: (1.6, 1.5)}, {0: (1.6, 1.4), 1: (1.7, 1.4), 2: (1.65, 1.3)}
    per_run = {"XE": {"metrics": _metrics(1.5, 1.4), "examples": [{"key": "a", "refs": ["r"], "caption": "xe"}]}}
    for r in runs:
        score, cider = (dico if r["method"] == "dico" else scst)[r["seed"]]
        per_run[r["name"]] = {"metrics": _metrics(score, cider),
                              "examples": [{"key": "a", "refs": ["r"], "caption": r["name"]}]}
    test = compare_results.by_method(per_run, runs)
    assert list(test) == ["XE", "DiCO", "SCST"]
    assert test["DiCO"]["metrics"]["evaluator_score"] == pytest.approx(1.7)
    assert test["DiCO"]["std"]["evaluator_score"] == pytest.approx(0.1)  # sample standard deviation
    assert test["SCST"]["metrics"]["cider"] == pytest.approx(4.1 / 3)
    assert test["DiCO"]["examples"][0]["caption"] == "dico_seed0"  # the first seed's captions in the figure
    assert sorted(test["SCST"]["seeds"]) == [0, 1, 2] and test["XE"]["metrics"]["cider"] == 1.4
    diff = compare_results.paired(test)["SCST"]
    assert diff["evaluator_score"]["mean"] == pytest.approx((0.1 + 0.1 - 0.05) / 3)
    assert (diff["evaluator_score"]["dico_higher"], diff["cider"]["dico_higher"], diff["cider"]["seeds"]) == (2, 1, 3)

    compare_results.print_table(test, compare_results.paired(test))
    out = capsys.readouterr().out
    assert "mean ± std over 3 seeds" in out and "1.700 ± 0.100" in out
    assert "DiCO - SCST, paired by seed: evaluator_score +0.050 (DiCO higher on 2/3)" in out

    from dico_scale.figure import draw
    curves = {label: [{"seed": s, "curves": {"cider": [(1, 1.4 + s / 10), (2, 1.5)]}, "best_step": 2}
                      for s in range(3)] for label in ("DiCO", "SCST")}
    draw(str(tmp_path / "f.png"), curves, _metrics(1.5, 1.4), test, title="seeds")
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "f.png").shape[1] > 800
    from dico_scale.figure import _mean, _points
    points = [_points(run, "cider", {"cider": 1.4}) for run in curves["DiCO"]]
    assert _mean(points) == [(0, pytest.approx(1.4)), (1, pytest.approx(1.5)), (2, pytest.approx(1.5))]
    assert _mean([[(1, 1.0), (2, 2.0)], [(2, 4.0)]]) == [(2, 3.0)]  # only the steps every seed has


def _start_files(tmp: Path) -> list[str]:
    """An XE export of the demo's built-in captioner (random weights, its run config recorded) and an evaluator file:
    the training overrides of a compare that needs no chain."""
    import torch

    from dico_scale.config import load_config, to_yaml
    from dico_scale.models import build_captioner
    from dico_scale.models.clip import create_clip, register_model_configs, save_clip

    cfg = load_config("configs/demo/xe.yaml", ["evaluator.weights=", "captioner.image_encoder_weights=",
                                               "train.init_from="])
    register_model_configs(cfg.clip_model_configs)
    torch.manual_seed(0)
    torch.save({"state_dict": build_captioner(cfg).state_dict(), "config": to_yaml(cfg)}, tmp / "xe.pt")
    save_clip(create_clip(cfg.evaluator.model)[0], str(tmp / "evaluator.pt"))
    return [f"evaluator.weights={tmp}/evaluator.pt", "captioner.image_encoder_weights=", f"data.root={tmp}/data",
            "data.synthetic.n_train=16", "data.synthetic.n_val=4", "data.synthetic.n_test=4",
            "data.synthetic.samples_per_shard=8", "train.log_every=1", *TINY]


def test_an_interrupted_compare_resumes_keeping_its_finished_runs_on_its_mlflow_run(tmp_path, capsys):
    """Ctrl-C (the terminal's: to the whole process group) while SCST trains, DiCO finished: compare returns only
    once the SCST ranks have saved their checkpoint and stopped (no rank left writing), and says how to go on;
    --resume keeps DiCO, continues SCST from its checkpoint and finishes the table on the same parent run; a resume
    with other settings, or where no compare ran, is one line."""
    import signal
    import sqlite3
    import time

    import psutil
    from mlflow.tracking import MlflowClient

    training = _start_files(tmp_path) + [f"tracking.uri={mlflow_uri(tmp_path / 'mlflow.db')}"]
    cmd = [sys.executable, "-m", "dico_scale.compare", "--config",
           str(_config(tmp_path, tmp_path, xe_checkpoint=str(tmp_path / "xe.pt"), steps=3)), "--ranks", "1", *training]
    log = tmp_path / "compare.log"

    def losses() -> int:  # DiCO's 3 steps, then SCST's
        try:
            with sqlite3.connect(tmp_path / "mlflow.db") as c:
                return c.execute("select count(*) from metrics where key='train/loss'").fetchone()[0]
        except sqlite3.Error:
            return 0

    with open(log, "w") as f:  # SIGINT's default action back: pytest-xdist's workers ignore it, and so would compare
        proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while losses() < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
        left = [p for p in psutil.process_iter() if p.pid != proc.pid and _session(p) == proc.pid]
        assert not left, [p.cmdline() for p in left]  # every rank had stopped when compare returned
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if any(_session(p) == proc.pid for p in psutil.process_iter()) else None
    text = log.read_text()
    assert "dico_scale.compare: Ctrl-C: waiting for scst's ranks to save a checkpoint and stop" in text, text[-3000:]
    assert "dico_scale.compare: scst stopped; the same command with --resume continues the compare" in text
    # the rank's own line gives compare's advice: train.resume is compare's to set (refused as an override)
    assert re.search(r"preempted: checkpoint saved at step \d; the same command with --resume continues the compare",
                     text), text[-3000:]
    assert list((tmp_path / "compare" / "scst" / "checkpoints").glob("step_*/complete"))
    assert (tmp_path / "compare" / "dico" / "model.pt").exists()
    assert not (tmp_path / "compare" / "summary.json").exists()
    state = json.loads((tmp_path / "compare" / "compare.json").read_text())

    assert compare.main(cmd[3:] + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert f"=== dico: finished in the earlier compare ({tmp_path}/compare/dico/model.pt)" in out
    assert "selected checkpoints on 4 held-out test images" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and "test/scst/cider" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((r.info.run_name, r.info.status) for r in children) == [("dico", "FINISHED"), ("scst", "FINISHED")]
    for run in children:  # each step trained once: SCST went on from its checkpoint on its own MLflow run
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]

    for args, message in ((["steps=2"], "ran with other settings (steps 3 -> 2); resume it with them, or start over "
                                        "without --resume"),
                          ([f"output_dir={tmp_path}/elsewhere"], f"no compare ran in '{tmp_path}/elsewhere' "
                                                                 f"({tmp_path}/elsewhere/compare.json is missing)")):
        assert compare.main(cmd[3:] + ["--resume", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dico_scale.compare: config error: --resume: ") and err.endswith(message), err
    (tmp_path / "compare" / "compare.json").write_text('{"parent_run_id": "x", "config": [1], "training": []}')
    assert compare.main(cmd[3:] + ["--resume"]) == 2
    assert capsys.readouterr().err.strip().endswith("compare.json is not a compare's record (parent_run_id, config, "
                                                    "training)")
