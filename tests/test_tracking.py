"""A tracking server that dies, comes back and hangs never holds up training, and its data is not lost: a real
`mlflow server` and a real 1-process run, ended by a real Ctrl-C (the first SIGINT is a preemption)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port, mlflow_uri, wait_for, xe_args
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
# A hung request gives up after 60 s (longer than the hung phase lasts): a tracker on the training path would hold
# a step that long.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
# The server without MLflow 3's job runner: its 8 consumer processes cost seconds of CPU at every start, and no job
# is ever submitted here.
SERVER_ENV = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@pytest.fixture
def start_server(tmp_path):
    """start(port): `mlflow server` on a sqlite store in tmp_path (kept across restarts), once it answers /health.
    Every server started is killed at the end, also when the test fails."""
    procs = []

    def start(port: int) -> subprocess.Popen:
        log = open(tmp_path / "server.log", "a")
        procs.append(subprocess.Popen(["mlflow", "server", "--backend-store-uri", mlflow_uri(tmp_path / "server.db"),
                                       "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                                       "--port", str(port), "--workers", "1"],
                                      start_new_session=True, stdout=log, stderr=subprocess.STDOUT, env=SERVER_ENV))
        wait_for(lambda: _healthy(port), 120, "mlflow server to answer")
        return procs[-1]
    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _step(log: Path) -> int:
    """The step the progress bar shows last."""
    found = re.findall(r"(\d+)/100000 \[", log.read_text(errors="replace"))
    return int(found[-1]) if found else 0


def test_a_dead_then_hung_tracking_server_costs_no_step_and_no_metric(tmp_path, start_server):
    port, out, log = free_port(), tmp_path / "xe", tmp_path / "run.log"
    server = start_server(port)
    args = xe_args(tmp_path, out) + [f"tracking.uri=http://127.0.0.1:{port}", "tracking.retry_every_s=1",
                                     "tracking.finish_wait_s=2"]
    with open(log, "w") as f:
        run = subprocess.Popen([sys.executable, "dico_scale/train.py", *args], cwd=REPO, env=ENV,
                               start_new_session=True, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _step(log) >= 3, 240, "3 training steps")
        os.killpg(server.pid, signal.SIGKILL)  # the server dies...
        server.wait()
        killed_at = _step(log)
        server = start_server(port)  # ... and comes back (seconds later): the run sends what it kept
        wait_for(lambda: "is back" in log.read_text(), 60, "the tracker to be back")
        assert _step(log) > killed_at, "no step while the server was down"

        os.killpg(server.pid, signal.SIGSTOP)  # a hung server: each request would wait 60 s
        hung_at, start = _step(log), time.time()
        wait_for(lambda: _step(log) >= hung_at + 4, 60, "4 steps while the server hangs")
        assert time.time() - start < 25, "steps waited for the hung server"
        os.kill(run.pid, signal.SIGINT)  # Ctrl-C: a checkpoint at the next step, exit 3
        start = time.time()
        assert run.wait(timeout=120) == 3, log.read_text()[-3000:]
        assert time.time() - start < 10, "the end waited for the hung server longer than tracking.finish_wait_s"
    finally:
        os.killpg(run.pid, signal.SIGKILL) if run.poll() is None else None
        os.killpg(server.pid, signal.SIGCONT)

    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    # one warning for the dead server; the hung one is still being waited for when the run ends (its records are
    # kept all the same)
    assert text.count("does not answer") == 1 and text.count("is back") == 1, text[-3000:]
    final = int(re.search(r"preempted: checkpoint saved at step (\d+); to continue, run the same command with "
                          r"train.resume=auto", text).group(1))
    assert f"python -m dico_scale.tracking sync {out}" in text
    backlog = out / "mlflow_backlog.jsonl"
    kept = [json.loads(line) for line in backlog.read_text().splitlines()]
    assert any(r["op"] == "end" and r["status"] == "KILLED" for r in kept)

    sync = subprocess.run([sys.executable, "-m", "dico_scale.tracking", "sync", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0 and f"sent {len(kept)} records" in sync.stdout, sync.stderr
    assert not backlog.exists()  # sent: a second sync has nothing to send

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id])
    assert mlrun.info.status == "KILLED"
    history = client.get_metric_history(mlrun.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, final + 1))  # every step, once, at its own step
    times = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
    assert times == sorted(times)  # the times they were logged at, not the time of the sync
    assert mlrun.data.params["train.stage"] == "xe"


def test_sync_of_a_folder_that_is_not_there_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dico_scale.tracking", "sync", str(tmp_path / "nope")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"dico_scale: tracking sync: '{tmp_path}/nope' is not a folder"


def test_the_end_waits_for_the_store_finish_wait_s_in_all_and_keeps_every_record(tmp_path):
    """The sender is stuck on a request with the queue full when the run ends. The request returns after 1 s, so
    close() can queue its stop, and the next request hangs: the end still takes finish_wait_s in all (queueing the
    stop and the join share one deadline), and what was not sent is on disk, in order."""
    import threading

    from dico_scale.backlog import Backlog
    from dico_scale.tracking import Sender

    first_answers, hang = threading.Event(), threading.Event()

    class SlowThenHungStore:  # an MLflow client: the first request answers late, the next never (a hung server)
        calls = 0

        def log_batch(self, *args, **kwargs):
            self.calls += 1
            (first_answers if self.calls == 1 else hang).wait()

    sender = Sender(SlowThenHungStore(), "http://slow", Backlog(tmp_path), queue_size=2, retry_every_s=1,
                    finish_wait_s=2.0)
    sender.start()
    records = [{"op": "batch", "run_id": "r", "metrics": [["loss", float(s), 1000 + s, s]]} for s in range(1, 4)]
    sender.put(records[0])
    wait_for(lambda: sender.in_flight is not None, 10, "the first request", every=0.01)
    for r in records[1:]:
        sender.put(r)
    assert sender.queue.full() and not Backlog(tmp_path).path.exists()
    threading.Timer(1.0, first_answers.set).start()
    start = time.time()
    sender.close()
    assert 1.9 < time.time() - start < 2.6  # a deadline each would take 1 + 2 s
    assert Backlog(tmp_path).records() == records[1:]  # the one in flight and the one queued
    hang.set()


def test_a_store_mlflow_refuses_is_one_line_or_with_required_false_no_tracking(tmp_path, capsys):
    """An unknown URI scheme fails in MLflow's client, on rank 0, after the preflight: a ConfigError naming the store
    (exit 2), not MLflow's traceback; with tracking.required=false a warning, and the run trains untracked."""
    from dico_scale.config import load_config
    from dico_scale.errors import ConfigError
    from dico_scale.tracking import Tracker

    args = xe_args(tmp_path, tmp_path / "xe") + ["tracking.uri=foo://bar"]
    cfg = load_config(str(REPO / args[args.index("--config") + 1]), [a for a in args if "=" in a])
    with pytest.raises(ConfigError, match=r"^tracking store 'foo://bar' cannot be used: Unsupported.*"
                                          r"\(tracking.required=false trains without it\)$"):
        Tracker(cfg, rank=0)
    cfg.tracking.required = False
    tracker = Tracker(cfg, rank=0)
    assert not tracker.active and tracker.run_id is None
    tracker.log_metrics({"loss": 1.0}, step=1)  # no-ops, as off rank 0
    tracker.finish()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dico_scale: warning: tracking store 'foo://bar' cannot be used: ")
    assert not (tmp_path / "xe" / "mlflow_backlog.jsonl").exists()


