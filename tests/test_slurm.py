"""The Slurm launchers (slurm/*.sh) on a real local Slurm cluster: 2 emulated nodes on this machine.

tests/slurm/cluster.sh installs slurm-wlm + munge (apt) when missing and starts slurmctld and two slurmd (n1, n2).
The XE then the DiCO stage are submitted with `sbatch --wait --nodes=2` through slurm/xe_8node.sh and
slurm/dico_8node.sh (demo configs, tiny settings, --gpus-per-node=0 overriding the scripts' 8 GPUs): one launcher
task per node, each starting torchrun with one CPU rank, joined by a c10d rendezvous on n1.
"""
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import free_port, mlflow_uri, wait_for

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
NODES = ("n1", "n2")


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (slurmctld, slurmd, munged, /etc/hosts)")
    if shutil.which("apt-get") is None and shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install slurm-wlm and munge")
    proc = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(f"apt could not install slurm-wlm and munge:\n{proc.stderr[-2000:]}")
    assert proc.returncode == 0, f"cluster.sh up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    yield
    subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)


def _tiny(tmp: Path) -> list[str]:
    return [f"data.root={tmp}/data", f"tracking.uri={mlflow_uri(tmp / 'mlflow.db')}", "data.synthetic.n_train=100",
            "data.synthetic.n_val=8", "data.synthetic.n_test=8", "data.synthetic.samples_per_shard=25",
            "data.samples_per_epoch=16", "data.shuffle_buffer=10", "train.max_steps=2", "train.micro_batch_size=2",
            "train.val_max_images=4", "train.log_every=1", "train.threads=1", "generation.candidates=2",
            "generation.max_len=4", "evaluator.weights=", "captioner.image_encoder_weights="]


def _sbatch(script: str, config: str, tmp: Path, name: str, overrides: list[str]) -> tuple[int, Path]:
    """sbatch --wait on 2 nodes x 1 CPU rank; returns the job id and the log folder."""
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "CONFIG": config, "LOG_DIR": str(logs), "MASTER_PORT": str(free_port()),
           "LOGLEVEL": "INFO",  # torchrun logs its rendezvous result: the ranks each node got
           "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "DS_ACCELERATOR"):
        env.pop(k, None)
    cmd = ["sbatch", "--wait", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
           f"--job-name={name}", f"--output={logs}/%x-%j.out", "--time=10", script, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    m = re.match(r"(\d+)", proc.stdout.strip())
    assert m, f"sbatch printed no job id: {proc.stdout}\n{proc.stderr}"
    job = int(m.group(1))
    if proc.returncode != 0:
        text = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob(f"{name}-{job}*")))
        pytest.fail(f"job {job} exited {proc.returncode}: {proc.stderr}\n{text}")
    return job, logs


def _node_logs(logs: Path, name: str, job: int) -> dict[str, str]:
    """Per-node launcher logs keyed by the Slurm node that wrote them (launch.sh's first line names it)."""
    out = {}
    for p in sorted(logs.glob(f"{name}-{job}-node*.out")):
        text = p.read_text()
        m = re.search(r"^launch\.sh: node (\S+) ", text, re.M)
        assert m, f"{p.name} has no launch.sh node line:\n{text[-2000:]}"
        out[m.group(1)] = text
    return out


def _one_rank_per_node(node_logs: dict[str, str]) -> dict[str, int]:
    ranks = {}
    for node, text in node_logs.items():
        assert "global_world_sizes=[2]" in text, f"{node}: torchrun did not form a world of 2:\n{text[-3000:]}"
        assert "local_ranks=[0]" in text and "group_world_size=2" in text, node
        ranks[node] = int(re.search(r"global_ranks=\[(\d+)\]", text).group(1))
    return ranks


@pytest.fixture(scope="module")
def xe_job(slurm_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    job, logs = _sbatch("slurm/xe_8node.sh", "configs/demo/xe.yaml", tmp, "xe",
                        _tiny(tmp) + [f"train.output_dir={tmp}/xe"])
    return tmp, job, logs


def test_xe_then_dico_on_two_nodes_one_rank_each(xe_job):
    tmp, xe_id, logs = xe_job
    assert (tmp / "xe" / "model.pt").is_file()
    assert sorted(_one_rank_per_node(_node_logs(logs, "xe", xe_id)).values()) == [0, 1]

    # DiCO under ZeRO-3 (the xe job and the preemption test below train under ZeRO-2): captioner, reference and
    # evaluator sharded across the two nodes.
    job, _ = _sbatch("slurm/dico_8node.sh", "configs/demo/dico.yaml", tmp, "dico",
                     _tiny(tmp) + [f"train.output_dir={tmp}/dico", f"train.init_from={tmp}/xe/model.pt",
                                   "train.deepspeed_config=configs/deepspeed/zero3.json"])
    batch = (logs / f"dico-{job}.out").read_text()
    assert "2 node(s) [n[1-2]], rendezvous n1:" in batch and "CONFIG=configs/demo/dico.yaml" in batch
    assert "train.resume=auto" in batch  # what a requeued job needs
    assert "job step finished with exit code 0" in batch

    # One launcher per Slurm node, each with one rank of a world of 2; ranks 0 and 1 on different nodes.
    node_logs = _node_logs(logs, "dico", job)
    assert sorted(node_logs) == list(NODES)
    ranks = _one_rank_per_node(node_logs)
    assert sorted(ranks.values()) == [0, 1]
    for node, text in node_logs.items():
        assert "1 rank(s), 0 GPU(s), DS_ACCELERATOR=cpu" in text, node
        assert f"is_host': '{int(node == 'n1')}'" in text  # the rendezvous store lives on the first node
    rank0 = next(n for n, r in ranks.items() if r == 0)
    assert "done: stage=dico step=2" in node_logs[rank0]

    # The job's outputs: a ZeRO-3 checkpoint with one parameter and one optimizer shard per rank, the export, the
    # MLflow run with the sharded models' memory.
    out = tmp / "dico"
    tag = out / "checkpoints" / "step_00000002"
    assert (tag / "complete").is_file() and (out / "model.pt").is_file()
    assert json.loads((tag / "complete").read_text())["zero_stage"] == 3
    for kind in ("model", "optim"):
        shards = sorted(p.name for p in tag.glob(f"zero_pp_rank_*_mp_rank_00_{kind}_states.pt"))
        assert shards == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1)]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id],
                              filter_string="params.`train.stage` = 'dico'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["train.resume"] == "auto"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2]
    assert "rewards/accuracy" in run.data.metrics and "val/cider" in run.data.metrics
    assert all(run.data.params[f"memory/{m}/zero_stage"] == "3" for m in ("captioner", "reference", "evaluator"))


