"""A transformers folder as --checkpoint of caption and evaluate (export.folder_meta): the model a run starts from,
read by the row of its architecture with that row's defaults, and an export's hf/, read as the run it comes from."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import mlflow_uri
from PIL import Image

from dico_scale import caption, evaluate, export
from dico_scale.config import load_config, to_yaml
from dico_scale.models import build_captioner
from dico_scale.models.export_folder import EXPORT_MARK
from dico_scale.models.tiny import write


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Qwen2-VL as a user's save_pretrained folder."""
    return Path(write("qwen2-vl", str(tmp_path_factory.mktemp("folder") / "Qwen2-VL-tiny")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two pictures of different sizes (different patch grids: one padded batch)."""
    tmp, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    paths = [str(tmp / f"{i}.png") for i in range(2)]
    for p, shape in zip(paths, [(40, 56, 3), (16, 64, 3)]):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(p)
    return paths


def _captions(checkpoint, images, capsys) -> str:
    assert caption.main(["--checkpoint", str(checkpoint), *images]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("prompt", [None, "Caption: what is shown, in {one} line?"])
def test_the_starting_folder_captions_as_its_generate_does(folder, images, prompt, capsys):
    """No run: the hf_vlm row (by the folder's architecture) with its own weights, the default search and the default
    prompt or caption's --prompt (any text: YAML would read this one as a mapping), equal to transformers' generate on
    the folder with that search and prompt, one image at a time."""
    import transformers

    from dico_scale.models.generation import exported_search

    printed = _captions(folder, ([] if prompt is None else ["--prompt", prompt]) + images, capsys)
    cfg = load_config(None, ["captioner.model=hf_vlm", f"captioner.hf_path={folder}"], training=False)  # defaults
    cfg.captioner.prompt = prompt or cfg.captioner.prompt
    search = exported_search(transformers.GenerationConfig.from_pretrained(folder), build_captioner(cfg),
                             cfg.generation)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": cfg.captioner.prompt}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    captions = []
    for p in images:
        inputs = processor(images=[Image.open(p).convert("RGB")], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, generation_config=search)
        captions.append(processor.tokenizer.decode(out[0, inputs["input_ids"].size(1):], skip_special_tokens=True))
    assert printed == "".join(f"{p}\t{c.strip()}\n" for p, c in zip(images, captions))


def test_an_export_hf_folder_reads_as_its_run(folder, images, tmp_path, capsys):
    """A LoRA run's export, made here as training's own is (merged weights in model.pt, hf/ beside it): caption on hf/
    prints what it prints on model.pt (the run's prompt and search, not the defaults), and the folder knows its run."""
    overrides = ["captioner.model=hf_vlm", f"captioner.hf_path={folder}", "evaluator.weights=",
                 "captioner.image_encoder_weights=", "train.stage=dico", "captioner.prompt=What is in the picture?",
                 "generation.candidates=2", "generation.max_len=5", "captioner.lora.r=4",
                 f"train.output_dir={tmp_path}", "train.init_from="]
    cfg = load_config("configs/demo/dico.yaml", overrides)
    from dico_scale.models.lora import merged_state

    captioner = build_captioner(cfg)
    torch.manual_seed(1)  # trained: the folder's weights and the adapters moved
    with torch.no_grad():
        for p in captioner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = merged_state(captioner, {k: v.detach().clone() for k, v in captioner.state_dict().items()})
    blob = {"state_dict": state, "config": to_yaml(cfg), "stage": "dico", "step": 7, "mlflow_run_id": "abc123"}
    export.write_export(blob, str(tmp_path / "model.pt"), "pt")
    export.write_hf_folder(blob, tmp_path / "hf")

    meta = export.checkpoint_meta(str(tmp_path / "hf"))
    run_cfg = export.load_run_config(meta)
    assert (meta["stage"], meta["step"], meta["mlflow_run_id"]) == ("dico", 7, "abc123")
    assert run_cfg.captioner.prompt == "What is in the picture?" and run_cfg.captioner.lora.r == 0
    assert run_cfg.captioner.hf_path == str((tmp_path / "hf").resolve())

    from_export = _captions(tmp_path / "model.pt", images, capsys)
    assert _captions(tmp_path / "hf", images, capsys) == from_export
    assert from_export != _captions(folder, images, capsys)  # the trained weights, not the starting folder's

    plain = tmp_path / "plain"  # the same weights without the record of its run: the defaults, and a note
    shutil.copytree(tmp_path / "hf", plain)
    (plain / EXPORT_MARK).unlink()
    assert caption.main(["--checkpoint", str(plain), *images]) == 0
    out, err = capsys.readouterr()
    assert out.replace(str(plain), "") != from_export.replace(str(tmp_path / "hf"), "")
    assert f"note: {plain / 'generation_config.json'} sets num_beams=2 (ours: generation.candidates=5)" in err


def test_evaluate_scores_the_starting_folder_on_a_new_mlflow_run(folder, tiny_shards, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = mlflow_uri(tmp_path / "mlflow.db")
    base = ["--checkpoint", str(folder), "--no-spice", f"tracking.uri={uri}", "generation.candidates=2",
            "generation.max_len=5"]
    assert evaluate.main(base) == 2  # no run config, so no splits
    assert capsys.readouterr().err.strip() == ("dico_scale.evaluate: error: the checkpoint's config has no test "
                                               "shards (data.test_shards is empty); pass --shards SPEC")

    assert evaluate.main(base + ["--shards", tiny_shards["test"]]) == 0
    out = folder.parent / "eval_Qwen2-VL-tiny_test.json"  # beside the folder, named after it
    result = json.loads(out.read_text())
    assert (result["checkpoint"], result["stage"], result["step"], result["images"]) == (str(folder), "xe", None, 10)
    assert result["settings"]["beam_size"] == 2 and result["metrics"]["CIDEr"] is not None
    assert "novelty skipped: the checkpoint's config has no training split (--train-shards SPEC)" in result["notes"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.run_name == "eval-Qwen2-VL-tiny-test"
    assert run.data.metrics["eval/test/images"] == 10 and run.data.params["captioner.model"] == "hf_vlm"


@pytest.mark.parametrize("family", ["vit-gpt2", "dico-ref"])
def test_encoder_decoder_folders_are_read_by_their_rows(family, images, tmp_path, capsys):
    """A VisionEncoderDecoderModel folder by hf_encoder_decoder, the DiCO reference's released layout by dico_ref."""
    path = write(family, str(tmp_path / family))
    meta = export.checkpoint_meta(path)
    meta_row = {"vit-gpt2": "hf_encoder_decoder"}.get(family, "dico_ref")
    assert export.load_run_config(meta).captioner.model == meta_row
    printed = _captions(path, images, capsys)  # (a random model's byte-level captions may hold newlines)
    assert printed.startswith(f"{images[0]}\t") and f"\n{images[1]}\t" in printed
    assert caption.main(["--checkpoint", path, "--prompt", "Describe it.", *images]) == 2
    assert capsys.readouterr().err.strip() == ("dico_scale.caption: error: --prompt Describe it. does not fit this "
                                               "checkpoint: bad value for config key 'captioner.prompt': read by the "
                                               f"rows hf_vlm, not captioner.model={meta_row}")


def test_folders_no_row_reads_and_export_of_a_folder_are_one_line(folder, images, tmp_path, capsys):
    lm = tmp_path / "gpt2"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert caption.main(["--checkpoint", str(lm), *images]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dico_scale.caption: error: checkpoint folder '{lm}': architecture GPT2LMHeadModel is "
                          "not a captioner dico_scale reads (Idefics3ForConditionalGeneration, ") and "\n" not in err

    # the processor's refusal, before any weights load (nothing printed before the line)
    assert caption.main(["--checkpoint", str(folder), "--prompt", "<|image_pad|> Describe it.", *images]) == 2
    assert capsys.readouterr().err.strip() == ("dico_scale.caption: error: --prompt <|image_pad|> Describe it. does "
                                               "not fit this checkpoint: captioner.prompt: holds the image token "
                                               f"<|image_pad|>; '{folder}' has a chat template that places the image "
                                               "itself")

    bad = tmp_path / "bad"  # an export folder whose record of its run is not a config
    shutil.copytree(folder, bad)
    (bad / EXPORT_MARK).write_text(json.dumps({"written_by": "dico_scale", "run": {"config": "[1, 2]"}}))
    assert caption.main(["--checkpoint", str(bad), *images]) == 2
    assert capsys.readouterr().err.strip() == (f"dico_scale.caption: error: checkpoint folder '{bad}' "
                                               f"({EXPORT_MARK}): its run config is not a YAML mapping")

    assert export.main(["--checkpoint", str(folder), "--out", str(tmp_path / "m.pt")]) == 2
    assert capsys.readouterr().err.strip() == (f"dico_scale.export: error: --checkpoint {folder} is a transformers "
                                               "folder, not a training checkpoint: nothing to consolidate")
    assert not (tmp_path / "m.pt").exists()


def _compare_yaml(folder: Path, tmp_path: Path) -> str:
    yaml = tmp_path / "compare.yaml"
    yaml.write_text(f"extends: {Path('configs/demo/compare.yaml').resolve()}\nxe_checkpoint: {folder}\n"
                    f"output_dir: {tmp_path}/compare\nsteps: 2\nval_every: 1\nexamples: 1\nscst_cider: false\n"
                    f"figure: {tmp_path}/figure.png\n")
    return str(yaml)


def test_compare_checks_the_folder_s_prompt_before_anything_trains(folder, tmp_path, capsys):
    from dico_scale import compare

    uri = mlflow_uri(tmp_path / "mlflow.db")
    assert compare.main(["--config", _compare_yaml(folder, tmp_path), f"tracking.uri={uri}", "evaluator.weights=",
                         "captioner.prompt=<|image_pad|> Describe it."]) == 2
    assert capsys.readouterr().err.strip() == (
        "dico_scale.compare: config error: run dico: captioner.prompt: holds the image token <|image_pad|>; "
        f"'{folder}' has a chat template that places the image itself")
    from mlflow.tracking import MlflowClient

    assert not (tmp_path / "compare" / "dico").exists()
    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("dico-demo") is None  # nor a parent run


def test_compare_starts_dico_and_scst_from_the_folder(folder, tmp_path, capsys):
    """DiCO vs SCST from a released VLM: each run is the folder's row on its weights (no train.init_from), DiCO's
    reference is the folder too (its first loss log 2), and the folder is the table's first row (XE)."""
    import math

    from mlflow.tracking import MlflowClient

    from dico_scale import compare
    from dico_scale.models.clip import create_clip, save_clip

    cfg = load_config("configs/demo/dico.yaml", ["evaluator.weights=", "captioner.image_encoder_weights=",
                                                 "train.init_from="])
    torch.manual_seed(0)  # one evaluator for the trainer's runs and the table (a random one differs per process)
    save_clip(create_clip(cfg.evaluator.model)[0], str(tmp_path / "evaluator.pt"))
    uri = mlflow_uri(tmp_path / "mlflow.db")
    assert compare.main(["--config", _compare_yaml(folder, tmp_path), "--ranks", "1", f"tracking.uri={uri}", f"data.root={tmp_path}/data",
                         "data.synthetic.n_train=16", "data.synthetic.n_val=4", "data.synthetic.n_test=4",
                         "data.synthetic.samples_per_shard=8", f"evaluator.weights={tmp_path}/evaluator.pt",
                         "train.micro_batch_size=2", "generation.candidates=2", "scst.candidates=2",
                         "generation.max_len=5", "optim.lr=1e-3", "optim.warmup_steps=0", "train.log_every=1"]) == 0
    out = capsys.readouterr().out
    assert "selected checkpoints on 4 held-out test images" in out and "\nXE " in out and "\nDiCO " in out

    client = MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id])}
    for name in ("dico", "scst"):
        params = runs[name].data.params
        assert (params["captioner.model"], params["captioner.hf_path"], params["train.init_from"]) == (
            "hf_vlm", str(folder), "")
    (first, *_) = sorted((m.step, m.value) for m in client.get_metric_history(runs["dico"].info.run_id, "train/loss"))
    assert first[0] == 1 and first[1] == pytest.approx(math.log(2), abs=1e-6)  # the policy is its reference: the folder
    summary = json.loads((tmp_path / "compare" / "summary.json").read_text())
    assert summary["selected"]["XE"] == str(folder) and list(summary["test"]) == ["XE", "DiCO", "SCST"]
    assert summary["start"]["images"] == 4  # the folder at step 0, on the val split the runs validate on
    trained = torch.load(tmp_path / "compare" / "dico" / "model.pt", weights_only=True)["state_dict"]
    start = build_captioner(load_config("configs/demo/dico.yaml", ["captioner.model=hf_vlm", "evaluator.weights=",
                                                                   f"captioner.hf_path={folder}", "train.init_from="]))
    start = start.state_dict()
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)


def test_weights_of_another_row_name_the_row_and_folder_they_were_trained_as(folder, tmp_path):
    """train.init_from (or compare's xe_checkpoint) of a VLM run given to the built-in captioner, and the other way
    round: the load's one line says what the weights were trained as, not only which keys are missing."""
    from dico_scale.config import ConfigError

    blank = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]
    vlm = load_config("configs/demo/dico.yaml", blank + ["captioner.model=hf_vlm", f"captioner.hf_path={folder}"])
    builtin = load_config("configs/demo/dico.yaml", blank)
    for cfg, name in ((vlm, "vlm.pt"), (builtin, "builtin.pt")):
        torch.save({"state_dict": build_captioner(cfg).state_dict(), "config": to_yaml(cfg)}, tmp_path / name)
    with pytest.raises(ConfigError) as e:
        build_captioner(builtin, str(tmp_path / "vlm.pt"))
    assert str(e.value).startswith(f"weights '{tmp_path / 'vlm.pt'}' do not fit the configured model (")
    assert str(e.value).endswith(f" (trained as captioner.model=hf_vlm, captioner.hf_path={folder}; configured: "
                                 "captioner.model=builtin, captioner.hf_path=)")
    with pytest.raises(ConfigError) as e:
        build_captioner(vlm, str(tmp_path / "builtin.pt"))
    assert str(e.value).endswith(f" (trained as captioner.model=builtin, captioner.hf_path=; configured: "
                                 f"captioner.model=hf_vlm, captioner.hf_path={folder})")
    from dico_scale import compare
    with pytest.raises(ConfigError) as e:  # compare says it before any run starts
        compare.check_start_row(str(tmp_path / "vlm.pt"), builtin)
    assert str(e.value) == (f"XE checkpoint '{tmp_path / 'vlm.pt'}' was trained as captioner.model=hf_vlm, the runs "
                            "train captioner.model=builtin (set captioner.model and captioner.hf_path for every run, "
                            "or dico_config and scst_config of that row)")
    compare.check_start_row(str(tmp_path / "vlm.pt"), vlm)
    from safetensors.torch import save_file  # a safetensors export records its run in the JSON beside it
    save_file(build_captioner(vlm).state_dict(), str(tmp_path / "vlm.safetensors"))
    (tmp_path / "vlm.json").write_text(json.dumps({"config": to_yaml(vlm)}))
    with pytest.raises(ConfigError, match="was trained as captioner.model=hf_vlm, the runs train captioner.model=b"):
        compare.check_start_row(str(tmp_path / "vlm.safetensors"), builtin)
    torch.save({"state_dict": build_captioner(builtin).state_dict()}, tmp_path / "bare.pt")  # no record of its run
    compare.check_start_row(str(tmp_path / "bare.pt"), vlm)  # left to the load
    with pytest.raises(ConfigError) as e:
        build_captioner(vlm, str(tmp_path / "bare.pt"))
    assert "trained as" not in str(e.value) and "\n" not in str(e.value)