@pytest.mark.distributed
def test_a_store_mlflow_refuses_stops_every_rank_with_its_one_line(tmp_path):
    """The store is opened on rank 0 alone, once the models are built: rank 0 left with its line while rank 1 waited
    for it in a collective (killed by the launcher, or gloo's 'Connection closed by peer' traceback). Every rank
    leaves with the line now."""
    from helpers import launch

    args = xe_args(tmp_path, tmp_path / "xe") + ["tracking.uri=foo://bar", "train.max_steps=1"]
    proc = launch("dico_scale/train.py", args[1], args[2:], timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dico_scale:")]
    assert len(lines) == 2 and all(line.startswith("dico_scale: config error: tracking store 'foo://bar' cannot be "
                                                   "used: ") for line in lines), proc.stderr[-3000:]


def test_sync_without_a_store_or_to_one_mlflow_refuses_is_one_line_and_keeps_the_records(tmp_path, capsys):
    from dico_scale.backlog import Backlog
    from dico_scale.tracking import main

    record = {"op": "batch", "run_id": "r", "metrics": [["loss", 1.0, 1000, 1]]}  # written by hand: no "uri"
    Backlog(tmp_path).append(record)
    assert main(["sync", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dico_scale: tracking sync: the records in {tmp_path / 'mlflow_backlog.jsonl'} name no store: pass --uri"]
    assert main(["sync", str(tmp_path), "--uri", "foo://bar"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dico_scale: tracking sync: foo://bar: Unsupported"), err
    assert Backlog(tmp_path).records() == [record]


def test_a_resume_against_a_store_without_the_run_logs_to_a_new_run_and_sets_the_old_backlog_aside(tmp_path, capsys):
    """A job resumed on another cluster (another store): a warning and a new run with its params, instead of
    MLflow's 'Run not found'; the old run's unsent records move to a folder `sync` sends to the store they name."""
    from dico_scale.backlog import Backlog
    from dico_scale.config import load_config
    from dico_scale.tracking import Tracker

    args = xe_args(tmp_path, tmp_path / "xe")
    cfg = load_config(str(REPO / args[args.index("--config") + 1]), [a for a in args if "=" in a])
    (tmp_path / "xe").mkdir()
    old = {"op": "batch", "run_id": "run-elsewhere", "uri": "http://old-cluster:5000", "metrics": [["a", 1.0, 1, 1]]}
    Backlog(tmp_path / "xe").append(old)
    tracker = Tracker(cfg, rank=0, resume_run_id="run-elsewhere")
    tracker.finish()
    assert not tracker.resumed and tracker.run_id != "run-elsewhere"
    aside = tmp_path / "xe" / "mlflow_backlog_run-elsewhere"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dico_scale: warning: tracking: the checkpoint's MLflow run run-elsewhere is not in "
                   f"{cfg.tracking.uri} (another store?); this part of the run logs to a new run; what that run had not received yet is "
                   f"kept for it: python -m dico_scale.tracking sync {aside}"]
    assert Backlog(aside).records() == [old] and not Backlog(tmp_path / "xe").path.exists()
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(tracker.run_id)
    assert run.data.params["train.stage"] == "xe" and run.info.status == "FINISHED"


def test_a_resume_from_another_folders_checkpoint_branches_to_a_new_run(tmp_path, capsys):
    """train.resume=<another folder's tag> logged on to that folder's run (FINISHED, or still training): two folders'
    steps in one history. Such a branch gets a new run tagged with its origin; a tag of the run's own checkpoints/
    (a requeue, a moved folder) still continues the checkpoint's run."""
    import torch.distributed as dist

    from dico_scale.config import load_config
    from dico_scale.tracking import Tracker, start_tracker

    def cfg(out: str):
        args = xe_args(tmp_path, tmp_path / out)
        return load_config(str(REPO / args[args.index("--config") + 1]), [a for a in args if "=" in a])

    origin = Tracker(cfg("a"), rank=0)
    origin.finish()
    tag = tmp_path / "a" / "checkpoints" / "step_00000040"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        branch = start_tracker(cfg("b"), 0, origin.run_id, tag)
        branch.finish()
        again = start_tracker(cfg("a"), 0, origin.run_id, tag)
        again.finish()
    finally:
        dist.destroy_process_group()
    assert not branch.resumed and branch.run_id != origin.run_id
    assert again.resumed and again.run_id == origin.run_id
    tags = MlflowClient(tracking_uri=cfg("b").tracking.uri).get_run(branch.run_id).data.tags
    assert tags["dico_scale.forked_from_run"] == origin.run_id and tags["dico_scale.forked_from_checkpoint"] == str(tag)
    assert (f"dico_scale: tracking: {tag} is another folder's checkpoint: this run logs to a new MLflow run (tagged "
            f"with the run {origin.run_id} it branches from, which is left as it is)") in capsys.readouterr().err


def test_backlog_replay_stops_at_the_first_refusal_and_keeps_the_rest_in_order(tmp_path):
    """A real sqlite store refuses a record of a run it does not have: the records before it are sent and cleared."""
    from dico_scale.backlog import Backlog
    from dico_scale.tracking import send

    client = MlflowClient(tracking_uri=mlflow_uri(tmp_path / "mlflow.db"))
    run_id = client.create_run(client.create_experiment("b")).info.run_id
    backlog = Backlog(tmp_path)
    records = [{"op": "batch", "run_id": run_id, "metrics": [["loss", 1.0, 1000, 1]]},
               {"op": "batch", "run_id": "no-such-run", "metrics": [["loss", 2.0, 2000, 2]]},
               {"op": "end", "run_id": run_id, "status": "KILLED", "time": 3000}]
    for r in records:
        backlog.append(r)
    with open(backlog.path, "a") as f:
        f.write('{"op": "batch", "run_id"')  # a line cut short by a crash mid-write is dropped
    with pytest.raises(Exception, match="no-such-run"):  # MLflow's own error for the missing run
        backlog.replay(lambda r: send(client, r))
    assert backlog.records() == records[1:]
    Backlog(tmp_path).append(records[2])  # a new run's backlog starts on a line of its own
    assert backlog.records() == records[1:] + records[2:]
    backlog.drop_first(1)
    assert backlog.replay(lambda r: send(client, r)) == (2, 0) and not backlog.path.exists()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time == 3000
    assert [(m.step, m.timestamp) for m in client.get_metric_history(run_id, "loss")] == [(1, 1000)]


def test_a_full_queue_spills_to_the_backlog_and_everything_arrives(tmp_path):
    """Bounded memory: put never blocks; what the queue cannot hold waits on disk and is sent too, each at its step."""
    from dico_scale.backlog import Backlog
    from dico_scale.tracking import Sender

    client = MlflowClient(tracking_uri=mlflow_uri(tmp_path / "mlflow.db"))
    run_id = client.create_run(client.create_experiment("q")).info.run_id
    sender = Sender(client, "sqlite", Backlog(tmp_path), queue_size=2, retry_every_s=1, finish_wait_s=15.0)
    for step in range(1, 6):  # the sender is not running yet: a store that takes nothing
        sender.put({"op": "batch", "run_id": run_id, "metrics": [["loss", float(step), 1000 + step, step]]})
    assert sender.queue.qsize() == 2 and len(sender.backlog) == 3
    sender.start()
    sender.close()
    assert not sender.backlog.path.exists()
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5]
