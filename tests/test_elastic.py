"""Elastic resume (a checkpoint of N ranks resumed by M through DeepSpeed's universal checkpoint) and the frozen
models' fingerprints, with real DeepSpeed CPU ranks, real shards and a real MLflow sqlite store."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import check_ok, mlflow_uri, ranks_cmd
from mlflow.tracking import MlflowClient

from dico_scale.checkpoint import verify_local
from dico_scale.config import ConfigError, load_config, to_yaml
from dico_scale.frozen import check_fingerprints, fingerprint, frozen_model_files, sha256_of
from dico_scale.resume import changed_settings, rescale_position, settings_note

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
TAG2 = "step_00000002"


def _launch(script: str, args: list[str], ranks: int, timeout: int = 400):
    return subprocess.run([*ranks_cmd(script, ranks), *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _fp32(tag: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---- the real trainer: dico under ZeRO-3 at 2 ranks, resumed at 1, then at 2 ---------------------------------------
# ZeRO-3: the captioner's frozen tower is partitioned inside the trained engine, the reference and evaluator are
# engines of their own. ZeRO-2 elastic resumes are checked exactly with the small model further down.

def _args(tmp: Path) -> list[str]:
    return ["--config", "configs/demo/dico.yaml", "train.deepspeed_config=configs/deepspeed/zero3.json",
            f"data.root={tmp}/data", f"tracking.uri={mlflow_uri(tmp / 'mlflow.db')}",
            "data.synthetic.n_train=64", "data.synthetic.n_val=0", "data.synthetic.n_test=0",
            "data.synthetic.samples_per_shard=16", "data.samples_per_epoch=32", "data.shuffle_buffer=10",
            "train.micro_batch_size=2", "train.log_every=1", "generation.candidates=2", "generation.max_len=4",
            "captioner.image_encoder_weights=", f"train.init_from={tmp}/reference.pt",
            f"evaluator.weights={tmp}/evaluator.pt", f"train.output_dir={tmp}/dico", "train.keep_checkpoints=5"]


def _run(tmp: Path) -> tuple[str, list[int]]:
    """The one MLflow run of the experiment: its status and the steps of its train/loss."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id])
    return run.info.status, sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))