def _job_field(job: int, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def _restartable(job: int) -> bool:
    """The requeued job is pending, none of its steps is left and both nodes are idle (not completing)."""
    if _job_field(job, "JobState") != "PENDING":
        return False
    steps = subprocess.run(["squeue", "-h", "-s", "-j", str(job)], capture_output=True, text=True).stdout
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout.split()
    return not steps.strip() and dict(zip(nodes[::2], nodes[1::2])) == {n: "idle" for n in NODES}


def test_preempted_job_checkpoints_requeues_and_resumes_on_the_same_run(slurm_cluster, tmp_path):
    """USR1 to a running job: the ranks checkpoint and exit 3, the job is requeued, resumes at the next step and
    finishes on the same MLflow run. Submitted with RESUME= (no train.resume: the config's none): the restart
    continues the checkpoint all the same (with none it was refused beside the checkpoints it wrote)."""
    import sqlite3
    logs, db, out = tmp_path / "logs", tmp_path / "mlflow.db", tmp_path / "xe"
    logs.mkdir()
    overrides = _tiny(tmp_path) + [f"train.output_dir={out}", "train.max_steps=14", "train.save_every=1000",
                                   "train.val_every=0"]
    env = {**os.environ, "CONFIG": "configs/demo/xe.yaml", "LOG_DIR": str(logs), "MASTER_PORT": str(free_port()),
           "PYTHONUNBUFFERED": "1", "RESUME": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "DS_ACCELERATOR"):
        env.pop(k, None)
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
                           "--job-name=pre", f"--output={logs}/%x-%j.out", "--time=10", "slurm/xe_8node.sh",
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    job = int(re.match(r"(\d+)", proc.stdout.strip()).group(1))

    def steps_logged() -> int:
        try:
            with sqlite3.connect(db) as c:
                return c.execute("select count(distinct step) from metrics where key='train/loss'").fetchone()[0]
        except sqlite3.Error:
            return 0
    try:
        wait_for(lambda: steps_logged() >= 3, 300, "3 training steps")
        subprocess.run(["scancel", "--signal=USR1", "--full", str(job)], check=True)
        wait_for(lambda: _job_field(job, "Restarts") == "1", 240, "the requeue")
        # Skip the requeue delay, but only once a restart can succeed: a start forced while the old step is still
        # being torn down is killed by slurmd ("Job credential revoked") and the job ends FAILED.
        wait_for(lambda: _restartable(job), 240, "the requeued job to be pending on idle nodes")
        time.sleep(2)  # slurmd rejects credentials created in the same second as the old one's revocation
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
        wait_for(lambda: _job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", ""), 400, "the end")
    finally:
        subprocess.run(["scancel", str(job)], capture_output=True)
    batch = (logs / f"pre-{job}.out").read_text()
    assert _job_field(job, "JobState") in ("COMPLETED", ""), batch[-3000:]
    # srun reports 3, or 143 when --kill-on-bad-exit ended the other node's task first (after its checkpoint)
    assert re.search(r"preempted \(exit (3|143)\): requeueing job", batch) and "restart 1" in batch, batch[-3000:]
    assert "job step finished with exit code 0" in batch, batch[-3000:]
    starts = re.findall(r"^launch\.sh: overrides: (.*)$", batch, re.M)
    assert len(starts) == 2 and "train.resume" not in starts[0] and starts[1].endswith(" train.resume=auto"), starts
    assert not (logs / f".requeued-{job}").exists()
    node_text = "".join(p.read_text() for p in logs.glob(f"pre-{job}-node*.out"))
    saved = int(re.search(r"preempted: checkpoint saved at step (\d+)", node_text).group(1))
    assert f"at step {saved}" in node_text.split("resumed from", 1)[1].splitlines()[0]
    assert (out / "checkpoints" / f"step_{saved:08d}" / "complete").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id])
    assert run.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")} == set(range(1, 15))
