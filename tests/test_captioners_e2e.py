"""Every Hugging Face captioner row through the real loop on 2 CPU ranks, in one launch of
tests/distributed/captioners_check.py: xe -> dico -> scst (ZeRO-2) per family (vit-gpt2 and BLIP on
hf_encoder_decoder, the DiCO reference's layout on dico_ref, Idefics3, Gemma 3, Qwen3-VL, LLaVA-NeXT, InternVL,
PaliGemma 2 and Qwen2-VL on hf_vlm), dico in bf16, a ZeRO-3 dico run stopped and resumed on the same MLflow run,
Qwen2-VL dico with LoRA under ZeRO-3, an Idefics3 dico run with LoRA killed (SIGKILL) and resumed; then caption and
evaluate on the exports, the exported transformers folder (hf/) generating the captions dico_scale.caption prints, and
a LoRA run's adapters (peft) equal to its merged export."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import check_ok, kill_at, mlflow_uri, ranks_cmd
from PIL import Image

pytestmark = pytest.mark.distributed

# the last seven: vision-language models (Gemma 3: bidirectional image attention, sliding windows, a tied head;
# Qwen3-VL: deepstack, interleaved mrope; LLaVA-NeXT: anyres tiles zero-padded per batch; InternVL: every image's tiles
# in one list; PaliGemma 2: a prefix-LM on a Gemma 2 whose logits are softcapped, eager attention); the last one also
# trains LoRA under ZeRO-3
FAMILIES = ("vit-gpt2", "blip", "dico-ref", "idefics3", "gemma3", "qwen3-vl", "llava-next", "internvl", "paligemma2",
            "qwen2-vl")
HF = ("vit-gpt2", "blip")  # the encoder-decoder rows whose export has a transformers folder
VLM = ("idefics3", "qwen2-vl", "llava-next")


def _common(tmp) -> list[str]:
    return [f"data.root={tmp}/data", f"tracking.uri={mlflow_uri(tmp / 'mlflow.db')}", "data.synthetic.n_train=50",
            "data.synthetic.n_val=4", "data.synthetic.n_test=4", "data.synthetic.samples_per_shard=25",
            "train.log_every=1", "data.samples_per_epoch=16", "data.shuffle_buffer=10", "evaluator.weights=",
            "captioner.image_encoder_weights=", "train.micro_batch_size=2", "generation.candidates=3",
            "generation.max_len=6", "train.val_max_images=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo):
    from dico_scale.models.tiny import write

    tmp = tmp_path_factory.mktemp("captioners")
    folders = [f"{f}={write(f, str(tmp / 'models' / f), width=16 if f == 'dico-ref' else 32)}" for f in FAMILIES]
    cmd = [*ranks_cmd("tests/distributed/captioners_check.py"), str(tmp), *folders, "--", *_common(tmp)]
    check_ok(subprocess.run(cmd, cwd=repo, env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"},
                            capture_output=True, text=True, timeout=1200))
    return json.loads((tmp / "captioners.json").read_text()), tmp


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", ["xe", "dico", "scst"])
def test_every_stage_trains_every_row(runs, family, stage):
    result, _ = runs
    r = result["runs"][f"{family}_{stage}"]
    assert r["step"] == 2 and math.isfinite(r["train"]["train/loss"])


def test_validation_on_2_ranks_and_runs_that_skip_it(runs):
    """A VLM and an encoder-decoder row validate after their last step on 2 ranks (val_max_images=2 of 4); the
    other runs set train.validate_at_end=false and have no validation at all."""
    result, _ = runs
    for name in ("idefics3_dico", "vit-gpt2_dico"):
        val = result["runs"][name]["val"]
        assert val["images"] == 2 and math.isfinite(val["cider"]) and "evaluator_score" in val, (name, val)
    assert result["runs"]["idefics3_scst"]["val"] == {} and result["runs"]["qwen2-vl_xe"]["val"] == {}


def test_zero3_resume_and_bf16_on_an_hf_row(runs):
    result, tmp = runs
    assert math.isfinite(result["runs"]["vit-gpt2_dico_bf16"]["train"]["train/loss"])
    assert (tmp / "vit-gpt2_resume" / "checkpoints" / "step_00000002" / "complete").is_file()  # ZeRO-3 tags
    resumed = result["runs"]["vit-gpt2_resume"]
    assert resumed["step"] == 3 and resumed["mlflow_run_id"] == result["resume_first_id"]


def test_killed_vlm_with_lora_resumes_on_the_same_mlflow_run(runs, repo):
    """Idefics3 (hf_vlm) dico with LoRA adapters and its connector trained whole (captioner.lora.modules_to_save),
    2 ranks: SIGKILL (launcher and ranks) after its step-2 checkpoint, then train.resume=auto goes on from the newest
    complete tag (adapters, the connector's two copies and their optimizer state), on the same MLflow run; the export
    holds the trained connector under its plain name. (The other rows' stop-and-resume: the ZeRO-3 run of the
    fixture.)"""
    from mlflow.tracking import MlflowClient

    _, tmp = runs
    out, db = tmp / "idefics3_killed", tmp / "killed.db"
    search = tmp / "models" / "idefics3" / "generation_config.json"  # a folder asking generate for another search
    search.write_text(json.dumps({**json.loads(search.read_text()), "no_repeat_ngram_size": 3}))
    args = _common(tmp) + [f"tracking.uri={mlflow_uri(db)}", f"train.output_dir={out}", "train.save_every=1",
                           "train.keep_checkpoints=5", "train.val_every=0", "captioner.model=hf_vlm",
                           "captioner.lora.r=4", "captioner.lora.modules_to_save=connector",
                           f"captioner.hf_path={tmp / 'models' / 'idefics3'}",
                           f"train.init_from={tmp}/idefics3_xe/model.pt"]
    kill_at("configs/demo/dico.yaml", args + ["train.max_steps=1000"],
            out / "checkpoints" / "step_00000002" / "complete")
    tags = sorted(p.name for p in (out / "checkpoints").glob("step_*") if (p / "complete").exists())
    resumed_from = int(tags[-1].split("_")[1])
    second = check_ok(subprocess.run([*ranks_cmd("dico_scale/train.py"), "--config", "configs/demo/dico.yaml", *args,
                                      "train.resume=auto", f"train.max_steps={resumed_from + 1}"], cwd=repo,
                                     env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                                     timeout=600))
    assert f"at step {resumed_from}" in second.stdout
    assert (f"note: {search} sets no_repeat_ngram_size=3 (ours: generation.no_repeat_ngram_size=0): "
            in second.stdout)  # rank 0's, once
    assert second.stdout.count(f"note: {search}") == 1
    # rank 0's projection of the log-prob pass (dico_scale.activations): 2 images x 3 candidates, fp32 on the CPU
    assert second.stdout.count("log-prob pass per rank, projected (2 images x 3 sequences x 7 tokens in fp32; ") == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("dico-demo").experiment_id])
    assert run.info.status == "FINISHED"
    assert int(run.data.params["memory/log_prob_pass/activations"]) > 0  # written once, by the first start
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert set(range(1, resumed_from + 2)) <= steps
    start, final = (torch.load(p, weights_only=True)["state_dict"] for p in (tmp / "idefics3_xe" / "model.pt",
                                                                               out / "model.pt"))
    connector = "model.model.connector.modality_projection.proj.weight"
    assert final.keys() == start.keys() and not torch.equal(final[connector], start[connector])


@pytest.mark.parametrize("family", HF)
def test_caption_on_the_export_and_its_hf_folder(runs, family, tmp_path, capsys):
    import transformers

    from dico_scale import caption
    from dico_scale.models.captioner import banned_tokens

    _, tmp = runs
    run = tmp / f"{family}_dico"
    rng = np.random.default_rng(0)
    paths = [str(tmp_path / f"{i}.png") for i in range(2)]
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(p)
    assert caption.main(["--checkpoint", str(run / "model.pt"), *paths]) == 0
    printed = capsys.readouterr().out  # (a random model's byte-level captions may hold newlines)

    hf = run / "hf"  # what a transformers user does with the export
    arch = json.loads((hf / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(hf).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(hf)
    from dico_scale.models.hf_encoder_decoder import load_tokenizer

    tok = load_tokenizer(str(hf), model)
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    banned = [[t] for t in banned_tokens(tok.bos, tok.eos, tok.pad)]
    search = model.generation_config  # the run's search, written by the export: generate needs no arguments
    assert (search.num_beams, search.max_new_tokens, search.length_penalty, search.early_stopping) == (3, 6, 1.0, False)
    assert search.bad_words_ids == (banned or None) and search.do_sample is False
    with torch.no_grad():  # BLIP's generate gives its text decoder that decoder's own defaults unless told otherwise
        out = model.generate(pixel_values=pixels, **({"generation_config": search} if family == "blip" else {}))
    assert printed == "".join(f"{p}\t{c}\n" for p, c in zip(paths, tok.decode_batch(out)))
    assert caption.main(["--checkpoint", str(hf), *paths]) == 0  # the folder alone, read as its run
    assert capsys.readouterr().out == printed



def test_lora_under_zero3_exports_merged_weights_and_peft_adapters(runs, repo, tmp_path):
    """The LoRA run's model.pt and hf/ hold the merged weights (no adapter keys; the text model's final norm, trained
    whole by captioner.lora.modules_to_save, under its plain name); `dico_scale.export` writes the same merged model
    from its checkpoint tag, or peft's adapter folder (the norm in it), which PeftModel loads onto the starting model
    (the xe export) to give the merged folder's logits."""
    import peft
    import transformers

    result, tmp = runs
    r, run = result["runs"]["qwen2-vl_lora_zero3"], tmp / "qwen2-vl_lora_zero3"
    assert r["step"] == 2 and math.isfinite(r["train"]["train/loss"])
    assert "gradient_checkpointing: true" in (run / "config.yaml").read_text()
    final = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    assert not any(".lora_" in k or "original_module" in k or "modules_to_save" in k for k in final)
    start = torch.load(tmp / "qwen2-vl_xe" / "model.pt", weights_only=True)["state_dict"]
    assert final.keys() == start.keys()
    norm, frozen = "model.model.language_model.norm.weight", "model.model.language_model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(final[norm], start[norm]) and torch.equal(final[frozen], start[frozen])
    tag = str(run / "checkpoints" / "step_00000002")
    for args in (["--out", str(tmp_path / "model.pt")], ["--out", str(tmp_path / "adapters"), "--adapters-only"]):
        check_ok(subprocess.run([sys.executable, "-m", "dico_scale.export", "--checkpoint", tag, *args], cwd=repo,
                                env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                                timeout=300))
    again = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert again.keys() == final.keys() and all(torch.allclose(again[k], final[k], atol=1e-6) for k in final)
    from omegaconf import OmegaConf

    from dico_scale.export import checkpoint_meta

    exported = checkpoint_meta(str(run / "model.pt"))
    for folder in (run / "hf", tmp_path / "hf"):  # the training's export and the command's: the run's search
        meta = checkpoint_meta(str(folder))  # and the run, which caption and evaluate read it as (LoRA merged)
        assert exported["mlflow_run_id"] and (meta["step"], meta["mlflow_run_id"]) == (2, exported["mlflow_run_id"])
        lora = [OmegaConf.create(m["config"]).captioner.lora.r for m in (meta, exported)]
        assert lora[0] == 0 < lora[1]
        search = json.loads((folder / "generation_config.json").read_text())
        assert {k: search.get(k) for k in ("num_beams", "max_new_tokens", "length_penalty", "early_stopping")} == {
            "num_beams": 3, "max_new_tokens": 6, "length_penalty": 1.0, "early_stopping": False}, folder

    merged = transformers.AutoModelForImageTextToText.from_pretrained(run / "hf").eval()
    base = transformers.AutoModelForImageTextToText.from_pretrained(tmp / "qwen2-vl_xe" / "hf").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapters").eval()  # injects into base
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-4)
    assert (before - merged(input_ids=ids).logits).abs().max() > 1e-4  # the adapters trained


