"""DeepSpeed with 2 CPU gloo ranks: the evaluator -> xe -> dico chain, ZeRO-2 replicas, kill + resume on one MLflow run."""
import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from helpers import (check_ok, demo_overrides as _common, free_port, kill_at, launch as _launch, mlflow_uri,
                     ranks_cmd, steps_logged, wait_for)
import torch

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parent.parent


def test_dico_zero2_two_ranks_step_and_stay_identical(chain):
    tmp, weights = chain
    out = tmp / "dico_replicas"  # not the demo's dico folder
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    # an empty extension cache, and LOCAL_SIZE as the deepspeed launcher sets it (all ranks local: DeepSpeed's CPU
    # backend would build its shared-memory allreduce op there and map a buffer per rank)
    ext = out / "torch_extensions"
    proc = check_ok(_launch("tests/distributed/replica_check.py", "configs/demo/dico.yaml",
                       _common(tmp) + weights + [f"train.output_dir={out}", f"train.init_from={tmp}/xe/model.pt",
                                                 "train.max_steps=4", "train.micro_batch_size=2",
                                                 "generation.candidates=3", "generation.max_len=6",
                                                 "train.val_max_images=4", "optim.lr=1e-3"],
                       env={"TORCH_EXTENSIONS_DIR": str(ext), "LOCAL_SIZE": "2"}))
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world_size"], r1["world_size"], r0["rank"], r1["rank"]) == (2, 2, 0, 1)
    assert r0["global_steps"] == r1["global_steps"] == 4
    assert r0["digest"] == r1["digest"]  # ZeRO-2 replicas agree after the steps
    # DeepSpeed's shared-memory allreduce op (inference only) is neither compiled nor run: no build at the first
    # start, no 64 MiB /dev/shm buffer per rank (RAM) left behind
    assert not (ext / "deepspeed_shm_comm").exists() and r0["shm_allreduce_op"] is r1["shm_allreduce_op"] is False
    assert not set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - shm_before
    # ... and the steps moved the trainable weights away from the XE starting point
    start = torch.load(tmp / "xe" / "model.pt", weights_only=True)["state_dict"]
    end = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    moved = [k for k in end if not k.startswith("image_encoder.") and not torch.equal(start[k], end[k])]
    frozen = [k for k in end if k.startswith("image_encoder.") and not torch.equal(start[k], end[k])]
    assert len(moved) > 10 and not frozen
    assert "cider" in r0["val"] and "evaluator_score" in r0["val"]
    assert "rewards/accuracy" in proc.stdout or (out / "checkpoints").is_dir()
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    run = client.get_run(r0["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.stage"] == "dico"
    for key in ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "score/winner", "score/mean", "train/lr", "train/images_per_s", "train/tokens_per_s", "val/cider"):
        assert key in run.data.metrics, key
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3, 4]


def test_signal_checkpoints_all_ranks_and_exits_for_requeue(chain):
    """SIGUSR1 to one rank only: the ranks agree at the next step, all checkpoint, exit 3 (passed on by
    slurm/torchrun.py); the resume continues the same MLflow run and the saved epoch at its next batch. (A SIGKILLed
    job's resume: the SCST test below; the `deepspeed` runner's own signal handling: test_supervision.)"""
    import psutil

    tmp, weights = chain
    out, db = tmp / "preempt", tmp / "preempt.db"
    args = _common(tmp) + weights + [f"train.output_dir={out}", f"tracking.uri={mlflow_uri(db)}",
                                     "train.micro_batch_size=4", "train.val_every=0", "train.save_every=1000"]
    cmd = [*ranks_cmd("dico_scale/train.py"), "--config", "configs/demo/xe.yaml", *args, "train.max_steps=1000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []  # read as it comes: the ranks must never block on a full pipe
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()

    def find_rank1() -> list:
        """torchrun's own children are the ranks (their DataLoader workers inherit RANK too, a level further down)."""
        found = []
        for p in psutil.Process(proc.pid).children():
            try:
                if p.environ().get("RANK") == "1":
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found

    try:
        wait_for(lambda: proc.poll() is not None or (steps_logged(db) >= 2 and find_rank1()), 300, "2 steps")
        assert proc.poll() is None, "".join(output)[-3000:]
        (rank1,) = find_rank1()
        assert "dico_scale/train.py" in rank1.cmdline() and rank1.environ()["LOCAL_RANK"] == "1"
        os.kill(rank1.pid, signal.SIGUSR1)
        proc.wait(timeout=300)
        reader.join(timeout=60)
    finally:
        if proc.poll() is None:  # torchrun starts each rank in a session of its own: the whole tree
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait()
    output = "".join(output)
    assert proc.returncode == 3, output[-3000:]
    saved = int(re.search(r"preempted: checkpoint saved at step (\d+)", output).group(1))
    tag = out / "checkpoints" / f"step_{saved:08d}"
    assert (tag / "complete").is_file()
    assert {p.name for p in tag.glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}

    stop = saved + 3
    second = check_ok(_launch("dico_scale/train.py", "configs/demo/xe.yaml",
                              args + ["train.resume=auto", f"train.max_steps={stop}"]))
    assert f"at step {saved}" in second.stdout
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id])  # the same run
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert steps[0] == 1 and steps[-1] == stop and set(range(1, stop + 1)) <= set(steps)  # both segments
    state = torch.load(out / "checkpoints" / f"step_{stop:08d}" / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["mlflow_run_id"] == run.info.run_id and state["step"] == stop
    # The resumed epoch went on for its remaining batches only: 64 samples / (2 ranks x 4) = 8 batches per epoch,
    # one per step, so the data position is the step (not a replay from the epoch's start, not a skipped epoch).
    assert state["epoch"] * 8 + state["batch_in_epoch"] == stop
    assert state["data"]["read"] >= 4 * 2 * stop and state["data"].get("skipped", 0) == 0
    assert (out / "checkpoints" / f"step_{stop:08d}" / "config.yaml").is_file()


def test_eval_two_ranks_two_workers_read_each_sample_once(tmp_path):
    """2 gloo ranks x 2 workers: disjoint keys per reader, all of them together, for both eval_loader branches."""
    import sys
    import tarfile

    import webdataset as wds
    from dico_scale.data.synthetic import write_synthetic_dataset

    many = write_synthetic_dataset(tmp_path / "many", n_train=0, n_val=11, n_test=0, samples_per_shard=2)["val"]
    one = write_synthetic_dataset(tmp_path / "one", n_train=0, n_val=9, n_test=0, samples_per_shard=16)["val"]
    assert len(wds.shardlists.expand_urls(many)) == 6 and len(wds.shardlists.expand_urls(one)) == 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tests/distributed/eval_split_check.py", str(tmp_path), many, one]
    check_ok(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300))
    result = json.loads((tmp_path / "eval_split.json").read_text())
    for spec in (many, one):
        expected = set()
        for url in wds.shardlists.expand_urls(spec):
            with tarfile.open(url) as tar:
                expected |= {m.name.rsplit(".", 1)[0] for m in tar.getmembers()}
        readers = result[spec]
        assert sorted(readers) == ["0/0", "0/1", "1/0", "1/1"], readers  # every reader got a share
        keys = [k for ks in readers.values() for k in ks]
        assert len(keys) == len(set(keys)) and set(keys) == expected, (spec, readers)


