"""Outputs never replace their inputs, and inputs that are not what they claim are one line (found by a hostile-user
sweep): compare keeps folders of other files and checks its store and start before anything runs; evaluate, export and
convert refuse an --out that is (or lies in) what they read; a run does not start from the file it writes at its end;
a checkpoint whose run config or state dict has the wrong shape names itself."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch
from helpers import mlflow_uri
from test_compare import REPO, _config, _start_files

from dico_scale import caption, compare, convert, evaluate, export
from dico_scale.config import load_config
from dico_scale.errors import ConfigError
from dico_scale.preflight import check_start_file


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error(capsys, prefix: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0][len(prefix):]


def test_compare_keeps_a_run_folder_of_other_files_and_checks_its_store_and_start(tmp_path, capsys):
    training = _start_files(tmp_path)
    cfg = str(_config(tmp_path, tmp_path, xe_checkpoint=str(tmp_path / "xe.pt")))
    notes = tmp_path / "compare" / "dico" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    store = [f"tracking.uri={mlflow_uri(tmp_path / 'mlflow.db')}"]
    assert compare.main(["--config", cfg, *training, *store]) == 2
    assert _one_error(capsys, "dico_scale.compare: config error: ") == (
        f"'{notes.parent}' holds files no training run wrote (notes.txt), and a new compare replaces this run's "
        "folder: move them, or choose another output_dir")
    assert notes.read_text() == "mine"

    not_a_db = tmp_path / "figure.png"
    not_a_db.write_bytes(b"\x89PNG not a database")
    for uri, why in ((f"sqlite:///{not_a_db}", "file is not a database"), ("http://127.0.0.1:9", "no answer from")):
        assert compare.main(["--config", cfg, *training, f"tracking.uri={uri}"]) == 2
        message = _one_error(capsys, "dico_scale.compare: config error: ")
        assert message.startswith(f"tracking store '{uri}' is unusable: ") and why in message, message
    assert notes.read_text() == "mine" and not (tmp_path / "compare" / "compare.json").exists()

    text = tmp_path / "text.pt"
    text.write_text("not weights")
    assert compare.main(["--config", str(_config(tmp_path, tmp_path, xe_checkpoint=str(text))), *training]) == 2
    assert _one_error(capsys, "dico_scale.compare: config error: ") == (
        f"cannot read XE checkpoint (compare key 'xe_checkpoint') '{text}': not a file torch.save wrote (a .pt zip "
        "archive)")

    # the evaluator stage's export as the captioners' start: refused in the runs' configs, before anything trains
    evaluator = tmp_path / "evaluator.pt"
    torch.save({"state_dict": {}, "stage": "evaluator", "config": "train:\n  stage: evaluator\n"}, evaluator)
    assert compare.main(["--config", str(_config(tmp_path, tmp_path, xe_checkpoint=str(evaluator))), *training]) == 2
    assert _one_error(capsys, "dico_scale.compare: config error: ") == (
        f"run dico: bad value for config key 'train.init_from': '{evaluator}' was exported by a run of the evaluator "
        "stage (an evaluator, for evaluator.weights), not a captioner")
    assert not (tmp_path / "compare" / "compare.json").exists()


def test_export_of_a_tag_never_replaces_the_runs_own_export(tiny_xe, tmp_path, capsys):
    """Its model.pt (read by the next stage's train.init_from and by the resume's finished-run check), best/ and hf/:
    one line; an empty --out too. Elsewhere the export is laid out as the run's own model.pt (init_from included)."""
    import shutil

    run = tmp_path / "xe"
    shutil.copytree(tiny_xe.parent, run)
    tag, before = run / "checkpoints" / "step_00000002", _digest(run / "model.pt")
    for out, own in ((run / "model.pt", run / "model.pt"), (run / "best" / "model.pt", run / "best"),
                     (run / "checkpoints" / ".." / "hf" / "model.pt", run / "hf")):
        assert export.main(["--checkpoint", str(tag), "--out", str(out)]) == 2
        assert _one_error(capsys, "dico_scale.export: error: ") == (
            f"--out '{out}' is the run's own export ({own}), which its resume and the next stage's train.init_from "
            "read: write it elsewhere")
    assert _digest(run / "model.pt") == before and not (run / "best").exists()
    victim = tmp_path / "victim"  # another run's folder: its model.pt is its own too
    shutil.copytree(tiny_xe.parent, victim)
    assert export.main(["--checkpoint", str(tag), "--out", str(victim / "model.pt")]) == 2
    assert _one_error(capsys, "dico_scale.export: error: ") == (
        f"--out '{victim / 'model.pt'}' is the run {victim}'s export ({victim / 'model.pt'}), which its resume and "
        "the next stage's train.init_from read: write it elsewhere")
    assert export.main(["--checkpoint", str(tag), "--out", ""]) == 2
    assert _one_error(capsys, "dico_scale.export: error: ") == "--out '' names no file"

    assert export.main(["--checkpoint", str(tag), "--out", str(tmp_path / "step2.pt")]) == 0
    ours, theirs = (torch.load(p, weights_only=True) for p in (tmp_path / "step2.pt", run / "model.pt"))
    record = {k: v for k, v in theirs.items() if k != "state_dict"}
    assert {k: v for k, v in ours.items() if k != "state_dict"} == record
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    assert all(torch.equal(ours["state_dict"][k], v) for k, v in theirs["state_dict"].items())