def test_export_never_replaces_a_folder_it_did_not_write(runs, tmp_path, capsys):
    """hf/ beside --out, or --adapters-only's folder, holding a user's files (the starting model's folder, say) is
    refused before anything is written; an empty one or an earlier export is replaced."""
    from dico_scale import export

    tag = str(runs[1] / "vit-gpt2_resume" / "checkpoints" / "step_00000002")
    theirs = tmp_path / "hf" / "config.json"
    theirs.parent.mkdir()
    theirs.write_text("{}")
    bad = {("--out", str(tmp_path / "model.pt")): f"{tmp_path / 'hf'} holds files and is not a dico_scale export",
           ("--out", str(tmp_path), ): f"--out '{tmp_path}' is a folder; name the file to write",
           ("--out", str(tmp_path / "hf"), "--adapters-only"): f"--out {tmp_path / 'hf'} holds files",
           ("--out", str(tmp_path / "a.safetensors"), "--adapters-only", "--format", "safetensors"):
               "--format does not apply"}
    for args, needle in bad.items():
        assert export.main(["--checkpoint", tag, *args]) == 2
        assert needle in capsys.readouterr().err.strip().splitlines()[-1]
    assert theirs.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]

    theirs.unlink()  # empty: written; then an earlier export: replaced
    for _ in range(2):
        assert export.main(["--checkpoint", tag, "--out", str(tmp_path / "model.pt")]) == 0
        assert {"config.json", "dico_scale_export.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    # a second export into that folder would take model.pt's hf/; and a run's own folder is its own
    before = (tmp_path / "hf" / "dico_scale_export.json").read_text()
    assert export.main(["--checkpoint", tag, "--out", str(tmp_path / "b.pt")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{tmp_path / 'hf'} is the transformers folder of another export there (dico step 2), which this one would "
        "replace: export into a folder of its own")
    run = runs[1] / "vit-gpt2_xe"
    assert export.main(["--checkpoint", tag, "--out", str(run / "other.pt")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"but '{run / 'hf'}' is the run {run}'s export ({run / 'hf'}), "
                                                    "which its resume and the next stage's train.init_from read: "
                                                    "write it elsewhere")
    assert (tmp_path / "hf" / "dico_scale_export.json").read_text() == before and not (run / "other.pt").exists()


def test_adapters_only_on_a_run_without_lora_is_one_line(runs, tmp_path, capsys):
    from dico_scale import export

    tag = runs[1] / "vit-gpt2_resume" / "checkpoints" / "step_00000002"  # ZeRO-3, no adapters
    assert export.main(["--checkpoint", str(tag), "--out", str(tmp_path / "adapters"), "--adapters-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # refused before DeepSpeed consolidates (and speaks)
    assert err == ["dico_scale.export: error: --adapters-only: the checkpoint holds no LoRA adapters "
                   "(captioner.lora.r=0)"]
    assert not (tmp_path / "adapters").exists()
    # a LoRA run's state without adapter weights (past main's check of lora.r) names what is missing
    with pytest.raises(export.ConfigError, match=r"^--adapters-only: the checkpoint's weights hold no LoRA adapters"):
        export.write_adapters({"stage": "dico", "step": 2}, export.adapted_captioner({"state_dict": {}}),
                              str(tmp_path / "adapters"))
    assert not (tmp_path / "adapters").exists()


@pytest.mark.parametrize("family", VLM)
def test_caption_and_evaluate_on_a_vlm_export_and_generate_on_its_hf_folder(runs, family, tmp_path, capsys):
    """Images of two sizes (different tile counts / patch grids) captioned in one batch by dico_scale.caption, and
    one by one by `generate` on the exported folder with its processor and chat template, as a user would: no search
    arguments, the folder's generation config is the run's."""
    import transformers

    from dico_scale import caption

    _, tmp = runs
    run = tmp / f"{family}_scst"
    rng = np.random.default_rng(0)
    paths = [str(tmp_path / f"{i}.png") for i in range(2)]
    for p, shape in zip(paths, [(40, 56, 3), (16, 64, 3)]):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(p)
    assert caption.main(["--checkpoint", str(run / "model.pt"), *paths]) == 0
    printed = capsys.readouterr().out

    hf = run / "hf"
    model = transformers.AutoModelForImageTextToText.from_pretrained(hf).eval()
    processor = transformers.AutoProcessor.from_pretrained(hf)
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "Describe this image in one sentence."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    captions = []
    for p in paths:
        inputs = processor(images=[Image.open(p).convert("RGB")], text=[prompt], return_tensors="pt")
        with torch.no_grad():  # the run's search is the folder's generation config (the export wrote it)
            out = model.generate(**inputs)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].size(1):], skip_special_tokens=True)
        captions.append(text.strip())
    assert printed == "".join(f"{p}\t{c}\n" for p, c in zip(paths, captions))
    assert caption.main(["--checkpoint", str(hf), *paths]) == 0  # the folder alone, read as its run
    assert capsys.readouterr().out == printed

    if family == "idefics3":  # evaluate's Java metrics cost ~20 s a call on 2 cores: one row (batches of tiles)
        import open_clip

        from dico_scale import evaluate
        from dico_scale.models import clip

        # as in a fresh process: the demo's tiny CLIP configs unknown until evaluate registers them itself (a VLM
        # captioner, unlike the built-in one, registers none)
        for name in [n for n in open_clip.list_models() if n.startswith("dico-")]:
            del open_clip.factory._MODEL_CONFIGS[name]
        clip._registered.clear()
        assert evaluate.main(["--checkpoint", str(run / "model.pt"), "--shards", "test", "--no-spice",
                              "--out", str(tmp_path / "eval.json")]) == 0
        assert json.loads((tmp_path / "eval.json").read_text())["images"] == 4


def test_caption_on_the_dico_ref_export(runs, tmp_path, capsys):
    from dico_scale import caption

    _, tmp = runs
    Image.fromarray(np.zeros((40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert caption.main(["--checkpoint", str(tmp / "dico-ref_scst" / "model.pt"), str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'a.png'}\t")
    assert not (tmp / "dico-ref_scst" / "hf").exists()