def _state(tag: Path) -> dict:
    """The client state in rank 0's model states file."""
    return torch.load(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def dico2(tmp_path_factory):
    """Tiny reference and evaluator weight files, then 2 ranks of dico for 2 steps: the checkpoint step 2."""
    from dico_scale.config import load_config
    from dico_scale.models import build_captioner
    from dico_scale.models.clip import create_clip, save_clip

    tmp = tmp_path_factory.mktemp("elastic")
    cfg = load_config("configs/demo/dico.yaml", ["captioner.image_encoder_weights=", "evaluator.weights=",
                                                 "train.init_from="])
    torch.manual_seed(0)
    save_clip(build_captioner(cfg), str(tmp / "reference.pt"))
    save_clip(create_clip(cfg.evaluator.model)[0], str(tmp / "evaluator.pt"))
    check_ok(_launch("dico_scale/train.py", _args(tmp) + ["train.max_steps=2"], ranks=2))
    return tmp


def _changed_copy(src: Path, dst: Path) -> Path:
    state = torch.load(src, weights_only=True)
    name = next(iter(state["state_dict"]))
    state["state_dict"][name] = state["state_dict"][name] + 1e-3
    torch.save(state, dst)
    return dst


@pytest.mark.distributed
def test_changed_reference_or_evaluator_file_stops_the_resume(dico2):
    tmp = dico2
    ckpt = tmp / "dico" / "checkpoints"
    before = sorted(p.name for p in ckpt.iterdir())
    fps = json.loads((ckpt / TAG2 / "complete").read_text())["frozen_models"]
    for key, label, name in [("train.init_from", "reference weights", "reference.pt"),
                             ("evaluator.weights", "evaluator weights", "evaluator.pt")]:
        changed = _changed_copy(tmp / name, tmp / f"changed_{name}")
        # one rank, not the 2 that wrote the checkpoint: a check made after the conversion would leave a
        # step_00000002_universal folder behind
        proc = _launch("dico_scale/train.py", _args(tmp) + [f"{key}={changed}", "train.resume=auto",
                                                             "train.max_steps=3"], ranks=1)
        assert proc.returncode == 2, proc.stderr[-3000:]
        (line,) = [l for l in proc.stderr.splitlines() if l.startswith("dico_scale:")]
        then = fps[f"{label} ({key})"]
        digest, size = sha256_of(changed)
        assert line == (f"dico_scale: config error: train.resume: the {label} ({key}) differ from the ones checkpoint "
                        f"{ckpt / TAG2} started from: now {changed}: {size} bytes, sha256 {digest[:16]}; then "
                        f"{tmp / name}: {then['size']} bytes, sha256 {then['sha256'][:16]} (restore that file, or set "
                        "train.output_dir to a new folder to start over)")
        assert "Traceback" not in proc.stderr and "resumed from" not in proc.stdout
        assert sorted(p.name for p in ckpt.iterdir()) == before
        assert _run(tmp) == ("FINISHED", [1, 2])  # the MLflow run was not touched


@pytest.mark.distributed
def test_dico_resumes_at_one_rank_then_at_two_on_the_same_mlflow_run(dico2):
    tmp = dico2
    ckpt = tmp / "dico" / "checkpoints"
    marker2 = json.loads((ckpt / TAG2 / "complete").read_text())
    assert marker2["world_size"] == 2 and marker2["zero_stage"] == 3 and set(marker2["frozen_models"]) == {
        "reference weights (train.init_from)", "evaluator weights (evaluator.weights)"}

    # 2 -> 1: converted once, kept beside the tag; 2 ranks x 2 images x 2 batches = 8 samples = 4 batches of 2
    proc = check_ok(_launch("dico_scale/train.py", _args(tmp) + ["train.resume=auto", "train.max_steps=3"], 1))
    assert f"{ckpt / TAG2} was written by 2 ranks: converted it to {ckpt / TAG2}_universal for 1 ranks in" in proc.stdout
    assert f"resumed from {ckpt / TAG2} at step 2 (epoch 0, batch 4; written by 2 ranks)" in proc.stdout
    assert verify_local(ckpt / f"{TAG2}_universal") is None
    assert not (ckpt / f"{TAG2}_universal.tmp").exists() and not (ckpt / "latest_universal").exists()
    state3 = _state(ckpt / "step_00000003")
    assert (state3["global_steps"], state3["epoch"], state3["batch_in_epoch"]) == (3, 0, 5)
    marker3 = json.loads((ckpt / "step_00000003" / "complete").read_text())
    assert marker3["world_size"] == 1 and marker3["frozen_models"] == marker2["frozen_models"]
    assert _run(tmp) == ("FINISHED", [1, 2, 3])
    # the frozen image tower is the checkpoint's (the universal load itself restores only the optimizer's parameters)
    start, end = _fp32(ckpt / TAG2), torch.load(tmp / "dico" / "model.pt", weights_only=True)["state_dict"]
    tower = [k for k in start if k.startswith("image_encoder.")]
    assert tower and all(torch.equal(start[k], end[k]) for k in tower)
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith("decoder."))

    # 1 -> 2, from a marker written before fingerprints existed: a one-line warning, then the resume
    del marker3["frozen_models"]
    (ckpt / "step_00000003" / "complete").write_text(json.dumps(marker3))
    proc = check_ok(_launch("dico_scale/train.py", _args(tmp) + ["train.resume=auto", "train.max_steps=4",
                                                                     "train.keep_checkpoints=2"], 2))
    warnings = [l for l in proc.stdout.splitlines() if l.startswith("warning: checkpoint")]
    assert warnings == [f"warning: checkpoint {ckpt}/step_00000003 records no fingerprint of the frozen models "
                        "(written before fingerprints existed): the reference weights (train.init_from) and "
                        "evaluator weights (evaluator.weights) are not checked against the ones it started from"]
    # 1 rank x 2 images x 5 batches = 10 samples: 2 batches of 2 ranks x 2, the remainder not counted (rounded down)
    assert f"resumed from {ckpt}/step_00000003 at step 3 (epoch 0, batch 2; written by 1 ranks)" in proc.stdout
    state4 = _state(ckpt / "step_00000004")
    assert (state4["global_steps"], state4["epoch"], state4["batch_in_epoch"]) == (4, 0, 3)
    assert state4["mlflow_run_id"] == state3["mlflow_run_id"]
    marker4 = json.loads((ckpt / "step_00000004" / "complete").read_text())
    assert marker4["world_size"] == 2 and marker4["frozen_models"] == marker2["frozen_models"]
    # a normal 2-rank checkpoint after a universal load: every rank's model states too (DeepSpeed #7546)
    assert {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")} <= set(
        marker4["files"])
    assert _run(tmp) == ("FINISHED", [1, 2, 3, 4])
    # keep_checkpoints=2 removed step 2 with its universal conversion
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [
        "step_00000003", "step_00000003_universal", "step_00000004"]


