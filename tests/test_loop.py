"""The training loop's non-finite guard, with a real single-rank DeepSpeed engine and a real MLflow store."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent

# The three scenarios of the non-finite guard, each in a folder of its own (MLflow store, result.json), in one process
NONFINITE = {"skipped": ["2,3,7"], "stop": ["from:4"],
             "accum": ["2", "optim.grad_accum=2", "optim.warmup_steps=3", "optim.lr=0.3", "optim.schedule=constant"]}
STOPS, MAX_STEPS = (8, 12), 15


@pytest.fixture(scope="module")
def nonfinite(tmp_path_factory) -> dict:
    """One nonfinite_check.py process runs every scenario: {scenario: (its folder, its result.json)}."""
    tmp = tmp_path_factory.mktemp("nonfinite")
    args = []
    for name, (bad, *overrides) in NONFINITE.items():
        args += ["--", str(tmp / name), bad, *overrides]
    proc = subprocess.run([sys.executable, "tests/distributed/nonfinite_check.py", *args[1:]], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: (tmp / name, json.loads((tmp / name / "result.json").read_text())) for name in NONFINITE}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_shards) -> dict:
    """One resume_check.py process: A and B for each stop point, C once (it does not depend on the stop)."""
    tmp = tmp_path_factory.mktemp("resume")
    proc = subprocess.run([sys.executable, "tests/distributed/resume_check.py", str(tmp), tiny_shards["train"],
                           str(MAX_STEPS), *map(str, STOPS)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "result.json").read_text())


def test_nonfinite_losses_are_skipped_counted_and_logged(nonfinite):
    folder, result = nonfinite["skipped"]
    assert result["step"] == 6 and result["skipped"] == 3  # 9 calls: 6 good steps + 3 skipped
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    history = client.get_metric_history(result["run_id"], "train/nonfinite_skipped")
    assert sorted(m.value for m in history) == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(result["run_id"], "train/loss")) == [1, 2, 3, 4, 5, 6]


def test_too_many_nonfinite_losses_in_a_row_stop_the_run(nonfinite):
    _, result = nonfinite["stop"]
    assert result["step"] == 3
    assert result["error"].startswith("3 non-finite losses in a row at step 3")
    assert "\n" not in result["error"]


def test_gradient_accumulation_and_warmup(nonfinite):
    folder, result = nonfinite["accum"]
    assert result["step"] == 6 and result["calls"] == 13  # 2 micro-steps per optimizer step + 1 skipped
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    history = sorted(client.get_metric_history(result["run_id"], "train/lr"), key=lambda m: m.step)
    lrs = [m.value for m in history]
    assert lrs[0] < lrs[1] < lrs[2] == lrs[3] == lrs[5] and abs(lrs[2] - 0.3) < 1e-9


@pytest.mark.parametrize("stop,position", [(8, (1, 2)), (12, (1, 6))])  # 12: the epoch's end, the next not begun
def test_resume_continues_the_saved_epoch(resumed, stop, position):
    """6 batches per epoch. A stops after `stop` steps, B resumes it to 15, C runs to 15 uninterrupted."""
    assert stop in STOPS
    a, b, c = resumed[str(stop)]["A"], resumed[str(stop)]["B"], resumed["C"]
    assert (a["epoch"], a["batch_in_epoch"], a["samples_seen"]) == (*position, 4 * stop)
    epoch, start, keys = b["loaders"][0]
    assert (epoch, start) == (a["epoch"], a["batch_in_epoch"])
    assert len(keys) == 6 - start  # exactly the rest of the epoch
    if keys:  # ... freshly shuffled, not the batches the uninterrupted run read there
        assert keys != c["loaders"][epoch][2][start:]
    assert [(e, s, len(k)) for e, s, k in b["loaders"][1:]] == [(2, 0, 3)]
    for key in ("step", "epoch", "batch_in_epoch", "samples_seen"):
        assert b[key] == c[key], key
    assert (c["epoch"], c["batch_in_epoch"], c["samples_seen"]) == (2, 3, 60)
    assert b["data"]["read"] > a["data"]["read"] > 0  # the data totals were restored and kept counting


def test_checkpoint_without_data_position_resumes_at_the_next_epoch():
    from dico_scale.loop import LoopState

    old = LoopState.from_client_state({"epoch": 3, "samples_seen": 96, "mlflow_run_id": "r"})
    assert (old.epoch, old.batch_in_epoch, old.samples_seen, old.mlflow_run_id) == (4, 0, 96, "r")
    state = LoopState(epoch=3, batch_in_epoch=5, samples_seen=96)
    state.data.update(read=10, skipped=1, bad_json=1)
    back = LoopState.from_client_state(state.client_state(step=12))
    assert back == state and back.data == {"read": 10, "skipped": 1, "bad_json": 1}
