"""What must fail before training starts, in seconds, with one line: numeric keys out of range, a DeepSpeed config
that is not JSON, an output directory that cannot be written, a tracking server that does not answer. And the one
exit-code table that the entry points, the Slurm scripts and docs/operations.md follow."""
import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dico_scale import exit_codes
from dico_scale.checks import RANGES
from dico_scale.config import Config, ConfigError, load_config
from dico_scale.loop import data_summary

REPO = Path(__file__).resolve().parent.parent
XE = str(REPO / "configs" / "demo" / "xe.yaml")
BLANK = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]


def _numeric_keys(node=Config(), prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(node):
        val = getattr(node, f.name)
        if dataclasses.is_dataclass(val):
            out += _numeric_keys(val, f"{prefix}{f.name}.")
        elif isinstance(val, (int, float)) and not isinstance(val, bool):
            out.append(f"{prefix}{f.name}")
    return out


def test_every_numeric_key_has_a_checked_and_documented_range():
    assert sorted(_numeric_keys()) == sorted(k for k, *_ in RANGES)
    source = (REPO / "dico_scale" / "config.py").read_text()
    for key in _numeric_keys():
        line = next(l for l in source.splitlines() if re.match(rf"\s+{key.rsplit('.', 1)[1]}: (int|float) = ", l))
        assert re.search(r"#\s*(>= -?\d|[\[(]-?\d)", line), f"{key}: no range in its comment: {line.strip()}"


@pytest.mark.parametrize("override,needle", [
    ("dico.tau=-1", "'dico.tau': -1.0 must lie in [0, 1000000.0]"),
    ("dico.tau=1e39", "'dico.tau': 1e+39 must lie in [0, 1000000.0]"),  # inf in float32
    ("dico.beta=0", "'dico.beta': 0.0 must lie in [1e-06, 1000000.0]"),
    ("dico.beta=1e-300", "'dico.beta': 1e-300 must lie in [1e-06, 1000000.0]"),  # 0 in float32: no gradient
    ("generation.temperature=1e-40", "'generation.temperature': 1e-40 must lie in [0.0001, 10000.0]"),
    ("dico.beta=inf", "'dico.beta': inf is not a finite number"),
    ("optim.lr=nan", "'optim.lr': nan is not a finite number"),
    ("optim.beta2=1.0", "'optim.beta2': 1.0 must lie in [0, 1)"),
    ("optim.eps=0", "'optim.eps': 0.0 must lie in (0, inf)"),
    ("optim.min_lr_ratio=1.5", "'optim.min_lr_ratio': 1.5 must lie in [0, 1]"),
    ("captioner.dropout=1", "'captioner.dropout': 1.0 must lie in [0, 1)"),
    ("captioner.decoder_layers=0", "'captioner.decoder_layers': 0 must be >= 1"),
    ("data.shuffle_buffer=-1", "'data.shuffle_buffer': -1 must be >= 0"),
    ("data.synthetic.image_size=4", "'data.synthetic.image_size': 4 must lie in [32, 1024]"),
    ("train.stop_timeout_s=0", "'train.stop_timeout_s': 0.0 must lie in (0, 86400]"),
    ("tracking.connect_timeout_s=-2", "'tracking.connect_timeout_s': -2.0 must lie in (0, 86400]"),
    ("tracking.connect_timeout_s=1e300", "'tracking.connect_timeout_s': 1e+300 must lie in (0, 86400]"),
    ("tracking.retry_every_s=1e-300", "'tracking.retry_every_s': 1e-300 must lie in [0.1, 86400]"),
])
def test_out_of_range_values_fail_with_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(XE, BLANK + [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def _train(tmp_path, *overrides, timeout=60):
    cmd = [sys.executable, "dico_scale/train.py", "--config", XE, *BLANK, f"data.root={tmp_path}/data",
           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - start


def _train_in_process(tmp_path, monkeypatch, capsys, *overrides):
    """dico_scale.train.main with _train's arguments, in this process, for a config error that the preflight checks
    find before anything is built (test_deepspeed_config_with_invalid_json_fails_naming_the_file runs the real CLI):
    its exit code and what it printed, as _train's process. A run that got past them would start a process group in
    pytest's process: it fails the test instead."""
    from types import SimpleNamespace

    from dico_scale import supervision, train

    def got_past_the_checks(cfg):
        raise AssertionError("dico_scale.train got past the preflight checks")

    monkeypatch.setattr(train, "run", got_past_the_checks)
    monkeypatch.setattr(supervision, "_launchers", None)  # main() records the launcher chain once per process
    capsys.readouterr()
    start = time.time()
    code = train.main(["--config", XE, *BLANK, f"data.root={tmp_path}/data",
                       f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides])
    took = time.time() - start
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err), took


def _one_error_line(proc) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("dico_scale: config error: "), proc.stderr[-3000:]
    return lines[-1]


def test_fp16_on_a_cpu_without_fp16_fails_before_any_process_group(tmp_path):
    import torch

    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        pytest.skip("this CPU has oneDNN fp16: DeepSpeed trains fp16 on it")
    proc, took = _train(tmp_path, "train.precision=fp16", "train.device=cpu")
    assert proc.returncode == exit_codes.CONFIG_ERROR
    assert _one_error_line(proc).startswith("dico_scale: config error: train.precision=fp16 needs a GPU")
    assert took < 30 and not (tmp_path / "mlflow.db").exists()


def test_cuda_asked_for_where_torch_sees_none_fails_before_anything_is_built(tmp_path, monkeypatch, capsys):
    """DeepSpeed would pick its CPU accelerator and train there (the GPU check's harness, run on a CPU, did)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on a GPU machine too
    proc, took = _train_in_process(tmp_path, monkeypatch, capsys, f"train.output_dir={tmp_path}/run",
                                   "train.device=cuda")
    assert proc.returncode == exit_codes.CONFIG_ERROR
    assert _one_error_line(proc) == ("dico_scale: config error: train.device=cuda, but torch sees no CUDA device here "
                                     "(train.device=auto uses one when there is one)")
    assert took < 30 and not (tmp_path / "run").exists()


def test_deepspeed_config_with_invalid_json_fails_naming_the_file(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "zero.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    proc, took = _train(tmp_path, f"train.deepspeed_config={bad}")
    assert proc.returncode == exit_codes.CONFIG_ERROR
    assert _one_error_line(proc) == (f"dico_scale: config error: train.deepspeed_config '{bad}': invalid JSON: "
                                     "Expecting property name enclosed in double quotes at line 1 column 35")
    assert took < 30
    bad.write_text('{"zero_optimization": {"stage": 5}}')
    proc, _ = _train_in_process(tmp_path, monkeypatch, capsys, f"train.deepspeed_config={bad}")
    assert proc.returncode == exit_codes.CONFIG_ERROR
    assert _one_error_line(proc).endswith("zero_optimization.stage 5 is not 0, 1, 2 or 3")


def test_output_dir_that_cannot_be_created_fails_before_anything_is_built(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc, took = _train_in_process(tmp_path, monkeypatch, capsys, f"train.output_dir={blocker}/run")
    assert proc.returncode == exit_codes.CONFIG_ERROR
    assert _one_error_line(proc) == (f"dico_scale: config error: train.output_dir '{blocker}/run' cannot be created "
                                     "or written: Not a directory")
    assert took < 30 and not (tmp_path / "data").exists()  # failed before the data were even generated


def test_an_output_dir_inside_another_run_s_checkpoints_is_refused(tmp_path, monkeypatch, capsys):
    """Its saves empty a tag folder before writing it and prune old ones: a run nested there was deleted unsaid."""
    ckpt = tmp_path / "base" / "checkpoints"
    (ckpt / "step_00000003").mkdir(parents=True)
    for nested in (ckpt / "step_00000003" / "run", ckpt):
        proc, _ = _train_in_process(tmp_path, monkeypatch, capsys, f"train.output_dir={nested}")
        assert proc.returncode == exit_codes.CONFIG_ERROR
        assert _one_error_line(proc) == (f"dico_scale: config error: train.output_dir '{nested}' lies in the "
                                         f"checkpoints of the run {tmp_path}/base, whose saves empty and prune the "
                                         "folders there: give the run a folder of its own")
    (tmp_path / "mine" / "checkpoints").mkdir(parents=True)  # a folder of that name holding no run is anyone's
    from dico_scale.preflight import run_checkpoints_holding
    assert run_checkpoints_holding(str(tmp_path / "mine" / "checkpoints" / "run")) is None


@pytest.mark.parametrize("override", ["train.output_dir=~/out", "data.root=~/data", "tracking.uri=sqlite:///~/m.db"])
def test_a_path_starting_with_a_tilde_is_refused(override):
    """Nothing expands it: the run wrote into a folder named '~' in the working directory."""
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError) as e:
        load_config(XE, BLANK + [override])
    assert f"'{key}': '{value}': nothing here expands '~'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("what", ["file", "dangling link"])
def test_a_checkpoints_folder_that_cannot_hold_checkpoints_fails_before_anything_is_built(tmp_path, monkeypatch,
                                                                                          capsys, what):
    """<output_dir>/checkpoints a file, or a link to a scratch volume that is not mounted: the first save failed after
    the first steps (on 2 ranks it hung until gloo's timeout)."""
    out = tmp_path / "run"
    out.mkdir()
    if what == "file":
        (out / "checkpoints").write_text("not a folder")
        why = "not a folder"
    else:
        (out / "checkpoints").symlink_to(tmp_path / "scratch" / "ckpt")
        why = f"a link to '{tmp_path}/scratch/ckpt', which does not exist"
    proc, took = _train_in_process(tmp_path, monkeypatch, capsys, f"train.output_dir={out}")
    assert proc.returncode == exit_codes.CONFIG_ERROR
    assert _one_error_line(proc) == (f"dico_scale: config error: train.output_dir '{out}': its checkpoints folder "
                                     f"'{out}/checkpoints' cannot hold checkpoints: {why}")
    assert took < 30 and not (tmp_path / "data").exists()


def test_unreachable_tracking_server_fails_in_seconds_naming_the_uri(tmp_path, monkeypatch, capsys):
    proc, took = _train_in_process(tmp_path, monkeypatch, capsys, f"train.output_dir={tmp_path}/run",
                                   "tracking.uri=http://127.0.0.1:1")
    assert proc.returncode == exit_codes.CONFIG_ERROR
    line = _one_error_line(proc)
    assert line.startswith("dico_scale: config error: tracking server 'http://127.0.0.1:1' is unusable: no answer "
                           "from http://127.0.0.1:1/health within 10 s (")
    assert line.endswith("(tracking.required=false trains without it)")
    assert took < 30


@pytest.mark.parametrize("form", ["path", "file URI"])
def test_a_tracking_uri_that_is_a_regular_file_fails_before_anything_is_built(tmp_path, monkeypatch, capsys, form):
    """MLflow's client failed on it on rank 0 alone, once the models were built, calling the file 'a folder as store',
    while rank 1 waited for rank 0 in a collective (a gloo traceback): every rank's preflight stops it now."""
    notes = tmp_path / "afile.txt"
    notes.write_text("not a store")
    uri = str(notes) if form == "path" else notes.as_uri()
    proc, took = _train_in_process(tmp_path, monkeypatch, capsys, f"train.output_dir={tmp_path}/run",
                                   f"tracking.uri={uri}")
    assert proc.returncode == exit_codes.CONFIG_ERROR
    assert _one_error_line(proc) == (f"dico_scale: config error: tracking store '{uri}' is unusable: it is a regular "
                                     "file, neither a folder store nor an sqlite:/// URI; a tracking.uri is "
                                     "http(s)://<host>:<port>, sqlite:///<folder>/mlflow.db or a folder "
                                     "(tracking.required=false trains without it)")
    assert took < 30


def test_unreachable_tracking_server_can_be_skipped_with_a_warning(tmp_path):
    proc, _ = _train(tmp_path, f"train.output_dir={tmp_path}/run", "tracking.uri=http://127.0.0.1:1",
                     "tracking.required=false", "tracking.connect_timeout_s=2", "train.max_steps=1",
                     "train.micro_batch_size=2", "data.synthetic.n_train=20", "data.synthetic.n_val=2",
                     "data.synthetic.n_test=2", "data.synthetic.samples_per_shard=10", "data.samples_per_epoch=4",
                     "train.val_max_images=2", "generation.max_len=4", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("dico_scale: warning: tracking server")]
    assert len(warnings) == 1 and warnings[0].endswith("training without tracking (tracking.required=false)")
    assert (tmp_path / "run" / "model.pt").is_file()
    assert "done: stage=xe step=1" in proc.stdout
    assert re.search(r"^data: \d+ samples read, 0 skipped \(0\.00%\); faults: none$", proc.stdout, re.M)  # the summary


def test_data_summary_and_the_warning_below_the_minimum():
    from collections import Counter
    lines = data_summary(Counter(read=10, skipped=4, corrupt_image=3, bad_json=1), 0.01, 1000)
    assert lines == ["data: 10 samples read, 4 skipped (40.00%); faults: corrupt_image 3, bad_json 1",
                     "warning: the skipped share 40.00% is past data.max_skipped_share=0.01, which is enforced only "
                     "once data.skipped_share_min_samples=1000 samples were read"]
    assert data_summary(Counter(read=2000, skipped=1), 0.01, 1000) == [
        "data: 2000 samples read, 1 skipped (0.05%); faults: none"]


def test_one_exit_code_table_for_the_entry_points_scripts_and_docs():
    assert exit_codes.TABLE == {"OK": 0, "FAILED": 1, "CONFIG_ERROR": 2, "PREEMPTED": 3, "DATA_ERROR": 4,
                                 "INTERRUPTED": 130}
    shell = subprocess.run([sys.executable, "-m", "dico_scale.exit_codes"], cwd=REPO, capture_output=True, text=True)
    assert shell.stdout.split() == [f"{k}_EXIT={v}" for k, v in exit_codes.TABLE.items()]
    # launch.sh reads the table (outside an allocation it stops with CONFIG_ERROR)
    proc = subprocess.run(["bash", "slurm/launch.sh"], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == exit_codes.CONFIG_ERROR and "not inside a Slurm allocation" in proc.stderr
    for script in ("slurm/launch.sh", "slurm/torchrun.py", "dico_scale/train.py", "dico_scale/loop.py"):
        text = (REPO / script).read_text()
        assert not re.search(r"\b(PREEMPTED_EXIT|DATA_ERROR_EXIT)\s*=\s*\d", text), script  # no private copies
    page = (REPO / "docs" / "operations.md").read_text()  # the table the README points to
    rows = dict(re.findall(r"^\s*\| (\d+) \| `(\w+)` \|", page, re.M))
    assert {v: int(k) for k, v in rows.items()} == exit_codes.TABLE


@pytest.mark.parametrize("knob, line", [
    ({"CONFIG": "configs/demo"}, "CONFIG=configs/demo is a folder: name a config file in it (e.g. "
                                 "configs/demo/dico.yaml)"),
    ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE=0 is not a number of ranks per node (>= 1; unset: the node's GPUs)"),
    ({"GPUS_PER_NODE": "abc"}, "GPUS_PER_NODE=abc is not a number of ranks per node"),
    ({"MASTER_PORT": "abc"}, "MASTER_PORT=abc is not a port (1-65535; unset: 15000 + the job id % 20000)"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a port"),
    ({"PREEMPT_SIGNAL": "BOGUS"}, "PREEMPT_SIGNAL=BOGUS is not a signal name (USR1, the default; what #SBATCH "
                                  "--signal=B:<SIG> sends)"),
    ({"PREEMPT_SIGNAL": "10"}, "PREEMPT_SIGNAL=10 is not a signal name"),
])
def test_the_slurm_launcher_refuses_bad_knobs_in_one_line_before_any_node_starts(knob, line):
    """In the batch shell (a job id is all it reads of the allocation before them): torchrun on every node would
    fail on them with a traceback, a bad signal name only once its trap was set."""
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "SLURM_JOB_ID": "7", "CONFIG": "configs/demo/xe.yaml",
           **knob}
    proc = subprocess.run(["bash", "slurm/launch.sh"], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == exit_codes.CONFIG_ERROR and len(err) == 1 and err[0].startswith(f"launch.sh: {line}"), err


@pytest.mark.distributed
def test_torchrun_stopped_by_sigterm_says_so_in_one_line(tmp_path):
    """scancel's SIGTERM to the Slurm launcher's torchrun: it stops its ranks and says so; no traceback."""
    import signal
    import time

    from helpers import free_port

    script = tmp_path / "wait.py"
    script.write_text(f"import os, time\nopen('{tmp_path}/ready.' + os.environ['RANK'], 'w').close()\n"
                      "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "slurm/torchrun.py", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), str(script)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while len(list(tmp_path.glob("ready.*"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "torchrun: stopped by SIGTERM, and its ranks with it", err[-3000:]


def test_leave_runs_the_atexit_handlers_flushes_and_keeps_the_code(tmp_path):
    """The entry points end with exit_codes.leave (no interpreter teardown): what atexit handlers write (the tracker's
    sender), buffered output and the exit code must all survive it."""
    marker = tmp_path / "atexit.txt"
    script = ("import atexit, sys\nfrom dico_scale.exit_codes import leave\n"
              f"atexit.register(lambda: open({str(marker)!r}, 'w').write('sent'))\n"
              "sys.stdout.write('buffered, no newline'); sys.stderr.write('err')\nleave(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "buffered, no newline", "err")
    assert marker.read_text() == "sent"
    none = subprocess.run([sys.executable, "-c", "from dico_scale.exit_codes import leave; leave(None)"], cwd=REPO)
    assert none.returncode == 0


@pytest.mark.distributed
@pytest.mark.parametrize("codes, launcher_code", [((2, 2), 2), ((1, 3), 3), ((2, 1), 1), ((None, 2), 2)])
def test_slurm_torchrun_passes_the_ranks_exit_code_on(tmp_path, codes, launcher_code):
    """Plain torchrun turns every rank failure into 1; the Slurm launcher's wrapper keeps the trainer's code. None: a
    rank still working when the other fails, which torchrun stops with SIGTERM (it does not vote).

    A rank with a code is on its way out with it, as a trainer checkpointing after a preemption is: the SIGTERM torchrun
    sends once the other rank's exit is seen does not change its code. Both install that before either exits (a file
    barrier), so which exit torchrun polls first does not decide the outcome. They leave as the trainer does
    (exit_codes.leave: no interpreter teardown): sys.exit's teardown puts SIGTERM's default action back, and a SIGTERM
    arriving then killed a rank that was exiting with its code (-15, no vote; CI-like run of 0c522be, codes (2, 1))."""
    from helpers import free_port

    script = tmp_path / "exit.py"
    script.write_text(f"import os, signal, time\nfrom dico_scale.exit_codes import leave\n"
                      f"rank = int(os.environ['RANK'])\ncode = {list(codes)}[rank]\n"
                      "if code is not None:\n    signal.signal(signal.SIGTERM, lambda *_: leave(code))\n"
                      f"open(f'{tmp_path}/ready.{{rank}}', 'w').close()\n"
                      f"while not all(os.path.exists(f'{tmp_path}/ready.{{r}}') for r in (0, 1)):\n"
                      "    time.sleep(0.01)\n"
                      "time.sleep(120) if code is None else leave(code)\n")
    proc = subprocess.run([sys.executable, "slurm/torchrun.py", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == launcher_code, proc.stderr[-2000:]
    assert ("Root Cause" in proc.stderr) == (launcher_code == 1), proc.stderr[-2000:]  # its banner: failures alone
