"""Data faults injected into real tar shards: each is skipped, counted under its kind in the batches' data_stats
(in-process and in DataLoader workers), logged on one line; the skipped-share bound stops a real 2-rank run."""
import io
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from helpers import mlflow_uri, ranks_cmd
from torchvision import transforms

from dico_scale.data import pipeline
from dico_scale.data.pipeline import Collate, DataError, eval_loader, train_loader
from dico_scale.data.synthetic import render_sample
from dico_scale.data.tokenizer import CaptionTokenizer

REPO = Path(__file__).resolve().parent.parent
SAMPLE_FAULTS = {"corrupt_image": 2, "bad_json": 3, "empty_captions": 2}


@pytest.fixture(scope="module")
def collate():
    pre = transforms.Compose([transforms.Resize(32), transforms.ToTensor()])
    return Collate(pre, None, CaptionTokenizer(), 24, seed=0)


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                _add(tar, f"{key}.{ext}", data)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """faults.tar: 7 bad samples, then 6 good ones; trunc.tar: 8 good, cut inside a JPEG past half of the file;
    good.tar: 4 good; missing.tar: never written."""
    tmp, rng = tmp_path_factory.mktemp("faults"), random.Random(0)

    def good(key):
        img, caps = render_sample(rng, 64)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        return key, {"jpg": buf.getvalue(), "json": json.dumps(caps).encode()}

    jpg = good("x")[1]["jpg"]
    bad = [("bad_jpg", {"jpg": bytes(rng.getrandbits(8) for _ in range(3000)), "json": b'["a red circle"]'}),
           ("cut_jpg", {"jpg": jpg[: len(jpg) // 2], "json": b'["a red circle"]'}),
           ("no_json", {"jpg": jpg}),
           ("bad_json", {"jpg": jpg, "json": b'["a red circle", "unterminated'}),
           ("not_a_list", {"jpg": jpg, "json": b'"a red circle"'}),
           ("empty_refs", {"jpg": jpg, "json": b"[]"}),
           ("blank_caption", {"jpg": jpg, "json": b'["a red circle", "  "]'})]
    goods = [good(f"f_good_{i}") for i in range(6)]
    _write(tmp / "faults.tar", bad + goods)
    _write(tmp / "good.tar", [good(f"g_{i}") for i in range(4)])
    full = [good(f"t_{i}") for i in range(8)]
    _write(tmp / "full.tar", full)
    data = (tmp / "full.tar").read_bytes()
    with tarfile.open(tmp / "full.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name.endswith(".jpg") and m.offset_data + m.size > len(data) // 2)
    (tmp / "trunc.tar").write_bytes(data[: cut.offset_data + cut.size // 2])
    before_cut = [k for k, _ in full][: [k for k, _ in full].index(cut.name[:-4])]
    assert len(before_cut) >= 2
    p = {n: str(tmp / f"{n}.tar") for n in ("faults", "trunc", "missing")}
    return {**p, "clean": str(tmp / "good.tar"), "bad": [k for k, _ in bad],
            "good": [k for k, _ in goods] + [f"g_{i}" for i in range(4)] + before_cut}


def _sum_stats(batches) -> Counter:
    total = Counter()
    for b in batches:
        total.update(b["data_stats"])
    return total


def _eval(spec, collate, workers):
    batches = list(eval_loader(spec, collate, batch_size=64, num_workers=workers))  # one partial batch per reader:
    return [k for b in batches for k in b["keys"]], _sum_stats(batches)  # it carries all the reader's counts


@pytest.mark.parametrize("workers", [0, 2])
def test_each_fault_counted_once_by_kind(shards, collate, workers, clean_env):
    spec = [shards["missing"], shards["trunc"], shards["faults"], shards["clean"]]  # 2 workers: 2 shards each
    keys, stats = _eval(spec, collate, workers)
    assert sorted(keys) == sorted(shards["good"])
    assert stats == {**SAMPLE_FAULTS, "truncated_tar": 1, "missing_shard": 1, "skipped": 9,
                     "read": 13 + len(shards["good"]) - 6 + 2}  # samples read + failed shards


def test_sample_split_counts_shard_faults_once(shards, collate, clean_env, monkeypatch):
    """Fewer shards than 2 ranks x 2 workers: every reader reads every shard, only one counts its failure."""
    keys, stats = [], Counter()
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        k, s = _eval([shards["faults"], shards["missing"]], collate, 2)
        keys, stats = keys + k, stats + s
    assert sorted(keys) == sorted(k for k in shards["good"] if k.startswith("f_"))
    assert stats == {**SAMPLE_FAULTS, "missing_shard": 1, "skipped": 8, "read": 14}


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_counts_every_kind(shards, collate, workers, clean_env):
    spec = [shards["missing"], shards["trunc"], shards["faults"], shards["clean"]]
    loader, n = train_loader(spec, collate, batch_size=4, samples_per_epoch=96, world_size=1, num_workers=workers,
                             shuffle_buffer=8, seed=0)
    batches = list(loader)
    stats = _sum_stats(batches)
    assert len(batches) == n == 24
    assert set(k for b in batches for k in b["keys"]) <= set(shards["good"])
    assert all(stats[k] > 0 for k in ("corrupt_image", "bad_json", "empty_captions", "truncated_tar",
                                      "missing_shard")), stats
    assert stats["skipped"] == sum(stats[k] for k in pipeline.KINDS) and stats["other"] == 0
    assert stats["bad_json"] >= stats["corrupt_image"]  # 3 and 2 per pass over faults.tar (less in the last one)
    assert stats["read"] >= 96 + stats["skipped"]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_the_processor_refuses_is_a_fault_not_a_failed_batch(vlm_folders, tmp_path, workers, clean_env):
    """Qwen2-VL's processor refuses an aspect ratio past 200: that sample is one refused_image fault, skipped, and
    the batches hold the other images, in training, in-loop validation and evaluate's collate alike (it failed the
    whole batch, and so the run, before)."""
    from PIL import Image

    from dico_scale.config import load_config
    from dico_scale.eval_data import EvalCollate
    from dico_scale.models import build_captioner

    cfg = load_config(str(REPO / "configs/demo/xe.yaml"), ["evaluator.weights=", "captioner.image_encoder_weights=",
                                                            "captioner.model=hf_vlm",
                                                            f"captioner.hf_path={vlm_folders['qwen2-vl']}"])
    cap = build_captioner(cfg)

    def sample(key, size):
        buf = io.BytesIO()
        Image.new("RGB", size, (0, 90, 200)).save(buf, "JPEG")
        return key, {"jpg": buf.getvalue(), "json": b'["a blue shape"]'}
    _write(tmp_path / "a.tar", [sample(f"ok_{i}", (64, 48)) for i in range(3)] + [sample("strip", (3000, 10))])
    _write(tmp_path / "b.tar", [sample(f"ok_{i}", (40, 64)) for i in range(3, 5)])
    spec = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    clip = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])  # an evaluator's own pixels
    collate, evaluate = Collate(cap.preprocess, clip, cap.tokenizer, 24, seed=0), EvalCollate(cap.preprocess,
                                                                                              {"clips": clip})
    ok = {f"ok_{i}" for i in range(5)}
    for c in (collate, evaluate):
        batches = list(eval_loader(spec, c, batch_size=3, num_workers=workers))
        assert sorted(k for b in batches for k in b["keys"]) == sorted(ok)
        assert _sum_stats(batches) == {"read": 6, "skipped": 1, "refused_image": 1}
        assert sum(b["pixels"]["input_ids"].size(0) for b in batches) == 5
    loader, n = train_loader(spec, collate, batch_size=2, samples_per_epoch=8, world_size=1, num_workers=workers,
                             shuffle_buffer=2, seed=0)
    batches = list(loader)
    assert len(batches) == n == 4 and {k for b in batches for k in b["keys"]} <= ok
    assert all(b["pixels"]["input_ids"].size(0) == 2 and b["eval_pixels"].size(0) == 2 for b in batches)


def test_each_fault_logged_on_one_line_with_key_or_shard(shards, collate, caplog, clean_env):
    spec = [shards["missing"], shards["trunc"], shards["faults"], shards["clean"]]
    with caplog.at_level(logging.WARNING, logger="dico_scale.data.pipeline"):
        _eval(spec, collate, 0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 9 and all("\n" not in m and m.startswith("data fault ") for m in lines)
    for key in shards["bad"]:
        assert sum(f" {key} in " in m for m in lines) == 1, key
    assert sum(m.startswith(f"data fault missing_shard: {shards['missing']}") for m in lines) == 1
    assert sum(m.startswith(f"data fault truncated_tar: {shards['trunc']}") for m in lines) == 1


def test_pipe_sources_read_and_fail_at_read_time(shards, collate, clean_env):
    """pipe: commands are read the webdataset way; one that fails before any data is a missing shard."""
    keys, stats = _eval([f"pipe:cat {shards['clean']}", "pipe:cat /nowhere/x.tar"], collate, 0)
    assert sorted(keys) == [f"g_{i}" for i in range(4)]
    assert stats == {"read": 4 + 1, "missing_shard": 1, "skipped": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dead_stream_raises_instead_of_spinning(collate, workers, clean_env, caplog):
    """Every shard fails (a remote source gone): the resampled stream would spin forever; it raises DataError,
    whose message is one line also when torch re-raises it from a worker with the worker's traceback."""
    loader, _ = train_loader("pipe:cat /nowhere/x.tar", collate, 2, 8, 1, workers, 4, 0)
    with caplog.at_level(logging.WARNING, logger="dico_scale.data.pipeline"), pytest.raises(DataError) as e:
        list(loader)
    n = pipeline.MAX_EMPTY_SHARDS
    assert pipeline.one_line(e.value) == f"no data in the last {n} shards read (last: pipe:cat /nowhere/x.tar)"
    logged = sum(r.getMessage().startswith("data fault missing_shard") for r in caplog.records)
    assert logged == (n if workers == 0 else 0)  # a worker logs to its own stderr


def _text_images(path, n: int, prefix: str = "t") -> str:
    """A shard of n samples whose .jpg is text: nothing in it is usable."""
    _write(path, [(f"{prefix}_{i}", {"jpg": b"not an image", "json": b'["a red circle"]'}) for i in range(n)])
    return str(path)


def _spin_guard(monkeypatch, limit: int) -> None:
    """A stream still going after `limit` faults (in this process or a forked worker) fails the test, not hangs it."""
    calls, real = [0], pipeline.log_fault

    def counted(*args):
        calls[0] += 1
        assert calls[0] <= limit, f"still reading after {limit} faults"
        real(*args)
    monkeypatch.setattr(pipeline, "log_fault", counted)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stream_with_nothing_usable_raises_instead_of_spinning(tmp_path, collate, workers, clean_env, caplog,
                                                                 monkeypatch):
    """Every sample is bad but every shard has files (the empty-shard rule never fires): the resampled stream
    skipped samples forever, also with data.max_skipped_share=1.0; it raises DataError once 100 shards in a row
    gave no usable sample, after at most those shards' samples."""
    dead = _text_images(tmp_path / "dead.tar", 5)
    _spin_guard(monkeypatch, 10 * 5 * pipeline.MAX_DRY_SHARDS)
    loader, _ = train_loader([dead], collate, 2, 10**6, 1, workers, 8, 0)
    with caplog.at_level(logging.WARNING, logger="dico_scale.data.pipeline"), pytest.raises(DataError) as e:
        list(loader)
    n = pipeline.MAX_DRY_SHARDS
    found = re.fullmatch(rf"no usable sample in the last {n} shards read \((\d+) samples in a row skipped; "
                         rf"last: {re.escape(dead)}\)", pipeline.one_line(e.value))
    assert found, pipeline.one_line(e.value)
    skipped = int(found.group(1))
    assert n * 5 - 8 - 5 <= skipped <= n * 5  # 100 shards of 5, less the shuffle buffer's 8 not yet decoded
    logged = sum(r.getMessage().startswith("data fault corrupt_image") for r in caplog.records)
    assert logged == (skipped if workers == 0 else 0)  # a worker logs to its own stderr


def test_a_long_run_of_bad_samples_in_good_data_does_not_stop_training(tmp_path, collate, clean_env):
    """A wholly bad shard of more samples than the dead-stream rule's 100 (runs of 120 bad samples in a row),
    resampled with a good one: training goes on (a rule counting samples alone would stop it)."""
    spec = [_text_images(tmp_path / "bad.tar", 120), str(tmp_path / "good.tar")]
    _write(spec[1], [(f"g_{i}", {"jpg": _jpeg(), "json": b'["a red circle"]'}) for i in range(4)])
    loader, n = train_loader(spec, collate, 4, 80, 1, 0, 8, 0)
    batches = list(loader)
    stats = _sum_stats(batches)
    assert len(batches) == n == 20 and stats["corrupt_image"] >= 2 * 120, stats


def _jpeg() -> bytes:
    buf = io.BytesIO()
    render_sample(random.Random(0), 32)[0].save(buf, "JPEG")
    return buf.getvalue()


def _train_alone(tmp_path, spec: str, *overrides: str) -> tuple[int, str, list[str]]:
    """(exit code, stderr, its `dico_scale:` lines) of train.py in one process on the shard spec. Its session is
    killed if it overruns: a DataLoader worker spinning on dead data outlives a killed trainer."""
    cmd = [sys.executable, "dico_scale/train.py", "--config", "configs/demo/xe.yaml", "data.synthetic.enabled=false",
           f"data.train_shards={spec}", "data.val_shards=", f"train.output_dir={tmp_path}/out",
           "tracking.enabled=false", "evaluator.weights=", "captioner.image_encoder_weights=",
           "train.validate_at_end=false", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        err = proc.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, err, [line for line in err.splitlines() if line.startswith("dico_scale:")]


def test_training_on_nothing_usable_ends_with_one_data_error(tmp_path):
    """The trainer (one process, a DataLoader worker) on a shard of text images with data.max_skipped_share=1.0:
    exit 4 and one line, not a run that never takes a step."""
    dead = _text_images(tmp_path / "dead.tar", 5)
    code, err, lines = _train_alone(tmp_path, dead, "data.max_skipped_share=1.0", "data.num_workers=1",
                                    "data.shuffle_buffer=8")
    assert code == 4 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert re.fullmatch(rf"dico_scale: data error: no usable sample in the last {pipeline.MAX_DRY_SHARDS} shards "
                        rf"read \(\d+ samples in a row skipped; last: {re.escape(dead)}\)", lines[0]), lines[0]


def test_shard_specs_that_name_no_shard_are_one_line_config_errors(tmp_path):
    """Unbalanced braces (a braceexpand traceback before), a folder (passed the check, then 100 'Is a directory'
    faults and exit 4) and a glob (no hint that webdataset does not expand it), for the config and evaluate."""
    from dico_scale.config import ConfigError
    from dico_scale.data.pipeline import check_local_shards
    from dico_scale.eval_data import check_shards

    folder = tmp_path / "data"
    folder.mkdir()
    _text_images(folder / "train-00000.tar", 1)
    forms = "(a spec is a tar file, a brace pattern like train-{00000..00009}.tar, or such specs joined by '::')"
    globs = " (globs are not expanded: name the shards with a brace pattern like train-{00000..00009}.tar)"
    key = "bad value for config key 'data.train_shards'"
    braces = f"{folder}/train-{{00000..00003.tar"
    cases = {braces: f"{key}: unbalanced braces in '{braces}' {forms}",
             str(folder): f"{key}: '{folder}' is a folder, not a shard {forms}",
             f"{folder}/train-0000?.tar::{folder}": f"{key}: '{folder}' is a folder, not a shard {forms}",
             f"{folder}/train-*.tar": f"{key}: no shard of '{folder}/train-*.tar' exists{globs}"}
    for spec, message in cases.items():
        with pytest.raises(ConfigError) as e:
            check_local_shards(spec, "data.train_shards")
        assert str(e.value) == message
    with pytest.raises(ConfigError) as e:
        check_shards(str(folder), "--shards")
    assert str(e.value) == f"bad shard spec '{folder}' (--shards): '{folder}' is a folder, not a shard {forms}"
    with pytest.raises(ConfigError) as e:
        check_shards(f"{folder}/*.tar", "--shards")
    assert str(e.value) == (f"bad shard spec '{folder}/*.tar' (--shards): 1 of 1 shards not found, e.g. "
                            f"'{folder}/*.tar'{globs}")


def test_training_on_a_bad_shard_spec_is_exit_2(tmp_path):
    """Through the trainer: one line naming the key, exit 2 (a traceback and exit 1 before; the other specs' messages:
    the test above)."""
    _text_images(tmp_path / "train-00000.tar", 1)
    spec = f"{tmp_path}/train-{{00000..00003.tar"
    code, err, lines = _train_alone(tmp_path, spec)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("dico_scale: config error: bad value for config key 'data.train_shards': ")
    assert f"'{spec}'" in lines[0]


def test_loaders_in_one_process_keep_their_own_counts(shards, collate, clean_env):
    """A training loader left mid-stream (its shuffle buffer read ahead, num_workers=0), then an evaluation pass in
    the same process: the evaluation's counts are its own reads alone, and the training loader's pending reads come
    with its own next batch."""
    spec = [shards["trunc"], shards["faults"], shards["clean"]]
    train, _ = train_loader(spec, collate, batch_size=2, samples_per_epoch=64, world_size=1, num_workers=0,
                            shuffle_buffer=8, seed=0)
    stream = iter(train)
    first = next(stream)
    assert first["data_stats"]["read"] >= 2
    keys, stats = _eval([shards["clean"]], collate, 0)
    assert sorted(keys) == [f"g_{i}" for i in range(4)] and stats == {"read": 4}
    assert next(stream)["data_stats"]  # the read-ahead is counted where it happened


@pytest.mark.distributed
def test_skipped_share_bound_stops_both_ranks(shards, tmp_path):
    """A real 2-rank XE run on bad shards: both ranks stop at the same log point with the one-line error, exit 4;
    the counts are in MLflow, the startup check counted the missing local shard."""
    from mlflow.tracking import MlflowClient

    spec = "::".join([shards["faults"], shards["clean"], shards["trunc"], shards["missing"]])
    cmd = [*ranks_cmd("dico_scale/train.py"),
           "--config", "configs/demo/xe.yaml", "data.synthetic.enabled=false", f"data.train_shards={spec}",
           "data.val_shards=", f"train.output_dir={tmp_path}/out", f"tracking.uri={mlflow_uri(tmp_path / 'mlflow.db')}",
           "evaluator.weights=", "captioner.image_encoder_weights=", "train.max_steps=50", "train.log_every=2",
           "train.micro_batch_size=4", "data.samples_per_epoch=64", "data.shuffle_buffer=8",
           "data.max_skipped_share=0.2", "data.skipped_share_min_samples=30", "data.num_workers=2"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-4000:]
    errors = [line[line.index("dico_scale: data error:"):] for line in out.splitlines()
              if "dico_scale: data error:" in line]
    assert len(errors) == 2 and errors[0] == errors[1], errors  # both ranks, the same decision
    found = re.fullmatch(r"dico_scale: data error: skipped ([\d.]+)% of (\d+) samples read, past "
                         r"data.max_skipped_share=0.2 \(most common fault: (\w+), (\d+) times\)", errors[0])
    assert found, errors[0]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id])
    m = run.data.metrics
    assert run.info.status == "FAILED"
    assert m["data/skipped_share"] > 0.2
    assert m["data/faults/missing_shard"] == 1  # found at startup, dropped from the list, never read
    assert m["data/faults"] == sum(m[f"data/faults/{k}"] for k in pipeline.KINDS) >= 0.2 * 30 + 1
    steps = [x.step for x in client.get_metric_history(run.info.run_id, "data/skipped_share")]
    assert max(steps) < 50 and max(steps) % 2 == 0  # stopped early, at a log point
    # the message names the numbers logged at that point
    share, read, kind, times = found.groups()
    assert float(share) == pytest.approx(100 * m["data/skipped_share"], abs=0.01) and int(read) >= 30
    assert m[f"data/faults/{kind}"] == int(times) == max(m[f"data/faults/{k}"] for k in pipeline.KINDS)


def test_bound_applies_after_the_minimum_and_names_the_commonest_fault():
    from collections import Counter

    from dico_scale.loop import check_data_bound, data_metrics

    totals = Counter(read=99, skipped=5, bad_json=2, corrupt_image=3, missing_shard=4)  # 4 found at startup
    check_data_bound(totals, 0.01, 100)  # 5 % skipped, but fewer than 100 samples read yet
    totals["read"] += 1
    with pytest.raises(DataError) as e:
        check_data_bound(totals, 0.01, 100)
    assert str(e.value) == ("skipped 5.00% of 100 samples read, past data.max_skipped_share=0.01 "
                            "(most common fault: missing_shard, 4 times)") and e.value.agreed
    check_data_bound(totals, 0.05, 100)  # at the bound is not past it
    m = data_metrics(totals)
    assert m["data/faults"] == 9 and m["data/skipped_share"] == 0.05 and m["data/faults/empty_captions"] == 0


@pytest.mark.parametrize("override", ["data.max_skipped_share=1.5", "data.max_skipped_share=-0.1",
                                      "data.skipped_share_min_samples=-1"])
def test_bound_config_is_checked(override):
    from dico_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"'{override.split('=')[0]}'"):
        load_config("configs/demo/xe.yaml", ["evaluator.weights=", "captioner.image_encoder_weights=", override])