@pytest.mark.distributed
def test_bf16_zero3_checkpoint_resumes_at_one_rank_with_its_weights(tmp_path):
    """bf16 (the GPU default) under ZeRO-3: a 2-rank checkpoint loads at 1 rank to exactly the weights the 2-rank run
    exported, and training goes on from the kept conversion on the same MLflow run."""
    import shutil

    def args(out: str, steps: int) -> list[str]:
        return ["--config", "configs/demo/xe.yaml", "train.deepspeed_config=configs/deepspeed/zero3.json",
                "train.precision=bf16", f"data.root={tmp_path}/data", f"tracking.uri={mlflow_uri(tmp_path / 'mlflow.db')}",
                "data.synthetic.n_train=64", "data.synthetic.n_val=4", "data.synthetic.n_test=0",
                "data.synthetic.samples_per_shard=16", "data.samples_per_epoch=32", "train.micro_batch_size=4",
                "train.log_every=1", "train.val_every=0", "train.save_every=2", "evaluator.weights=",
                "captioner.image_encoder_weights=", f"train.output_dir={tmp_path}/{out}", f"train.max_steps={steps}"]

    check_ok(_launch("dico_scale/train.py", args("two", 2), ranks=2))
    shutil.copytree(tmp_path / "two" / "checkpoints", tmp_path / "one" / "checkpoints")
    ckpt = tmp_path / "one" / "checkpoints"
    proc = check_ok(_launch("dico_scale/train.py", args("one", 2) + ["train.resume=auto"], 1))
    assert f"resumed from {ckpt / TAG2} at step 2 (epoch 0, batch 4; written by 2 ranks)" in proc.stdout
    two, one = (torch.load(tmp_path / d / "model.pt", weights_only=True)["state_dict"] for d in ("two", "one"))
    assert _max_diff(one, two) == 0  # the bf16 weights, gathered from 1 rank's partition of the universal checkpoint

    proc = check_ok(_launch("dico_scale/train.py", args("one", 3) + ["train.resume=auto"], 1))
    assert proc.stdout.count("(converted earlier)") == 1
    end = torch.load(tmp_path / "one" / "model.pt", weights_only=True)["state_dict"]
    assert _max_diff(end, two) > 0  # step 3 trained
    master = _fp32(ckpt / "step_00000003")  # the fp32 master weights; the export is their bf16 working copy
    assert all(torch.equal(master[k].to(torch.bfloat16).float(), end[k]) for k in end)
    status, steps = _run(tmp_path)
    assert status == "FINISHED" and steps == [1, 2, 3]


@pytest.mark.distributed
def test_a_zero2_checkpoint_resumes_under_zero1_and_is_refused_under_zero3(tmp_path):
    """DeepSpeed resumes a tag only under the ZeRO stage it was saved at: under ZeRO-3 a ZeRO-2 tag failed with an
    empty AssertionError blamed on the model. Stages 1 and 2 share the partitioned optimizer layout: a ZeRO-1 resume
    of a ZeRO-2 tag trains on (its next step was checked bitwise equal to the ZeRO-2 resume's when this was written;
    not repeated here, for the suite's time)."""
    import shutil

    from helpers import xe_args

    def args(out: str, zero: int, steps: int) -> list[str]:
        return xe_args(tmp_path, tmp_path / out) + [
            "tracking.enabled=false", "train.validate_at_end=false", f"train.max_steps={steps}",
            f"train.deepspeed_config=configs/deepspeed/zero{zero}.json"]

    check_ok(_launch("dico_scale/train.py", args("z2", 2, 2), ranks=2))
    for out in ("z1", "z3"):
        shutil.copytree(tmp_path / "z2" / "checkpoints", tmp_path / out / "checkpoints")
    # one rank: the refusal comes before anything is built, before the 2 -> 1 conversion too
    proc = _launch("dico_scale/train.py", args("z3", 3, 3) + ["train.resume=auto"], ranks=1)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dico_scale:")]
    assert lines == [f"dico_scale: config error: checkpoint {tmp_path / 'z3' / 'checkpoints' / TAG2} was saved "
                     "under ZeRO stage 2, the run is configured for stage 3 (train.deepspeed_config "
                     "configs/deepspeed/zero3.json): DeepSpeed resumes a checkpoint only under its own stage (1 "
                     "and 2 share one layout); resume it with train.deepspeed_config=configs/deepspeed/zero2.json"]
    assert not (tmp_path / "z3" / "checkpoints" / f"{TAG2}_universal").exists()
    proc = check_ok(_launch("dico_scale/train.py", args("z1", 1, 3) + ["train.resume=auto"], ranks=2))
    assert f"resumed from {tmp_path / 'z1' / 'checkpoints' / TAG2} at step 2" in proc.stdout
    assert "done: stage=xe step=3 " in proc.stdout


