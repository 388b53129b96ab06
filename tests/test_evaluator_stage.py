"""The evaluator stage's optimizer: open_clip's recipe spares gains, biases, one-dimensional embeddings and the logit
scale from weight decay; the matrices decay."""
import subprocess
import sys

import torch

from helpers import REPO, check_ok, mlflow_uri


def test_weight_decay_spares_gains_biases_and_the_logit_scale(tmp_path):
    from dico_scale.models.clip import create_clip

    torch.manual_seed(0)
    start = create_clip("dico-tiny", "")[0].state_dict()
    torch.save({"state_dict": start}, tmp_path / "start.pt")
    # decoupled decay of lr * wd = 0.2 a step: 2 steps shrink a decayed tensor to ~0.64 of itself; Adam's own steps
    # move any element by at most ~lr = 1e-3 each
    check_ok(subprocess.run([
        sys.executable, "dico_scale/train.py", "--config", "configs/demo/evaluator.yaml", f"data.root={tmp_path}/data",
        "data.synthetic.n_train=16", "data.synthetic.n_val=0", "data.synthetic.n_test=0",
        "data.synthetic.samples_per_shard=16", "data.samples_per_epoch=16", "train.micro_batch_size=4",
        "train.max_steps=2", "train.val_every=0", "optim.lr=1e-3", "optim.weight_decay=200", "optim.warmup_steps=0",
        "optim.schedule=constant", f"train.init_from={tmp_path}/start.pt", f"train.output_dir={tmp_path}/run",
        f"tracking.uri={mlflow_uri(tmp_path / 'mlflow.db')}"], cwd=REPO, capture_output=True, text=True, timeout=300))
    end = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    ratios = {n: float(end[n].norm() / start[n].norm()) for n in start if start[n].norm() > 0}
    spared = {n for n in start if start[n].ndim < 2}
    assert "logit_scale" in spared and "ln_final.weight" in spared
    for n in spared:
        assert (end[n] - start[n]).abs().max() <= 2.5e-3, n
    decayed = [ratios[n] for n in ratios if n not in spared and start[n].numel() > 1000]
    assert decayed and max(decayed) < 0.8, sorted(decayed)[-3:]
