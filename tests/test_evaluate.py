"""Evaluation suite, caption CLI and checkpoint export: metric definitions against independent recomputations,
2-rank evaluation == 1-rank, a real ZeRO-2 checkpoint exported == the engine's own export, one-line input errors."""
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
from helpers import check_ok, mlflow_uri, ranks_cmd
import torch
import torch.nn.functional as F

from dico_scale import metrics
from dico_scale.config import EvaluatorConfig
from dico_scale.models.clip import create_clip
from dico_scale.models.clip_scorer import ClipScorer

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
RECORDS = [  # fixed candidates and references (ids as strings, punctuation and case for the PTB tokenizer)
    {"key": "a", "caption": "A red circle on the left.", "refs": ["a red circle on the left", "a small red circle",
                                                                  "there is a red circle at the left"]},
    {"key": "b", "caption": "two blue squares", "refs": ["two blue squares on a dark background", "two squares"]},
    {"key": "c", "caption": "a green star", "refs": ["a yellow star in the center", "a star, yellow and large"]},
    {"key": "d", "caption": "", "refs": ["an orange cross at the top", "one orange cross"]},
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 XE steps on 2 ranks (ZeRO-2): <tmp>/xe/model.pt (the engine's export) and its checkpoint tag; 7 test images
    in shards of 4 + 3, so the 2 ranks get unequal shares."""
    tmp = tmp_path_factory.mktemp("evaluate")
    overrides = [f"data.root={tmp}/data", f"tracking.uri={mlflow_uri(tmp / 'mlflow.db')}", "data.synthetic.n_train=32",
                 "data.synthetic.n_val=2", "data.synthetic.n_test=7", "data.synthetic.samples_per_shard=4",
                 "data.samples_per_epoch=16", "data.shuffle_buffer=8", "train.max_steps=2", "train.micro_batch_size=4",
                 "train.val_max_images=2", "evaluator.weights=", "captioner.image_encoder_weights=",
                 f"train.output_dir={tmp}/xe", "generation.max_len=8", "generation.candidates=3"]
    cmd = [*ranks_cmd("dico_scale/train.py"), "--config", "configs/demo/xe.yaml", *overrides]
    check_ok(subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600))
    (tag,) = (tmp / "xe" / "checkpoints").glob("step_*")
    return {"tmp": tmp, "model": tmp / "xe" / "model.pt", "tag": tag, "db": f"sqlite:///{tmp}/mlflow.db"}


# ---- metric definitions ----------------------------------------------------------------------------------------------

def test_coco_scores_equal_pycocoevalcap_and_spice_fails_alone(monkeypatch, tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    monkeypatch.setattr(metrics, "spice_lib", lambda: str(tmp_path))  # no CoreNLP jars there
    scores, errors = metrics.coco_scores(RECORDS, spice=True)

    tok = PTBTokenizer()
    gts = tok.tokenize({r["key"]: [{"caption": c} for c in r["refs"]] for r in RECORDS})
    res = tok.tokenize({r["key"]: [{"caption": r["caption"]}] for r in RECORDS})
    bleu, _ = Bleu(4).compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    assert [scores[f"BLEU-{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-12)
    assert scores["CIDEr"] == pytest.approx(float(cider), abs=1e-12) and scores["CIDEr"] > 0
    assert 0 < scores["METEOR"] < 1 and 0 < scores["ROUGE-L"] < 1  # computed although SPICE is not
    assert scores["SPICE"] is None and set(errors) == {"SPICE"}
    msg = errors["SPICE"]
    assert "\n" not in msg and "stanford-corenlp-3.6.0.jar" in msg and "stanford-corenlp-3.6.0-models.jar" in msg
    assert str(tmp_path) in msg and "get_stanford_models" in msg


def test_spice_message_names_only_missing_jars(tmp_path):
    (tmp_path / "stanford-corenlp-3.6.0.jar").write_bytes(b"")
    msg = metrics.spice_missing(str(tmp_path))
    assert "stanford-corenlp-3.6.0-models.jar" in msg and "stanford-corenlp-3.6.0.jar," not in msg
    (tmp_path / "stanford-corenlp-3.6.0-models.jar").write_bytes(b"")
    assert metrics.spice_missing(str(tmp_path)) is None


CAPTIONS = ["a red circle", "a large blue square at the top left", "two shapes on a dark background", "a star"]
REFS = [["a red circle", "a small red circle on the left"], ["a blue square"],
        ["two shapes", "a circle and a star", "two shapes on a light background"], ["an orange cross"]]


@pytest.mark.parametrize("metric,w", [("clips", 2.5), ("pacs", 2.0)])
def test_clip_scores_equal_float64_recomputation(metric, w):
    prefix = "A photo depicts "
    ev = ClipScorer(EvaluatorConfig(model="dico-tiny", weights="", metric=metric, caption_prefix=prefix))
    torch.manual_seed(2)  # a random CLIP whose cosines here are positive for some images, negative for another
    ev.clip.load_state_dict(create_clip("dico-tiny")[0].state_dict())
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        score, ref_score, _ = metrics.clip_scores(ev, ev.image_features(pixels), CAPTIONS, REFS, ev.weight)

    # float64, written from the definitions: w*max(cos,0); H-mean with max(max_r cos(c, r), 0), texts prefixed
    clip = copy.deepcopy(ev.clip).double().eval()
    tokenize = open_clip.get_tokenizer("dico-tiny")
    with torch.no_grad():
        img = F.normalize(clip.encode_image(pixels.double()), dim=-1)
        txt = lambda texts: F.normalize(clip.encode_text(tokenize([prefix + t for t in texts])), dim=-1)  # noqa: E731
        cand = txt(CAPTIONS)
    expected, expected_ref = [], []
    for i in range(len(CAPTIONS)):
        s = w * max(float(img[i] @ cand[i]), 0.0)
        r = max(max(float(cand[i] @ ref) for ref in txt(REFS[i])), 0.0)
        expected.append(s)
        expected_ref.append(2 * s * r / (s + r) if s + r > 0 else 0.0)
    assert score.tolist() == pytest.approx(expected, abs=2e-5)
    assert ref_score.tolist() == pytest.approx(expected_ref, abs=2e-5)
    assert (score > 0).sum() == 3 and (score == 0).sum() == 1 and (ref_score > score).all() == False  # noqa: E712


def test_caption_stats():
    s = metrics.caption_stats(["A dog, a dog.", "a red circle", "two cats"], seen={"a red circle"}, ngrams=(1, 2, 3))
    assert s == {"vocab_size": 6, "mean_length": 3.0, "novelty": pytest.approx(2 / 3), "repetition": pytest.approx(1 / 3),
                 "repeat_1": pytest.approx(1 / 3), "repeat_2": pytest.approx(1 / 3), "repeat_3": 0.0}
    assert metrics.caption_stats(["a b"])["novelty"] is None


# ---- end to end ------------------------------------------------------------------------------------------------------

def _close(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, abs=1e-5)
    return a == b


@pytest.mark.distributed
def test_two_ranks_equal_one_rank(trained, monkeypatch, tmp_path):
    from dico_scale import evaluate

    tmp = trained["tmp"]
    args = ["--checkpoint", str(trained["model"]), "--shards", "test", "--batch-size", "2"]
    cmd = [*ranks_cmd("dico_scale/evaluate.py"), *args, "--no-spice", "--out", str(tmp / "eval2.json")]
    check_ok(subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600))

    monkeypatch.setattr(metrics, "spice_lib", lambda: str(tmp_path))  # SPICE fails alone, also if jars exist here
    assert evaluate.main(args + ["--out", str(tmp / "eval1.json")]) == 0
    one, two = (json.loads((tmp / f"eval{n}.json").read_text()) for n in (1, 2))

    assert one["images"] == two["images"] == 7
    assert [c["key"] for c in two["captions"]] == [f"test_{i:06d}" for i in range(7)]
    for a, b in zip(one["captions"], two["captions"]):
        assert a["caption"] == b["caption"] and a["refs"] == b["refs"]
        assert a["CLIP-S"] == pytest.approx(b["CLIP-S"], abs=1e-5)
        assert a["RefCLIP-S"] == pytest.approx(b["RefCLIP-S"], abs=1e-5)
    assert one["metrics"]["SPICE"] is None and "get_stanford_models" in one["errors"]["SPICE"]
    assert two["metrics"]["SPICE"] is None and "SPICE" not in two["errors"]
    for k, v in two["metrics"].items():
        assert _close(one["metrics"][k], v), (k, one["metrics"][k], v)
    for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIP-S", "RefCLIP-S", "CLIP-S/t2i_R1", "CLIP-S/i2t_R10",
              "vocab_size", "mean_length", "novelty", "repeat_4"):
        assert isinstance(two["metrics"][k], (int, float)), k

    # logged on the checkpoint's training run (model.pt holds no run id: the sibling checkpoint's is used)
    from mlflow.tracking import MlflowClient
    state = torch.load(trained["tag"] / "mp_rank_00_model_states.pt", weights_only=False)
    assert one["mlflow_run_id"] == two["mlflow_run_id"] == state["mlflow_run_id"]
    client = MlflowClient(tracking_uri=trained["db"])
    run = client.get_run(state["mlflow_run_id"])
    assert run.data.metrics["eval/test/CLIP-S"] == pytest.approx(one["metrics"]["CLIP-S"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "eval/step_00000002")] == [
        "eval/step_00000002/eval_test.json"]


@pytest.fixture(scope="module")
def exported(trained):
    from dico_scale import export

    out = trained["tmp"] / "exported.pt"
    with pytest.MonkeyPatch.context() as mp:  # DeepSpeed reads it at import; not left behind for other tests
        mp.setenv("DS_ACCELERATOR", "cpu")
        assert export.main(["--checkpoint", str(trained["tag"]), "--out", str(out)]) == 0
    return out


@pytest.mark.distributed
def test_export_equals_engine_export(trained, exported):
    ours = torch.load(exported, weights_only=True)
    engine = torch.load(trained["model"], weights_only=True)
    assert list(ours["state_dict"]) == list(engine["state_dict"])
    for k, v in engine["state_dict"].items():
        assert ours["state_dict"][k].dtype == torch.float32 and torch.equal(ours["state_dict"][k], v), k
    assert (ours["config"], ours["stage"], ours["step"]) == (engine["config"], engine["stage"], engine["step"])
    state = torch.load(trained["tag"] / "mp_rank_00_model_states.pt", weights_only=False)
    assert ours["mlflow_run_id"] == state["mlflow_run_id"] and ours["mlflow_run_id"]


@pytest.mark.distributed
def test_safetensors_export_equals_engine_export(trained, tmp_path):
    """ZeRO's consolidated tensors share flat buffers; the safetensors export holds each one, as model.pt does."""
    from safetensors.torch import load_file

    from dico_scale import export

    out = tmp_path / "model.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        assert export.main(["--checkpoint", str(trained["tag"]), "--out", str(out), "--format", "safetensors"]) == 0
    ours, engine = load_file(out), torch.load(trained["model"], weights_only=True)
    assert sorted(ours) == sorted(engine["state_dict"])
    for k, v in engine["state_dict"].items():
        assert ours[k].dtype == torch.float32 and torch.equal(ours[k], v), k
    side = json.loads((tmp_path / "model.json").read_text())
    assert (side["config"], side["stage"], side["step"]) == (engine["config"], engine["stage"], engine["step"])
    assert side["mlflow_run_id"] == engine["mlflow_run_id"] and side["mlflow_run_id"]


@pytest.mark.distributed
def test_caption_cli_on_a_folder(trained, exported, tmp_path):
    from PIL import Image

    from dico_scale.export import checkpoint_meta, load_captioner, load_run_config
    from dico_scale.validate import generate

    rng = np.random.default_rng(0)
    for name in ("b.jpg", "a.png", "c.jpeg"):
        Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    cmd = [sys.executable, "-m", "dico_scale.caption", "--checkpoint", str(exported), str(tmp_path),
           "--beam-size", "2", "--max-len", "6", "--length-penalty", "0.5", "--early-stopping", "never",
           "--repetition-penalty", "1.2", "--no-repeat-ngram-size", "2"]
    lines = check_ok(subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)).stdout.splitlines()
    paths = [str(tmp_path / n) for n in ("a.png", "b.jpg", "c.jpeg")]
    assert [line.split("\t")[0] for line in lines] == paths

    meta = checkpoint_meta(str(trained["model"]))  # the engine's export: same weights, same captions
    cfg = load_run_config(meta, ["evaluator.weights=", "generation.candidates=2", "generation.max_len=6",
                                 "generation.length_penalty=0.5", "generation.early_stopping=never",
                                 "generation.repetition_penalty=1.2", "generation.no_repeat_ngram_size=2"])
    captioner, tok = load_captioner(cfg, meta, torch.device("cpu"))
    pixels = torch.stack([captioner.preprocess(Image.open(p).convert("RGB")) for p in paths])
    assert [line.split("\t", 1)[1] for line in lines] == generate(captioner, tok, pixels, cfg.generation)


def test_split_alone_selects_that_split_and_never_relabels_another():
    """`--split val` evaluated the test split under the name val; now it selects val, and a config split labelled as
    another is refused."""
    from dico_scale.errors import ConfigError
    from dico_scale.eval_data import shards_arg

    assert shards_arg("", "") == "test" and shards_arg("", "val") == "val" and shards_arg("", "mine") == "test"
    assert shards_arg("val", "") == "val" and shards_arg("test", "test") == "test"
    assert shards_arg("/data/x-{0..3}.tar", "val") == "/data/x-{0..3}.tar"  # a spec of the user's: any label
    with pytest.raises(ConfigError, match=r"^--split val would label the test split's results as val: pass --shards "
                                          r"val, or drop --split$"):
        shards_arg("test", "val")


def _blocked_default_out(model: str, tmp: Path) -> Path:
    """`model` (hard-linked) in a folder where eval_test.json is a folder: evaluate cannot write its default result."""
    (tmp / "blocked" / "eval_test.json").mkdir(parents=True)
    os.link(model, tmp / "blocked" / "model.pt")
    return tmp / "blocked" / "model.pt"


@pytest.mark.distributed
def test_bad_input_is_one_line_and_exit_2(trained, capsys, tmp_path):
    """Each entry point's bad input is one line on stderr and exit 2: the first case of each command as its own
    process (nothing else reaches stderr, no traceback), the rest through its main() in this process."""
    from dico_scale import caption, evaluate, export

    model = str(trained["model"])
    cases = {
        "checkpoint not found": ["dico_scale.evaluate", "--checkpoint", "/nonexistent/model.pt"],
        "bad shard spec": ["dico_scale.evaluate", "--checkpoint", model, "--shards", "/nonexistent/x-{0..3}.tar"],
        "UnbalancedBraces": ["dico_scale.evaluate", "--checkpoint", model, "--shards", "/tmp/x-{0.."],
        "generation.candidatese": ["dico_scale.evaluate", "--checkpoint", model, "generation.candidatese=3"],
        "--ngrams '0' is not": ["dico_scale.evaluate", "--checkpoint", model, "--ngrams", "0"],
        f"--out '{REPO}' is a folder": ["dico_scale.evaluate", "--checkpoint", model, "--out", str(REPO)],
        "cannot be written": ["dico_scale.evaluate", "--checkpoint", model, "--out", "/proc/none/eval.json"],
        # the default --out, <model.pt's folder>/eval_test.json, cannot be written (here: a folder of that name)
        "the default --out '": ["dico_scale.evaluate", "--checkpoint",
                                str(_blocked_default_out(model, tmp_path))],
        "not a checkpoint folder": ["dico_scale.export", "--checkpoint", model, "--out", "/tmp/x.pt"],
        "no such image": ["dico_scale.caption", "--checkpoint", model, "/nonexistent.jpg"],
        "--length-penalty: 'inf' is not a finite": ["dico_scale.caption", "--checkpoint", model, "x.jpg",
                                                     "--length-penalty", "inf"],
        "--early-stopping: invalid choice: 'maybe'": ["dico_scale.caption", "--checkpoint", model, "x.jpg",
                                                      "--early-stopping", "maybe"],
        "--no-repeat-ngram-size: '-1' is not a whole": ["dico_scale.caption", "--checkpoint", model, "x.jpg",
                                                        "--no-repeat-ngram-size", "-1"],
        "'generation.repetition_penalty': 0.0 must lie": ["dico_scale.caption", "--checkpoint", model,
                                                          str(REPO / "docs"), "--repetition-penalty", "0"],
        # a flag the checkpoint's captioner cannot follow names the flag, then the config key it sets
        "--max-len 100000 does not fit this checkpoint: bad value for config key 'captioner.max_positions'": [
            "dico_scale.caption", "--checkpoint", model, str(REPO / "docs"), "--max-len", "100000"],
    }
    import torch

    if not torch.cuda.is_available():  # not a silent evaluation on the CPU
        cases["train.device=cuda, but torch sees no CUDA device"] = ["dico_scale.evaluate", "--checkpoint", model,
                                                                     "train.device=cuda"]
    first = {}
    for expected, argv in cases.items():
        first.setdefault(argv[0], expected)
    procs = {k: subprocess.Popen([sys.executable, "-m", *cases[k]], cwd=REPO, env=ENV, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in first.values()}
    mains = {"dico_scale.evaluate": evaluate.main, "dico_scale.export": export.main, "dico_scale.caption": caption.main}
    for expected, argv in cases.items():
        if expected in procs:
            out, err = procs[expected].communicate(timeout=120)
            code = procs[expected].returncode
        else:
            try:
                code = mains[argv[0]](argv[1:])
            except SystemExit as e:  # argparse's own errors exit
                code = e.code
            out, err = capsys.readouterr()
        assert code == 2, (expected, out, err)
        assert "\n" not in err.strip() and expected in err and "Traceback" not in err, (expected, err)


@pytest.fixture
def tiny(tiny_xe) -> Path:
    """conftest's 2-step XE export; its data beside it: <tmp>/data/{test,val}-00000.tar, 8 images each."""
    return tiny_xe


def test_data_faults_are_counted_in_the_line_the_json_and_mlflow(tiny, tmp_path):
    """8 good images (one batch of 8), then a shard cut inside its first caption file: a truncated shard and a sample
    without its .json, found after the last image (they ride in the last batch: webdataset's batched collates a full
    batch only once the next sample or the end has come). evaluate scored the good ones with no count at all."""
    import tarfile

    from mlflow.tracking import MlflowClient

    data = tiny.parent.parent / "data"
    with tarfile.open(data / "val-00000.tar") as tar:
        caption_file = next(m for m in tar.getmembers() if m.name.endswith(".json"))
    (tmp_path / "cut.tar").write_bytes((data / "val-00000.tar").read_bytes()[:caption_file.offset_data + 100])
    with tarfile.open(tmp_path / "bad_json.tar", "w") as tar:  # the novelty scan of the training split: a traceback
        for name, body in (("a.jpg", b"not read"), ("a.json", b"{not json")):
            member = tarfile.TarInfo(name)
            member.size = len(body)
            tar.addfile(member, io.BytesIO(body))
    out, uri = tmp_path / "eval.json", mlflow_uri(tmp_path / "mlflow.db")
    cmd = [sys.executable, "-m", "dico_scale.evaluate", "--checkpoint", str(tiny), "--no-spice", "--train-shards",
           f"{data}/val-00000.tar::{tmp_path}/cut.tar::{tmp_path}/bad_json.tar",
           "--shards", f"{data}/test-00000.tar::{tmp_path}/cut.tar", "--split", "faults", "--batch-size", "8",
           "--out", str(out), "tracking.enabled=true", f"tracking.uri={uri}"]
    proc = check_ok(subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300))
    assert "data: 10 samples read, 2 skipped (20.00%); faults: bad_json 1, truncated_tar 1" in proc.stdout.splitlines()
    assert ("novelty scan of the training split's data: 11 samples read, 3 skipped (27.27%); faults: bad_json 2, "
            "truncated_tar 1") in proc.stdout.splitlines()
    result = json.loads(out.read_text())  # read: 9 samples + the cut shard
    assert result["images"] == 8 and result["data"] == {"read": 10, "skipped": 2, "skipped_share": 0.2,
                                                         "faults": {"truncated_tar": 1, "bad_json": 1}}
    assert result["novelty_data"]["faults"] == {"truncated_tar": 1, "bad_json": 2}
    assert result["metrics"]["novelty"] is not None
    logged = MlflowClient(tracking_uri=uri).get_run(result["mlflow_run_id"]).data.metrics
    assert {k: logged[f"eval/faults/data/{k}"] for k in ("read", "skipped", "faults", "faults/truncated_tar")} == {
        "read": 10, "skipped": 2, "faults": 2, "faults/truncated_tar": 1}


@pytest.mark.parametrize("split", ["../../etc", "a/b", ".", ""])
def test_a_split_label_that_is_not_a_plain_name_is_one_line_and_exit_2(tiny, split, capsys):
    from dico_scale import evaluate

    before = sorted(p.name for p in tiny.parent.parent.iterdir())
    if not split:  # `--split ''` is no label: the default (test) is kept, checked here through parse_args only
        args, _, _ = evaluate.parse_args(["--checkpoint", str(tiny), "--split", split])
        assert args.split == "test"
        return
    assert evaluate.main(["--checkpoint", str(tiny), "--split", split]) == 2
    err = capsys.readouterr().err
    assert err == (f"dico_scale.evaluate: error: --split '{split}' is not a plain name (letters, digits, '_', '.', "
                   f"'-'): it names the result file eval_<split>.json and the metrics eval/<split>/...\n")
    assert sorted(p.name for p in tiny.parent.parent.iterdir()) == before and not list(tiny.parent.glob("eval_*"))