# ---- the arithmetic: a step after an elastic resume is the uninterrupted run's step --------------------------------

def _adam_step_from_scratch(weights: dict, x: torch.Tensor, lr: float) -> dict:
    """What the resumed step would give with the optimizer state lost: AdamW from zero moments (the control)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    model.load_state_dict(weights)
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model(x).pow(2).mean().backward()
    opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.distributed
def test_universal_resume_is_exact_and_carries_the_optimizer(tmp_path):
    for phase, ranks in (("w", 1), ("a", 2), ("b", 1)):
        check_ok(_launch("tests/distributed/elastic_check.py", [str(tmp_path), phase], ranks))
    for zero in (2, 3):
        d = tmp_path / f"z{zero}"
        seen = {k: v for phase in "wab" for k, v in json.loads((d / f"{phase}.json").read_text()).items()}

        def weights(label):
            return torch.load(d / f"{label}.pt", weights_only=True)["state_dict"]

        a2, w2 = _fp32(d / "A" / "checkpoints" / TAG2), _fp32(d / "W" / "checkpoints" / TAG2)
        # Right after the load: exactly the checkpoint's fp32 weights, the frozen layer included (the resumed runs
        # built it zeroed), 2 -> 1 and 1 -> 2, and from a kept, a damaged, a half-written and a stale conversion.
        for label in ("B", "B_again", "B_damaged", "B_half", "B_stale"):
            assert _max_diff(weights(f"{label}_loaded"), a2) == 0, (zero, label)
        assert _max_diff(weights("C_loaded"), w2) == 0
        # The step after the resume: the uninterrupted run's, within 1e-6 (the same fp32 sums, split over another
        # number of ranks: measured 0 to 1.5e-8). Without the Adam moments and step it would be off by far more.
        for resumed, uninterrupted in (("B", "U"), ("C", "V")):
            assert _max_diff(weights(f"{resumed}_final"), weights(f"{uninterrupted}_final")) < 1e-6
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1000))  # the loader's epoch 1, batch 0
        assert _max_diff(_adam_step_from_scratch(a2, x, lr=0.05), weights("U_final")) > 1e-3
        for label in ("B", "C"):  # the LR schedule and the global step continue; the flag is off after the load
            s = seen[label]
            assert (s["start_step"], s["universal"], s["lr"], s["universal_flag_after_load"]) == (2, True, 0.05, False)
            assert (s["step"], s["epoch"], s["batch_in_epoch"], s["end_batch_in_epoch"]) == (3, 0, 2, 1)
        # The save after an elastic resume is a complete checkpoint that resumes at its own size, exactly.
        assert not seen["B_reload"]["universal"] and seen["B_reload"]["start_step"] == 3
        assert _max_diff(weights("B_reload_loaded"), weights("B_final")) == 0
        # The kept conversion is reused; a damaged, half-written or stale one is not.
        universal = d / "A" / "checkpoints" / f"{TAG2}_universal"
        assert any(l.endswith(f"loading its universal conversion {universal} (converted earlier)")
                   for l in seen["B_again"]["log"])
        assert any(l.startswith(f"not using {universal}: {seen['B_damaged']['damaged']} has ") for l in
                   seen["B_damaged"]["log"])
        assert f"not using {universal}: no 'complete' marker (half-written); converting {universal.parent / TAG2} " \
               "again" in seen["B_half"]["log"] and not seen["B_half"]["tmp_left"]
        assert f"not using {universal}: converted from another {TAG2} (its marker differs); converting " \
               f"{universal.parent / TAG2} again" in seen["B_stale"]["log"]
        assert verify_local(universal) is None


# ---- pieces ----------------------------------------------------------------------------------------------------

def test_rescale_position_rounds_down_to_whole_micro_steps():
    assert rescale_position(4, 2, 2, 2, 2) == 4  # same sizes: unchanged
    assert rescale_position(2, 2, 2, 1, 2) == 4  # 8 samples: 4 batches of 2
    assert rescale_position(5, 1, 2, 2, 2) == 2  # 10 samples: 2 micro-steps of 4, 2 samples not counted
    assert rescale_position(3, 4, 8, 8, 4) == 3  # the same samples per micro-step


def test_changed_settings_name_what_a_resumed_run_changes():
    blank = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]
    saved = load_config(str(REPO / "configs/demo/dico.yaml"), blank)
    assert changed_settings(to_yaml(saved), saved) is None
    now = load_config(str(REPO / "configs/demo/dico.yaml"), blank + ["optim.lr=2e-5", "train.resume=auto"])
    assert changed_settings(to_yaml(saved), now) == "1 setting(s) differ from the checkpoint's: optim.lr 1e-05 -> 2e-05"
    # a checkpoint of an older release: a key it did not have, one it had under its old name (the same value)
    older = to_yaml(saved).replace("  length_penalty: 1.0\n", "")
    older = older.replace("  candidates: 5\n  max_len", "  beam_size: 5\n  max_len")
    assert "beam_size" in older and "length_penalty" not in older
    assert changed_settings(older, saved) == ("1 setting(s) differ from the checkpoint's: generation.length_penalty "
                                              "(not recorded) -> 1.0")
    many = load_config(str(REPO / "configs/demo/dico.yaml"), blank + [f"train.{k}=7" for k in
                                                                       ("seed", "log_every", "save_every", "keep_checkpoints")])
    line = changed_settings(to_yaml(saved), many, shown=2)
    assert line.startswith("4 setting(s) differ") and line.endswith(" and 2 more") and line.count("->") == 2


def test_settings_note_never_stops_a_resume(tmp_path):
    """The note is for the log: a tag without config.yaml, or with one that does not parse, still resumes."""
    cfg = load_config(str(REPO / "configs/demo/dico.yaml"),
                      ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="])
    assert settings_note(tmp_path, cfg) is None
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert settings_note(tmp_path, cfg) is None
    (tmp_path / "config.yaml").write_text("optim: [1, 2\n")
    note = settings_note(tmp_path, cfg)
    assert note.startswith(f"resuming {tmp_path} with this run's config; its config.yaml was not compared (")
    assert "\n" not in note


def test_fingerprints_of_files_folders_and_random_weights(tmp_path):
    from dico_scale.config import load_config

    f = tmp_path / "w.pt"
    f.write_bytes(b"abc" * 1000)
    assert fingerprint(str(f), seed=3) == {"path": str(f), "size": 3000, "sha256": sha256_of(f)[0]}
    assert fingerprint("", seed=3) == {"random": True, "seed": 3}
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    before = sha256_of(folder)
    (folder / "config.json").write_text("{ }")
    assert sha256_of(folder)[1] == 13 and sha256_of(folder)[0] != before[0]

    cfg = load_config("configs/demo/dico.yaml", ["train.init_from=", "evaluator.weights=",
                                                 "captioner.image_encoder_weights="])
    assert frozen_model_files(cfg) == {"reference weights (train.init_from)": "",
                                       "evaluator weights (evaluator.weights)": ""}
    cfg.dico.reward = "cider"  # the evaluator scores validation only: not part of what is trained
    assert frozen_model_files(cfg) == {"reference weights (train.init_from)": ""}
    cfg.train.stage, cfg.scst.reward = "scst", "0.5*evaluator+cider"
    assert frozen_model_files(cfg) == {"evaluator weights (evaluator.weights)": ""}
    cfg.train.stage = "xe"
    assert frozen_model_files(cfg) == {}
    # a Hugging Face row started from its folder: the reference is the folder's weights
    cfg.train.stage, cfg.captioner.model, cfg.captioner.hf_path = "dico", "hf_vlm", str(folder)
    assert frozen_model_files(cfg) == {"reference weights (captioner.hf_path)": str(folder)}
    cfg.train.init_from = str(f)
    assert frozen_model_files(cfg) == {"reference weights (train.init_from)": str(f)}

    lines = []
    now = {"evaluator weights (evaluator.weights)": {"random": True, "seed": 1}}
    check_fingerprints({"frozen_models": {"evaluator weights (evaluator.weights)": {"random": True, "seed": 1}}},
                       now, Path("t"), lines.append)
    assert lines == []
    with pytest.raises(ConfigError) as e:
        check_fingerprints({"frozen_models": {"evaluator weights (evaluator.weights)": {"random": True, "seed": 0}}},
                           now, Path("t"), lines.append)
    assert str(e.value).startswith("train.resume: the evaluator weights (evaluator.weights) differ from the ones "
                                   "checkpoint t started from: now drawn at random with train.seed=1; then drawn at "
                                   "random with train.seed=0")

    # the reference read from the folder then, from train.init_from now: still the same model, compared
    then = {"reference weights (captioner.hf_path)": fingerprint(str(folder), 0)}
    now = {"reference weights (train.init_from)": fingerprint(str(f), 0)}
    with pytest.raises(ConfigError) as e:
        check_fingerprints({"frozen_models": then}, now, Path("t"), lines.append)
    assert f"now {f}: 3000 bytes" in str(e.value) and f"then {folder}: 13 bytes" in str(e.value)
    check_fingerprints({"frozen_models": then}, {"reference weights (train.init_from)": then[
        "reference weights (captioner.hf_path)"]}, Path("t"), lines.append)  # the same content: fine
    # a checkpoint from before folders were fingerprinted recorded such a reference as random: not compared
    lines.clear()
    check_fingerprints({"frozen_models": {"reference weights (train.init_from)": {"random": True, "seed": 0}}},
                       {"reference weights (captioner.hf_path)": fingerprint(str(folder), 0)}, Path("t"),
                       lines.append)
    assert lines == ["warning: checkpoint t records no fingerprint of the reference weights (captioner.hf_path): "
                     "not checked"]


def test_a_resume_whose_model_shape_changed_names_the_setting(tmp_path):
    """captioner.width changed between a run and its resume: DeepSpeed's load fails on a size mismatch; that is one
    line naming the checkpoint and the changed setting, not torch's traceback (1 process: the same world size)."""
    from helpers import xe_args

    args = xe_args(tmp_path, tmp_path / "xe") + ["tracking.enabled=false"]
    check_ok(_launch("dico_scale/train.py", args + ["train.max_steps=1"], ranks=1))
    proc = _launch("dico_scale/train.py", args + ["train.max_steps=2", "train.resume=auto", "captioner.width=96"],
                   ranks=1)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("dico_scale:")]
    assert line.startswith(f"dico_scale: config error: checkpoint {tmp_path / 'xe' / 'checkpoints' / 'step_00000001'}"
                           " does not fit the configured model (RuntimeError: Error(s) in loading state_dict for "
                           "Captioner: size mismatch for "), line
    assert line.endswith("2 setting(s) differ from the checkpoint's: captioner.width 128 -> 96, train.max_steps 1 -> 2")


def test_a_resume_past_max_steps_says_it_trains_nothing(tiny_xe, tmp_path):
    """A step-2 checkpoint resumed with train.max_steps=1 exported the step-2 model and said only `done: step=2`."""
    import shutil

    from helpers import launch

    work = tmp_path / "xe"
    shutil.copytree(tiny_xe.parent, work)  # conftest's 2-step run: its checkpoint of step 2
    data = tiny_xe.parent.parent / "data"
    proc = check_ok(launch("dico_scale/train.py", "configs/demo/xe.yaml", [
        f"data.root={data}", "data.synthetic.n_train=40", "data.synthetic.n_val=8", "data.synthetic.n_test=8",
        "data.synthetic.samples_per_shard=10", "data.samples_per_epoch=40", f"train.output_dir={work}",
        "evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from=", "tracking.enabled=false",
        "train.validate_at_end=false", "train.max_steps=1", "train.resume=auto"], ranks=1, timeout=300))
    assert ("resumed at step 2, past train.max_steps=1: nothing to train; exporting step 2 (raise train.max_steps "
            "to train on)") in proc.stdout.splitlines()
    assert "done: stage=xe step=2 " in proc.stdout