def test_scst_two_ranks_killed_and_resumed_on_the_same_mlflow_run(chain):
    """SCST through the real trainer with 2 ranks under ZeRO-3 (captioner and evaluator sharded): killed (SIGKILL, whole job) after its step-2 checkpoint, resumed
    with train.resume=auto to step 4 on the same MLflow run, every step's SCST metrics logged, the CIDEr-D df built
    once beside the shards (the reward mixes it with the evaluator), the greedy baseline used."""
    tmp, weights = chain
    out, db = tmp / "scst_resume", tmp / "scst_resume.db"
    args = _common(tmp) + weights + [
        f"train.output_dir={out}", f"tracking.uri={mlflow_uri(db)}", f"train.init_from={tmp}/xe/model.pt",
        "train.save_every=2", "train.keep_checkpoints=5", "train.micro_batch_size=2", "train.val_every=0",
        "train.val_max_images=4", "scst.candidates=2", "scst.baseline=greedy", "scst.reward=0.5*evaluator+cider",
        "generation.max_len=6", "optim.lr=1e-3", "train.deepspeed_config=configs/deepspeed/zero3.json"]
    kill_at("configs/demo/scst.yaml", args + ["train.max_steps=1000"], out / "checkpoints" / "step_00000002" / "complete")
    assert list((tmp / "data").glob("cider_df-*.json"))  # beside the training shards

    second = check_ok(_launch("dico_scale/train.py", "configs/demo/scst.yaml", args + ["train.resume=auto",
                                                                                      "train.max_steps=4"]))
    tags = sorted(p.name for p in (out / "checkpoints").glob("step_*") if (p / "complete").exists())
    resumed_from = int(re.search(r"resumed from \S+ at step (\d+)", second.stdout).group(1))
    assert resumed_from >= 2 and f"step_{resumed_from:08d}" in tags and tags[-1] == "step_00000004"
    assert "captioner (ZeRO stage 3)" in second.stdout and "evaluator (ZeRO stage 3)" in second.stdout
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.stage"] == "scst"
    for key in ("scst/reward", "scst/greedy_reward", "scst/advantage_std", "scst/candidate_len", "scst/reward_s"):
        assert sorted({m.step for m in client.get_metric_history(run.info.run_id, key)}) == [1, 2, 3, 4], key
    for key in ("val/cider", "val/evaluator_score", "val/mean_length", "val/repetition", "val/vocab_size"):
        assert key in run.data.metrics, key
    state = torch.load(out / "checkpoints" / "step_00000004" / "zero_pp_rank_0_mp_rank_00_model_states.pt",  # ZeRO-3
                       weights_only=False)
    assert state["mlflow_run_id"] == run.info.run_id and state["step"] == 4
    start = torch.load(tmp / "xe" / "model.pt", weights_only=True)["state_dict"]
    end = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(start[k], end[k]) for k in end if not k.startswith("image_encoder."))
