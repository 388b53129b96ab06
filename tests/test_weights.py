"""CLIP weights in every format users have (an OpenAI-layout TorchScript archive, open_clip hub .bin / .safetensors,
a Hugging Face CLIPModel folder), each through the captioner's tower, the evaluator and `evaluate --clip`, against
the source model's features; bad files as one line; the training reward's clamp; safetensors exports."""
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from dico_scale.config import CaptionerConfig, Config, ConfigError, EvaluatorConfig, load_config, to_yaml
from dico_scale.models import build_captioner
from dico_scale.models.clip import create_clip
from dico_scale.models.clip_scorer import ClipScorer, reward
from dico_scale.models.clip_weights import captioner_export_problem, sniff_weights_format

REPO = Path(__file__).resolve().parent.parent
NAME = "test-tiny-quickgelu"  # dico-tiny with QuickGELU, as OpenAI's models (registered from a temporary folder)
TEXTS = ["a red circle", "two blue squares on a dark background", "an orange star"]
FORMATS = ["torchscript", "bin", "safetensors", "hf", "hf_bin"]


def one_line(msg: str):
    assert msg.strip() and "\n" not in msg.strip(), repr(msg)


def pixels(n=3, seed=7):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def tokens(name=NAME):
    return open_clip.get_tokenizer(name)(TEXTS)


def hf_config(act="quick_gelu", vision_layers=3) -> CLIPConfig:
    """The transformers twin of NAME / dico-tiny (openai/clip-vit-* use quick_gelu)."""
    return CLIPConfig(projection_dim=128, vision_config=dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=vision_layers, num_attention_heads=4, image_size=64,
        patch_size=8, hidden_act=act), text_config=dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
        vocab_size=49408, hidden_act=act))


def save_hf(folder: Path, config: CLIPConfig, seed: int, bin_file: bool = False) -> CLIPModel:
    """A random CLIPModel saved as the hub distributes it: config.json + model.safetensors (or pytorch_model.bin)."""
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    if bin_file:
        config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    return model


def save_openai_archive(model, path: Path) -> None:
    """A TorchScript archive laid out as OpenAI's ViT-B-32.pt: the traced model in fp16, OpenAI's parameter names
    (open_clip's CLIP keeps them), plus the input_resolution / context_length / vocab_size tensors OpenAI's carry."""
    src = open_clip.create_model(NAME).eval()
    src.load_state_dict({k: v.reshape(src.logit_scale.shape) if k == "logit_scale" else v
                         for k, v in model.state_dict().items()})
    for key, value in (("input_resolution", 64), ("context_length", 32), ("vocab_size", 49408)):
        src.__dict__.pop(key, None)  # open_clip keeps some as plain ints
        src.register_buffer(key, torch.tensor(value))
    traced = torch.jit.trace(src, (pixels(1), tokens()[:1]), check_trace=False)
    torch.jit.save(traced.half(), str(path))


@pytest.fixture(scope="module")
def quick_name(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_configs")
    cfg = open_clip.get_model_config("dico-tiny")
    (folder / f"{NAME}.json").write_text(json.dumps({**cfg, "quick_gelu": True}))
    open_clip.add_model_config(str(folder))
    return NAME


@pytest.fixture(scope="module")
def source(quick_name):
    """The open_clip source model; fp16-representable weights, so OpenAI's fp16 archive holds them exactly."""
    torch.manual_seed(5)
    model, _ = create_clip(quick_name)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(32.0))
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