def test_evaluate_export_and_convert_refuse_an_out_that_replaces_their_input(tmp_path, capsys):
    from dico_scale.models import tiny

    _start_files(tmp_path)
    xe = tmp_path / "xe.pt"
    before = _digest(xe)
    assert evaluate.main(["--checkpoint", str(xe), "--out", str(xe), "--no-spice"]) == 2
    assert _one_error(capsys, "dico_scale.evaluate: ") .endswith(
        f"--out '{xe}' would overwrite the checkpoint '{xe}' or one of its files")
    assert _digest(xe) == before

    tag = tmp_path / "checkpoints" / "step_00000002"  # export refuses before it reads the tag
    tag.mkdir(parents=True)
    assert export.main(["--checkpoint", str(tag), "--out", str(tag / "mp_rank_00_model_states.pt")]) == 2
    assert _one_error(capsys, "dico_scale.export: error: ") == (
        f"--out '{tag}/mp_rank_00_model_states.pt' lies in --checkpoint '{tag}': write it elsewhere")

    ref = tmp_path / "ref"
    tiny.write("dico-ref", str(ref))
    weights = {p.name: _digest(p) for p in ref.iterdir() if p.is_file()}
    out = ref / "sub" / ".." / "model.safetensors"
    assert convert.main(["dico-ref", str(ref), "--out", str(out)]) == 2
    assert _one_error(capsys, "dico_scale.convert: error: ") == (
        f"--out '{out}' lies in the folder it converts ('{ref}'): write it elsewhere")
    assert {p.name: _digest(p) for p in ref.iterdir() if p.is_file()} == weights

    # a config of another stage: the export is still the xe-stage captioner it records, which caption reads
    assert convert.main(["dico-ref", str(ref), "--out", str(tmp_path / "ref.pt"), "--config",
                         str(REPO / "configs" / "demo" / "evaluator.yaml")]) == 0
    blob = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert blob["stage"] == "xe" and "stage: xe" in blob["config"]
    meta = export.checkpoint_meta(str(tmp_path / "ref.pt"))
    assert export.load_run_config(meta).train.stage == "xe"


