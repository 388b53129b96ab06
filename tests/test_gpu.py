"""On a CUDA machine (marker gpu; run by `make gpu-check`): one process, nccl, bf16 through DeepSpeed.

The GPU machine has no MLflow and no Java (pycocoevalcap's tokenizer): these runs disable tracking and have no
validation split."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parent.parent
COMMON = ["train.device=cuda", "tracking.enabled=false", "train.log_every=1", "data.synthetic.n_train=200",
          "data.synthetic.n_val=0", "data.synthetic.n_test=8", "data.synthetic.samples_per_shard=50",
          "evaluator.weights=", "captioner.image_encoder_weights="]
ENV = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}


def _train(config: str, tmp: Path, *overrides: str):
    proc = subprocess.run([sys.executable, "dico_scale/train.py", "--config", config, f"data.root={tmp}/data",
                           "train.max_steps=3", *COMMON, *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_xe_then_dico_on_cuda_bf16(tmp_path):
    _train("configs/demo/xe.yaml", tmp_path, f"train.output_dir={tmp_path}/xe")
    proc = _train("configs/demo/dico.yaml", tmp_path, f"train.output_dir={tmp_path}/dico",
                  f"train.init_from={tmp_path}/xe/model.pt")
    assert "done: stage=dico step=3" in proc.stdout


VLM = ["captioner.model=hf_vlm", "train.precision=bf16", "train.deepspeed_config=configs/deepspeed/zero3.json",
       "train.init_from=", "train.max_steps=2", "train.max_nonfinite_steps=1", "optim.lr=1e-4", "optim.warmup_steps=0"]
LORA = ["captioner.lora.r=16", "captioner.lora.alpha=32", "captioner.lora.target_modules=q_proj,k_proj,v_proj,o_proj"]


def test_vlm_dico_zero3_bf16_full_and_lora(tmp_path):
    """hf_vlm on one GPU, two families side by side, trained by DiCO under ZeRO-3 in bf16: a random Idefics3 (SmolVLM's
    layout, width 512) fully fine-tuned, and a random Gemma 3 (width 512: bidirectional image attention in the prefill,
    sliding-window layers, a tied head) with LoRA (the configs' adapters; its text layers recomputed in backward). Every loss is finite
    (train.max_nonfinite_steps=1 stops a run at the first that is not). In the last checkpoint the frozen weights
    (the vision tower; with LoRA every base weight) equal the starting ones in bf16, and every trained one moved
    (with LoRA: each adapter's B, zero at the start)."""
    import torch

    from dico_scale.config import load_config
    from dico_scale.models import build_captioner
    from dico_scale.models.tiny import write
    from dico_scale.models.weights import read_weights

    folders = {name: write(family, str(tmp_path / family), width=512, layers=2, heads=8, image_size=64)
               for name, family in (("full", "idefics3"), ("lora", "gemma3"))}
    args = {name: [f"data.root={tmp_path}/{name}/data", f"train.output_dir={tmp_path}/{name}",
                   f"captioner.hf_path={folders[name]}", *COMMON, *VLM, *extra]
            for name, extra in (("full", ["captioner.lora.r=0"]),
                                ("lora", LORA + ["captioner.gradient_checkpointing=true"]))}
    procs = {}
    for name, a in args.items():  # side by side, each writing to its own log (a full pipe would stall it)
        with open(tmp_path / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen([sys.executable, "dico_scale/train.py", "--config", "configs/demo/dico.yaml",
                                            *a], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    for name, proc in procs.items():
        proc.wait(timeout=600)
        log = (tmp_path / f"{name}.log").read_text()
        assert proc.returncode == 0 and "done: stage=dico step=2" in log, f"{name}: {log[-4000:]}"
    for name, a in args.items():
        # the starting weights (the folder's, fresh adapters) as the run holds them: in bf16
        start = {k: (p.detach().to(torch.bfloat16).float(), p.requires_grad)
                 for k, p in build_captioner(load_config("configs/demo/dico.yaml", a)).named_parameters()}
        end = read_weights(str(tmp_path / name / "checkpoints" / "step_00000002"))
        frozen = {k for k, (_, grad) in start.items() if not grad}
        trained = set(start) - frozen
        moved = {k for k, (p, _) in start.items() if not torch.equal(end[k].float(), p)}
        assert frozen and not moved & frozen, (name, sorted(moved & frozen)[:5])
        assert all(torch.isfinite(end[k]).all() for k in trained), name
        if name == "full":
            assert all(".vision_model." in k for k in frozen) and moved == trained, sorted(trained - moved)[:5]
        else:  # only the adapters train: each lora_B starts at zero (lora_A at random, another draw here)
            assert all(".lora_" in k for k in trained) and any(".base_layer." in k for k in frozen)
            assert {k for k in trained if ".lora_B." in k} <= moved


def test_zero3_on_cuda_fused_head_offload_fp16(tmp_path):
    """tests/distributed/zero3_check.py in gpu mode: bf16 (the GPU default), the fused Triton head inside the
    captioner's forward under ZeRO-3 (the reference's gradient-free log-probs; loss.kernel=auto trains through the
    torch head), offloaded parameters and optimizer (DeepSpeedCPUAdam), fp16 with loss
    scaling; generation under gathered weights equals generation with the full weights."""
    cmd = [sys.executable, "tests/distributed/zero3_check.py", str(tmp_path), "gpu", f"data.root={tmp_path}/data",
           *COMMON, "train.micro_batch_size=4", "generation.candidates=3", "generation.max_len=8",
           "data.samples_per_epoch=64"]
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29533"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "zero3.json").read_text())
    runs = result["runs"]
    for name in ("dico_zero2", "dico_zero3", "dico_offload", "dico_zero2_shard", "dico_zero2_fp16", "dico_zero3_fp16"):
        assert runs[name]["step"] == 3 and math.isfinite(runs[name]["train"]["train/loss"]), name
    # bf16 rounds differently when ZeRO-3 gathers and reduces: equal to the bf16 tolerance, not bitwise
    for name in ("dico_zero3", "dico_offload", "dico_zero2_shard"):
        assert abs(runs[name]["train"]["train/loss"] - runs["dico_zero2"]["train"]["train/loss"]) < 2e-2, name
    assert result["generation_equal"] and result["logprobs_max_diff"] < 1e-2
    assert result["reference_unchanged"] and result["checkpoint_matches_export"]
    assert runs["dico_resume"]["step"] == 3