@pytest.fixture(scope="module")
def files(source, tmp_path_factory):
    """{format: (path, (image features, text features, logit_scale) of the model the file came from)}."""
    tmp = tmp_path_factory.mktemp("weights")
    with torch.no_grad():
        ref = (source.encode_image(pixels()), source.encode_text(tokens()), source.logit_scale.item())
    hub = {k: v.reshape(()) if k == "logit_scale" else v for k, v in source.state_dict().items()}  # 0-d, as open_clip
    (tmp / "clip").mkdir()
    save_openai_archive(source, tmp / "clip" / "ViT-tiny.pt")
    torch.save(hub, tmp / "open_clip_pytorch_model.bin")
    save_file(hub, tmp / "open_clip_model.safetensors")
    out = {"torchscript": (tmp / "clip" / "ViT-tiny.pt", ref), "bin": (tmp / "open_clip_pytorch_model.bin", ref),
           "safetensors": (tmp / "open_clip_model.safetensors", ref)}
    for fmt, seed in (("hf", 6), ("hf_bin", 8)):
        folder = tmp / fmt
        folder.mkdir()
        hf = save_hf(folder, hf_config(), seed, bin_file=fmt == "hf_bin")
        with torch.no_grad():
            out[fmt] = (folder, (hf.get_image_features(pixel_values=pixels()).pooler_output,
                                 hf.get_text_features(input_ids=tokens()).pooler_output, hf.logit_scale.item()))
    return {k: (str(p), r) for k, (p, r) in out.items()}


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_formats_are_recognised(files, source, tmp_path):
    expected = {"torchscript": "torchscript", "bin": "torch", "safetensors": "safetensors", "hf": "hf",
                "hf_bin": "hf"}
    assert {k: sniff_weights_format(p) for k, (p, _) in files.items()} == expected
    pacs = tmp_path / "pacs_clip_ViT-B-32.pth"  # the PAC-S release's layout
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, pacs)
    legacy = tmp_path / "legacy.pt"
    torch.save(source.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert sniff_weights_format(str(pacs)) == sniff_weights_format(str(legacy)) == "torch"
    for p in (pacs, legacy):
        for a, b in zip(create_clip(NAME, str(p))[0].eval().state_dict().values(), source.state_dict().values()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gives_the_source_features(files, fmt):
    path, (img, txt, logit_scale) = files[fmt]
    torch.manual_seed(0)
    fresh, _ = create_clip(NAME)
    with torch.no_grad():
        assert (fresh.eval().encode_image(pixels()) - img).abs().max() > 1e-2  # a random init would be caught
        model, _ = create_clip(NAME, path)
        model.eval()
        close(model.encode_image(pixels()), img)
        close(model.encode_text(tokens()), txt)
        assert model.logit_scale.shape == (1,) and model.logit_scale.item() == pytest.approx(logit_scale)

        ev = ClipScorer(EvaluatorConfig(model=NAME, weights=path, metric="clips"))
        close(ev.image_features(pixels()), F.normalize(img, dim=-1))
        close(ev.text_features(TEXTS), F.normalize(txt, dim=-1))

        cfg = CaptionerConfig(image_encoder=NAME, image_encoder_weights=path, width=64, heads=4, encoder_layers=1,
                              decoder_layers=1)
        captioner = build_captioner(Config(captioner=cfg)).eval()
        pooled, patch_tokens = captioner.image_encoder(pixels())
        close(pooled, img)
        assert patch_tokens.shape == (3, 64, 128)
        model.visual.output_tokens = True
        close(captioner.visual_tokens(pixels()), model.visual(pixels())[1])


# ---- a captioner export, and evaluate / caption on it -----------------------------------------------------------

TINY_CAPTIONER = ["captioner.image_encoder=dico-tiny", "captioner.image_encoder_weights=", "evaluator.weights=",
                  "captioner.width=64", "captioner.heads=4", "captioner.encoder_layers=1",
                  "captioner.decoder_layers=1", "generation.candidates=2", "generation.max_len=6",
                  "tracking.enabled=false", "train.init_from="]


@pytest.fixture(scope="module")
def captioner_pt(tmp_path_factory):
    """A model.pt export of a random tiny captioner (engine.export_weights' layout), written without DeepSpeed."""
    tmp = tmp_path_factory.mktemp("captioner")
    cfg = load_config(str(REPO / "configs/demo/xe.yaml"), TINY_CAPTIONER + [f"train.output_dir={tmp}"])
    torch.manual_seed(3)
    model = build_captioner(cfg)
    path = tmp / "model.pt"
    torch.save({"state_dict": model.state_dict(), "config": to_yaml(cfg), "stage": "xe", "step": 3,
                "mlflow_run_id": None}, path)
    return path


@pytest.fixture
def no_coco(monkeypatch):
    """pycocoevalcap's Java scorers (seconds per run) have nothing to do with the CLIP weights: skipped."""
    from dico_scale import metrics

    monkeypatch.setattr(metrics, "coco_scores", lambda records, spice=True: ({}, {}))


def run_evaluate(checkpoint, shards, out, *extra):
    from dico_scale import evaluate

    argv = ["--checkpoint", str(checkpoint), "--shards", shards, "--train-shards", "none", "--no-spice",
            "--out", str(out), *extra]
    assert evaluate.main(argv) == 0
    return json.loads(Path(out).read_text())


@pytest.mark.parametrize("fmt", FORMATS)
def test_evaluate_clip_reads_each_format(files, source, captioner_pt, tiny_shards, clean_env, no_coco, tmp_path,
                                         fmt):
    """--clip NAME:<file> scores as the run's own evaluator with the source's weights as a plain state dict."""
    path = files[fmt][0]
    if fmt.startswith("hf"):  # the baseline: the HF source's weights in open_clip's layout (checked against HF above)
        baseline_model = create_clip(NAME, path)[0]
    else:
        baseline_model = source
    baseline = tmp_path / "baseline.pt"
    torch.save({"state_dict": baseline_model.state_dict()}, baseline)
    res = run_evaluate(captioner_pt, tiny_shards["test"], tmp_path / "eval.json", "--clip", f"{NAME}:{path}",
                       f"evaluator.model={NAME}", f"evaluator.weights={baseline}", "evaluator.metric=pacs")
    assert res["settings"]["evaluators"]["clips"] == {"model": NAME, "weights": path}
    assert res["images"] == 10 and not any("random weights" in n for n in res["notes"])
    for entry in res["captions"]:
        assert entry["CLIP-S"] / 2.5 == pytest.approx(entry["PAC-S"] / 2.0, abs=1e-5)
    # (the random HF towers score every caption below 0, so only the recalls compare raw cosines there)
    assert fmt.startswith("hf") or any(entry["CLIP-S"] > 0 for entry in res["captions"])
    for k in ("t2i_R1", "t2i_R5", "i2t_R1", "i2t_R5"):
        assert res["metrics"][f"CLIP-S/{k}"] == res["metrics"][f"PAC-S/{k}"]


# ---- bad files ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    made = {}

    def put(name, data: bytes):
        (tmp / name).write_bytes(data)
        made[name] = str(tmp / name)
    put("garbage.pt", b"\x00\x01" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    put("notes.txt", b"not weights\n")
    put("empty.bin", b"")
    for src, name in ((files["bin"][0], "truncated.bin"), (files["torchscript"][0], "truncated_archive.pt"),
                      (files["safetensors"][0], "truncated.safetensors")):
        data = Path(src).read_bytes()
        put(name, data[:len(data) // 2])
    with zipfile.ZipFile(tmp / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    made["other.zip"] = str(tmp / "other.zip")
    torch.save(torch.zeros(3), tmp / "a_tensor.pt")
    made["a_tensor.pt"] = str(tmp / "a_tensor.pt")
    for name, config, weights in (("no_config", None, True), ("bert_folder", {"model_type": "bert"}, True),
                                  ("clip_no_weights", {"model_type": "clip"}, False)):
        (tmp / name).mkdir()
        if config:
            (tmp / name / "config.json").write_text(json.dumps(config))
        if weights:
            (tmp / name / "model.safetensors").write_bytes(b"x")
        made[name] = str(tmp / name)
    made["hf_weights_file"] = os.path.join(files["hf"][0], "model.safetensors")  # the file, not its folder
    return made


def test_bad_files_fail_in_seconds_with_one_line(bad_files, quick_name):
    for name, path in bad_files.items():
        start = time.monotonic()
        with pytest.raises(ConfigError) as ei:
            create_clip(NAME, path)
        msg = str(ei.value)
        one_line(msg)
        assert path in msg and time.monotonic() - start < 10, (name, msg)
    unknown = str(pytest.raises(ConfigError, sniff_weights_format, bad_files["garbage.pt"]).value)
    assert "unknown format" in unknown and "TorchScript" in unknown and "Hugging Face" in unknown
    assert "truncated or corrupt" in str(pytest.raises(ConfigError, sniff_weights_format,
                                                       bad_files["truncated_archive.pt"]).value)
    assert "give the folder" in str(pytest.raises(ConfigError, create_clip, NAME, bad_files["hf_weights_file"]).value)


def test_config_validation_rejects_an_unknown_file(bad_files):
    for key in ("evaluator.weights", "captioner.image_encoder_weights"):
        with pytest.raises(ConfigError) as ei:
            load_config(str(REPO / "configs/demo/xe.yaml"), TINY_CAPTIONER + [f"{key}={bad_files['garbage.pt']}"])
        one_line(str(ei.value))
        assert key in str(ei.value) and bad_files["garbage.pt"] in str(ei.value)


def test_a_captioner_export_given_as_clip_weights_is_named_as_such(captioner_pt, tmp_path):
    """A captioner's model.pt where CLIP weights go: one line naming the key, the stage the export records and what
    the key takes, at config validation (not '158 problems' once the model is built); an evaluator's export loads."""
    for key in ("evaluator.weights", "captioner.image_encoder_weights"):
        with pytest.raises(ConfigError) as ei:
            load_config(str(REPO / "configs/demo/xe.yaml"), TINY_CAPTIONER + [f"{key}={captioner_pt}"])
        msg = str(ei.value)
        one_line(msg)
        assert msg.startswith(f"{key} '{captioner_pt}': a captioner's export (train.stage=xe), not CLIP weights: "
                              "give the evaluator stage's model.pt or a PAC-S / open_clip checkpoint"), msg
    assert "train.stage=xe" in str(pytest.raises(ConfigError, create_clip, "dico-tiny", str(captioner_pt)).value)
    assert "goes in evaluator.weights" in captioner_export_problem(str(captioner_pt), "train.init_from")
    with pytest.raises(ConfigError) as ei:  # the evaluator stage starts from it
        load_config(str(REPO / "configs/demo/evaluator.yaml"), [f"train.init_from={captioner_pt}"])
    assert f"'train.init_from': '{captioner_pt}' is a captioner's export (train.stage=xe)" in str(ei.value)
    one_line(str(ei.value))

    cfg = load_config(str(REPO / "configs/demo/evaluator.yaml"), [f"train.output_dir={tmp_path}", "train.init_from="])
    evaluator = tmp_path / "model.pt"  # engine.export_weights' layout, of the evaluator stage
    torch.save({"state_dict": create_clip("dico-tiny")[0].state_dict(), "config": to_yaml(cfg), "stage": "evaluator",
                "step": 1, "mlflow_run_id": None}, evaluator)
    assert captioner_export_problem(str(evaluator), "evaluator.weights") is None
    assert sniff_weights_format(str(evaluator), "evaluator.weights") == "torch"
    create_clip("dico-tiny", str(evaluator))


def test_clis_exit_2_with_one_line(bad_files, captioner_pt, tiny_shards, clean_env, tmp_path, capsys):
    from dico_scale import evaluate

    bad = bad_files["notes.txt"]
    assert evaluate.main(["--checkpoint", str(captioner_pt), "--shards", tiny_shards["test"], "--clip",
                          f"{NAME}:{bad}"]) == 2
    err = capsys.readouterr().err
    one_line(err)
    assert err.startswith("dico_scale.evaluate: error: --clip weights") and bad in err

    start = time.monotonic()
    cmd = [sys.executable, "dico_scale/train.py", "--config", "configs/demo/xe.yaml", *TINY_CAPTIONER,
           f"train.output_dir={tmp_path}/run", f"evaluator.weights={bad}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_line(proc.stderr)
    assert "dico_scale: config error:" in proc.stderr and bad in proc.stderr and "evaluator.weights" in proc.stderr
    assert time.monotonic() - start < 60


def test_architecture_mismatches_name_what_differs(files, quick_name, tmp_path):
    deeper = tmp_path / "deeper"
    deeper.mkdir()
    save_hf(deeper, hf_config(vision_layers=2), seed=1)
    msg = str(pytest.raises(ConfigError, create_clip, NAME, str(deeper)).value)
    one_line(msg)
    assert str(deeper) in msg and "vision layers 3 (open_clip) vs 2 (Hugging Face)" in msg

    gelu = tmp_path / "gelu"
    gelu.mkdir()
    hf = save_hf(gelu, hf_config(act="gelu"), seed=2)
    msg = str(pytest.raises(ConfigError, create_clip, NAME, str(gelu)).value)
    assert "vision activation quick_gelu (open_clip) vs gelu (Hugging Face)" in msg
    model = create_clip("dico-tiny", str(gelu))[0].eval()  # GELU towers: open_clip's names without -quickgelu
    with torch.no_grad():
        close(model.encode_image(pixels()), hf.get_image_features(pixel_values=pixels()).pooler_output)
        close(model.encode_text(tokens("dico-tiny")), hf.get_text_features(input_ids=tokens("dico-tiny")).pooler_output)

    msg = str(pytest.raises(ConfigError, create_clip, "dico-tiny", files["torchscript"][0]).value)
    one_line(msg)
    assert "quick_gelu" in msg and "-quickgelu" in msg


class Local:
    """What the stage needs of a DeepSpeed engine: `module` and a forward call."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# ---- the training reward ------------------------------------------------------------------------------------------

COSINES = torch.tensor([0.6, 0.05, -0.1, -0.4, 0.0])


def features_with_cosines(text: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Unit vectors whose cosine with text[i] is exactly cos[i]."""
    other = F.normalize(torch.randn(text.shape, generator=torch.Generator().manual_seed(0)), dim=-1)
    other = F.normalize(other - (other * text).sum(-1, keepdim=True) * text, dim=-1)
    return cos[:, None] * text + (1 - cos[:, None] ** 2).sqrt() * other


def test_training_reward_with_and_without_clamp():
    assert torch.equal(reward(2.5, COSINES, clamp=False), 2.5 * COSINES)
    assert torch.equal(reward(2.5, COSINES, clamp=True), torch.tensor([1.5, 0.125, 0.0, 0.0, 0.0]))
    torch.manual_seed(0)
    ev = ClipScorer(EvaluatorConfig(model="dico-tiny", metric="pacs"))
    captions = ["a red circle", "a blue square", "a star", "two crosses", "a green shape"]
    image = features_with_cosines(ev.text_features(captions), COSINES)
    raw, clamped = ev.score(image, captions, clamp=False), ev.score(image, captions)
    close(raw, 2.0 * COSINES)
    close(clamped, 2.0 * COSINES.clamp(min=0))
    assert raw[2] > raw[3] and clamped[2] == clamped[3] == 0  # clamping makes the two negative ones tie
    assert load_config(None, ["data.train_shards=x"]).dico.reward_clamp is False  # the DiCO code's default


@pytest.mark.parametrize("clamp", [False, True])
def test_dico_stage_reward_follows_the_config(clamp, monkeypatch):
    from dico_scale.stages.dico import DicoStage

    cfg = load_config(str(REPO / "configs/demo/dico.yaml"), TINY_CAPTIONER + [
        "generation.candidates=3", "loss.kernel=torch", f"dico.reward_clamp={str(clamp).lower()}"])
    torch.manual_seed(0)
    stage = DicoStage(cfg, torch.device("cpu"))
    engine = Local(stage.module)
    stage.setup(engine)
    e0, e1 = torch.eye(128)[0], torch.eye(128)[1]
    # every candidate scores a negative cosine: -0.1, -0.2, -0.3 for the 3 beams of each image
    monkeypatch.setattr(stage.evaluator, "image_features", lambda px: e0.expand(px.size(0), 128))
    cos = torch.tensor([-0.1, -0.2, -0.3])

    def text_features(captions):
        c = cos.repeat(len(captions) // 3)[:, None]
        return c * e0 + (1 - c ** 2).sqrt() * e1
    monkeypatch.setattr(stage.evaluator, "text_features", text_features)
    out = stage.step(engine, {"pixels": pixels(2)})
    w = stage.evaluator.weight
    assert float(out.metrics["score/mean"]) == pytest.approx(0.0 if clamp else w * -0.2, abs=1e-6)
    assert float(out.metrics["score/winner"]) == pytest.approx(0.0 if clamp else w * -0.1, abs=1e-6)


# ---- safetensors exports ------------------------------------------------------------------------------------------

def test_a_full_disk_is_one_line_and_leaves_no_partial_file(captioner_pt, tiny_shards, clean_env, no_coco, tmp_path,
                                                            capsys, monkeypatch):
    """export and evaluate on a full disk: one line (training's words), exit 1, no temporary file, and an earlier
    result at --out untouched (evaluate truncated it to 0 bytes before)."""
    import errno
    import shutil

    import safetensors.torch

    from dico_scale import checkpoint, evaluate, export
    from dico_scale.errors import CheckpointError

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))

    def partial(*args, error):  # writes a piece of its file, then fails as a full disk does
        Path(args[1]).write_bytes(b"PK")
        raise error
    monkeypatch.setattr(torch, "save", lambda *a, **k: partial(*a, error=RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")))
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: partial(*a, error=OSError(
        errno.ENOSPC, "No space left on device")))
    blob = torch.load(captioner_pt, weights_only=True)
    for fmt, name in (("pt", "x.pt"), ("safetensors", "x.safetensors")):  # export.main reports it as its error line
        out = tmp_path / "full" / name
        with pytest.raises(CheckpointError) as e:
            export.write_export(blob, str(out), fmt)
        assert str(e.value) == f"export {out}: no space left on device (0 bytes free in {out.parent})"
        assert os.listdir(out.parent) == []
    result = tmp_path / "e.json"
    result.write_text("an earlier result")
    real_write = Path.write_text
    def full(self, text, *args, **kwargs):  # the result's file alone meets the full disk
        if self.parent != tmp_path:
            return real_write(self, text, *args, **kwargs)
        real_write(self, text[:10])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    argv = ["--checkpoint", str(captioner_pt), "--shards", tiny_shards["test"], "--train-shards", "none",
            "--no-spice", "--out", str(result)]
    assert evaluate.main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"dico_scale.evaluate: error: result {result}: no space left "
                                                        f"on device (0 bytes free in {tmp_path})")
    assert result.read_text() == "an earlier result" and sorted(os.listdir(tmp_path)) == ["e.json", "full"]


def test_safetensors_export_round_trips(captioner_pt, tiny_shards, clean_env, no_coco, tmp_path, capsys):
    from PIL import Image

    from dico_scale import caption, export

    out = tmp_path / "dico.safetensors"
    assert export.main(["--checkpoint", str(captioner_pt), "--out", str(out), "--format", "safetensors"]) == 0
    side = json.loads((tmp_path / "dico.json").read_text())
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as model.pt (safetensors writes 0600)
    blob = torch.load(captioner_pt, weights_only=True)
    assert (side["config"], side["stage"], side["step"], side["weights"]) == (blob["config"], "xe", 3,
                                                                               "dico.safetensors")
    as_clip = pytest.raises(ConfigError, sniff_weights_format, str(out), "evaluator.weights")  # the sidecar's stage
    assert "a captioner's export (train.stage=xe)" in str(as_clip.value)
    capsys.readouterr()

    cfg = load_config(str(REPO / "configs/demo/xe.yaml"), TINY_CAPTIONER + [f"train.init_from={out}"])
    torch.manual_seed(99)
    fresh = build_captioner(cfg, cfg.train.init_from)  # as train.init_from reads it
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, blob["state_dict"][k]), k

    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(tmp_path / name)
    lines = {}
    for ckpt in (captioner_pt, out):
        assert caption.main(["--checkpoint", str(ckpt), str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]) == 0
        lines[ckpt] = capsys.readouterr().out
    assert lines[out] == lines[captioner_pt] and len(lines[out].splitlines()) == 2

    folder = tmp_path / "photos"  # a folder: its images in order, a file that is no image skipped with a reason
    folder.mkdir()
    Image.open(tmp_path / "a.png").save(folder / "c.webp")
    (folder / "b.jpg").write_text("not a picture")
    (folder / "notes.txt").write_text("not listed")
    assert caption.main(["--checkpoint", str(out), str(folder), "--beam-size", "2"]) == 1
    printed = capsys.readouterr()
    assert [line.split("\t")[0] for line in printed.out.splitlines()] == [str(folder / "c.webp")]
    assert printed.err == f"dico_scale.caption: skipping {folder / 'b.jpg'}: not an image file PIL can read\n"
    for flag in ("--beam-size", "--max-len", "--batch-size"):
        with pytest.raises(SystemExit) as e:  # argparse's usage error: 0 never means "the default"
            caption.main(["--checkpoint", str(out), str(folder), flag, "0"])
        assert e.value.code == 2 and f"argument {flag}: '0' is not a whole number >= 1" in capsys.readouterr().err
    results = [run_evaluate(c, tiny_shards["test"], tmp_path / f"eval_{i}.json") for i, c in enumerate(
        (captioner_pt, out))]
    assert [e["caption"] for e in results[0]["captions"]] == [e["caption"] for e in results[1]["captions"]]
    assert results[0]["metrics"] == results[1]["metrics"] and results[1]["step"] == 3

    (tmp_path / "dico.json").unlink()  # the weights alone: no config to build the model from
    assert caption.main(["--checkpoint", str(out), str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    one_line(err)
    assert "dico.json" in err and str(out) in err


def test_a_file_torch_did_not_write_is_named_as_such_by_every_reader(tmp_path):
    """train.init_from and --checkpoint name what is wrong with a file, where torch.load said 'KeyError: 101', a miniz
    message, or advice about mmap."""
    from dico_scale.errors import ConfigError
    from dico_scale.export import checkpoint_meta
    from dico_scale.models.weights import read_weights

    export = {"state_dict": {"w": torch.zeros(64, 64)}, "config": "train: {}\n"}
    torch.save(export, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.pt").write_text("hello\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    cases = {"cut.pt": "truncated or corrupt", "text.pt": "not a file torch.save wrote",
             "empty.pt": "not a file torch.save wrote"}
    for name, why in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(ConfigError, match=f"^cannot read weights '{path}': {why}"):
            read_weights(path)
        with pytest.raises(ConfigError, match=f"^cannot read checkpoint '{path}': {why}"):
            checkpoint_meta(path)
    with pytest.raises(ConfigError, match="are not a dico_scale export"):
        read_weights(str(tmp_path / "list.pt"))
    assert read_weights(str(tmp_path / "whole.pt")).keys() == {"w"}
