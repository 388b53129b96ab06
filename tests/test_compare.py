"""`python -m dico_scale.compare` at a tiny size: DiCO and SCST from the session's XE captioner with 2 CPU ranks each,
as child runs of one MLflow run, the figure, the held-out table; and its bad-input errors (exit 2, one line)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, check_ok, mlflow_uri

from dico_scale import compare

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
def test_compare_runs_dico_and_scst_as_child_runs_and_draws_the_figure(chain, tmp_path):
    chain_dir, weights = chain
    db = tmp_path / "mlflow.db"
    from helpers import demo_overrides
    training = [o for o in demo_overrides(chain_dir) if not o.startswith("tracking.uri")]
    proc = subprocess.run([sys.executable, "-m", "dico_scale.compare", "--config", str(_config(tmp_path, chain_dir)),
                           "--ranks", "2", f"tracking.uri={mlflow_uri(db)}", *training, *weights, *TINY],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    check_ok(proc)
    assert "selected checkpoints on 12 held-out test images" in proc.stdout

    import matplotlib.image
    png = matplotlib.image.imread(tmp_path / "figure.png")
    assert png.ndim == 3 and png.shape[0] > 500 and png.shape[1] > 800

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("dico-demo").experiment_id
    (parent,) = client.search_runs([exp], filter_string="tags.stage = 'compare'")
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["dico", "scst"]
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    for child in children:
        assert child.data.params["train.stage"] == child.info.run_name
        assert child.data.params["train.init_from"] == f"{chain_dir}/xe/model.pt"
        assert child.data.params["train.max_steps"] == "2"
        assert child.data.params[f"{child.info.run_name}.reward"] == "evaluator"  # the same reward
        for key in ("val/evaluator_score", "val/cider", "val/mean_length", "val/repetition", "val/vocab_size"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [1, 2], key
        assert child.data.tags["best_step"] in ("1", "2")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"figure.png", "summary.json"} <= artifacts
    for label in ("xe", "dico", "scst"):
        for metric in ("evaluator_score", "cider", "repetition", "vocab_size"):
            assert f"test/{label}/{metric}" in parent.data.metrics, (label, metric)

    summary = json.loads((tmp_path / "compare" / "summary.json").read_text())
    assert list(summary["test"]) == ["XE", "DiCO", "SCST"]
    keys = [[e["key"] for e in r["examples"]] for r in summary["test"].values()]
    assert keys[0] == keys[1] == keys[2] and len(keys[0]) == 2  # the table shows the same images for every model
    for label in ("DiCO", "SCST"):
        run = summary["runs"][label]
        assert summary["selected"][label].endswith(os.path.join("best", "model.pt"))
        assert run["best_step"] in (1, 2) and [s for s, _ in run["curves"]["cider"]] == [1, 2]
    assert summary["start"]["images"] == 12  # XE at step 0: the whole val split, as the runs validate it


@pytest.mark.parametrize("args,message", [
    (["xe_checkpoint=/nonexistent/model.pt"], "XE checkpoint '/nonexistent/model.pt' not found"),
    (["steps=0"], "bad value for compare key 'steps': 0 must be >= 1"),
    (["reward=bleu"], "bad value for compare key 'reward': 'bleu': unknown reward 'bleu'"),
    (["select_best=cider"], "bad value for compare key 'select_best'"),
    (["figure=out.svg"], "bad value for compare key 'figure'"),
    (["stepz=3"], "unknown config key 'stepz'"),
    (["train.lrr=1"], "run dico: unknown config key 'train.lrr'"),
    (["--ranks", "0"], "--ranks 0 must be >= 1"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    xe = tmp_path / "xe.pt"
    xe.write_bytes(b"")  # exists: the runs' configs are checked (train.init_from must exist)
    cfg = ["evaluator.weights=", "captioner.image_encoder_weights="]
    assert compare.main(["--config", str(_config(tmp_path, tmp_path, xe_checkpoint=str(xe))), *args, *cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dico_scale.compare: config error: ") and message in err[0], err