def test_a_run_does_not_start_from_what_it_writes_at_its_end(tmp_path):
    def refused(cfg, key: str, start, written) -> None:
        with pytest.raises(ConfigError) as e:
            check_start_file(cfg)
        assert str(e.value) == (f"{key} '{start}' is what this run writes at its end ({written}): start from a copy, "
                                "or use another train.output_dir")

    out = tmp_path / "run"
    for start, written in ((out / "model.pt", "model.pt"), (out / "best" / "model.pt", "best"),
                           (tmp_path / "link" / ".." / "run" / "hf", "hf")):
        cfg = load_config("configs/demo/xe.yaml", ["evaluator.weights=", "captioner.image_encoder_weights=",
                                                   f"train.output_dir={out}"])
        cfg.train.init_from = str(start)
        refused(cfg, "train.init_from", start, out / written)
    cfg.train.init_from = str(tmp_path / "other" / "model.pt")
    check_start_file(cfg)
    cfg.train.init_from, cfg.captioner.model, cfg.captioner.hf_path = "", "hf_vlm", str(out / "hf")  # its own hf/
    refused(cfg, "captioner.hf_path", out / "hf", out / "hf")
    cfg.captioner.hf_path = str(tmp_path / "models" / "smolvlm")
    check_start_file(cfg)

    _start_files(tmp_path)
    out.mkdir()
    (out / "model.pt").write_bytes((tmp_path / "xe.pt").read_bytes())
    before = _digest(out / "model.pt")
    proc = subprocess.run([sys.executable, "-m", "dico_scale.train", "--config", "configs/demo/xe.yaml",
                           "evaluator.weights=", "captioner.image_encoder_weights=", f"train.output_dir={out}",
                           f"train.init_from={out}/model.pt", "tracking.enabled=false", "train.max_steps=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"train.init_from '{out}/model.pt' is what this run writes at its end" in proc.stderr
    assert _digest(out / "model.pt") == before


@pytest.mark.parametrize("blob,why", [
    ({"state_dict": {}, "config": "train: [1"}, "its run config is not a YAML mapping"),
    ({"state_dict": {}, "config": "- a\n- b"}, "its run config is not a YAML mapping"),
    ({"state_dict": "weights", "config": "train: {stage: xe}"}, "is not a dico_scale export (needs a dict "
                                                                 "'state_dict' and 'config')"),
])
def test_a_checkpoint_of_the_wrong_shape_is_one_line(tmp_path, capsys, blob, why):
    from PIL import Image

    path = tmp_path / "model.pt"
    torch.save(blob, path)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert caption.main(["--checkpoint", str(path), str(tmp_path / "a.png")]) == 2
    assert why in _one_error(capsys, "dico_scale.caption: error: checkpoint ")


def test_a_bad_key_in_a_checkpoints_config_names_the_checkpoint(tmp_path):
    _start_files(tmp_path)
    blob = torch.load(tmp_path / "xe.pt", weights_only=True)
    blob["config"] = blob["config"].replace("captioner:\n", "captioner:\n  typo_key: 1\n", 1)
    torch.save(blob, tmp_path / "typo.pt")
    with pytest.raises(ConfigError) as e:
        export.load_run_config(export.checkpoint_meta(str(tmp_path / "typo.pt")))
    assert "unknown config key 'captioner.typo_key'" in str(e.value)
    assert f"the run config of {tmp_path}/typo.pt" in str(e.value) and "/tmp/tmp" not in str(e.value)
    assert json.dumps(str(e.value)).count("\\n") == 0


def test_a_beam_wider_than_the_vocabulary_is_one_line():
    """caption --beam-size 100000 took the machine's 23 GiB before the out-of-memory killer stopped it."""
    from dico_scale.models import build_captioner

    blank = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]
    vocab = build_captioner(load_config("configs/demo/xe.yaml", blank)).tokenizer.vocab_size
    for key in ("generation.candidates", "scst.candidates"):
        cfg = load_config("configs/demo/xe.yaml", blank + [f"{key}={vocab + 1}", "scst.strategy=beam"])
        with pytest.raises(ConfigError) as e:
            build_captioner(cfg)
        assert str(e.value) == (f"{key}={vocab + 1} is more than this captioner's vocabulary ({vocab} tokens): a beam "
                                "search's first step has no more distinct continuations")
    build_captioner(load_config("configs/demo/xe.yaml", blank + [f"scst.candidates={vocab + 1}"]))  # samples


def test_the_stage_of_a_checkpoint_is_not_an_override(tmp_path):
    _start_files(tmp_path)
    meta = export.checkpoint_meta(str(tmp_path / "xe.pt"))
    with pytest.raises(ConfigError) as e:
        export.load_run_config(meta, ["train.stage=evaluator"])
    assert str(e.value) == ("'train.stage=evaluator': the stage is the checkpoint's (what its weights were trained "
                            "as), not an override")
