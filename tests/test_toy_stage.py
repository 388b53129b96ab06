"""A new stage is one module and one row of the stage table: a toy stage written into tmp_path, its row added to
STAGES, trains through the real trainer (dico_scale/train.py's main, one process) with its own config check and its
own frozen model fingerprinted into the checkpoint, and a resume against another frozen model stops. Nothing else
in dico_scale is edited or patched."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO

TOY_MODULE = '''
"""Toy stage: XE on the captioner, trained "against" a frozen evaluator (only to show that its weights are
fingerprinted), with a config check of its own."""
from dico_scale.checks import check
from dico_scale.stages.xe import XEStage


class ToyStage(XEStage):
    name = "toy"

    @classmethod
    def check_config(cls, cfg):
        check(cfg.generation.max_len <= 8, "generation.max_len", "the toy stage wants captions of at most 8 tokens")

    @classmethod
    def frozen_files(cls, cfg):
        return {"toy evaluator (evaluator.weights)": cfg.evaluator.weights}

    def step(self, engine, batch):
        out = super().step(engine, batch)
        out.metrics["toy/images"] = float(out.images)
        return out
'''

ROW = 'StageSpec("toy", "toy_stage:ToyStage", None, "captioner", "Toy", "xe")'

# The driver: the module's folder on the path, the row in the table, then what dico_scale/train.py runs as a script:
# its main, and the exit without the interpreter's teardown (a bad resume once aborted there, exit -6, "terminate
# called without an active exception", after its one-line error).
DRIVER = '''
import sys
sys.path.insert(0, {folder!r})
from dico_scale.stages import STAGES, StageSpec
STAGES["toy"] = {row}
from dico_scale import exit_codes, train
exit_codes.leave(train.main(sys.argv[1:]))
'''

TINY = ["captioner.image_encoder=dico-tiny", "captioner.image_encoder_weights=", "evaluator.weights=",
        "train.init_from=", "captioner.width=32", "captioner.heads=2", "captioner.encoder_layers=1",
        "captioner.decoder_layers=1", "generation.candidates=2", "generation.max_len=6", "tracking.enabled=false",
        "train.stage=toy", "train.micro_batch_size=4", "train.log_every=1", "train.val_max_images=4",
        "data.synthetic.n_train=16", "data.synthetic.n_val=4", "data.synthetic.n_test=4",
        "data.synthetic.samples_per_shard=8", "data.samples_per_epoch=16", "data.shuffle_buffer=0"]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy module in tmp_path and its row in STAGES (for this test's process), and the overrides of a run."""
    (tmp_path / "toy_stage.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from dico_scale.stages import STAGES, StageSpec

    monkeypatch.setitem(STAGES, "toy", eval(ROW, {"StageSpec": StageSpec}))
    return TINY + [f"data.root={tmp_path}/data", f"train.output_dir={tmp_path}/run"]


def train_toy(tmp_path, overrides: list[str]) -> subprocess.CompletedProcess:
    driver = textwrap.dedent(DRIVER).format(folder=str(tmp_path), row=ROW)
    return subprocess.run([sys.executable, "-c", driver, "--config", "configs/demo/xe.yaml", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})


def test_the_toy_stage_checks_its_own_keys_and_names_its_frozen_files(toy):
    from dico_scale.config import ConfigError, load_config
    from dico_scale.frozen import frozen_model_files
    from dico_scale.stages import captioner_stages

    cfg = load_config("configs/demo/xe.yaml", toy)
    assert cfg.train.stage == "toy" and "toy" in captioner_stages()  # export, evaluate, caption accept its model
    assert frozen_model_files(cfg) == {"toy evaluator (evaluator.weights)": ""}
    with pytest.raises(ConfigError, match=r"^bad value for config key 'generation.max_len': the toy stage wants"):
        load_config("configs/demo/xe.yaml", toy + ["generation.max_len=9"])


def test_the_toy_stage_trains_and_resumes_only_against_its_frozen_model(toy, tmp_path):
    proc = train_toy(tmp_path, toy + ["train.max_steps=2"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "done: stage=toy step=2" in proc.stdout
    marker = json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "complete").read_text())
    assert marker["frozen_models"] == {"toy evaluator (evaluator.weights)": {"random": True, "seed": 0}}
    assert (tmp_path / "run" / "model.pt").is_file()

    # another "evaluator" (drawn from another seed): the resume stops before anything is built
    proc = train_toy(tmp_path, toy + ["train.max_steps=3", "train.resume=auto", "train.seed=1"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "dico_scale: config error: train.resume: the toy evaluator (evaluator.weights) differ")
