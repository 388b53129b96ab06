"""On a CUDA machine: xe then dico, one process, bf16 through DeepSpeed (nccl), a few steps each."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parent.parent


def _train(config: str, tmp: Path, *overrides: str):
    common = [f"data.root={tmp}/data", f"tracking.uri=sqlite:///{tmp}/mlflow.db", "train.device=cuda",
              "train.max_steps=3", "train.log_every=1", "train.val_max_images=8", "data.synthetic.n_train=200",
              "data.synthetic.n_val=8", "data.synthetic.n_test=8", "data.synthetic.samples_per_shard=50",
              "evaluator.weights=", "captioner.image_encoder_weights="]
    proc = subprocess.run([sys.executable, "dico_scale/train.py", "--config", config, *common, *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_xe_then_dico_on_cuda_bf16(tmp_path):
    _train("configs/demo/xe.yaml", tmp_path, f"train.output_dir={tmp_path}/xe")
    proc = _train("configs/demo/dico.yaml", tmp_path, f"train.output_dir={tmp_path}/dico",
                  f"train.init_from={tmp_path}/xe/model.pt")
    assert "done: stage=dico step=3" in proc.stdout
