import os
import shutil
import subprocess
from pathlib import Path

# Without a GPU the Triton kernels run through Triton's interpreter; it is read when triton is first imported.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


_running = {"item": None}


def _starts_ranks(args) -> bool:
    """A command that starts a multi-rank job: the deepspeed runner with more than one rank, torchrun, Slurm."""
    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
    names = [os.path.basename(a) for a in argv]
    if names and names[0] in ("sbatch", "srun", "torchrun"):
        return True
    if "--nproc_per_node" in argv:  # torchrun as a module or through slurm/torchrun.py
        return argv[argv.index("--nproc_per_node") + 1] != "1"
    return "deepspeed" in names[:1] and "--num_gpus" in argv and argv[argv.index("--num_gpus") + 1] != "1"


_popen_init = subprocess.Popen.__init__


def _guarded_popen_init(self, args, *rest, **kw):
    # `make test-latest` and quick runs deselect the 2-rank jobs with -m 'not distributed': a test that starts one
    # without the marker would slip into them (and into their time), so it fails here instead.
    item = _running["item"]
    if item is not None and "distributed" not in item.keywords and _starts_ranks(args):
        raise AssertionError(f"{item.nodeid} starts a multi-rank job; mark it @pytest.mark.distributed")
    _popen_init(self, args, *rest, **kw)


subprocess.Popen.__init__ = _guarded_popen_init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running["item"] = item
    yield
    _running["item"] = None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session", autouse=True)
def _tiny_clip_configs():
    """The demo's tiny open_clip models (configs/clip) are registered for every test."""
    from dico_scale.models.clip import register_model_configs

    register_model_configs(str(REPO / "configs" / "clip"))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> dict:
    """A small synthetic dataset as real tar shards: {split: brace pattern}."""
    from dico_scale.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("shapes")
    return write_synthetic_dataset(out, seed=0, n_train=64, n_val=10, n_test=10, image_size=64,
                                   samples_per_shard=16)


@pytest.fixture
def clean_env(monkeypatch):
    """No distributed variables inherited from the caller."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
        monkeypatch.delenv(k, raising=False)
    return os.environ


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """Evaluator then XE, 2 CPU ranks each, a few steps: (folder, weight overrides), the weights the dico and scst
    stages (and compare) start from; <folder>/xe/model.pt is the XE captioner. Built once per session."""
    from helpers import check_ok, demo_overrides, launch

    tmp = tmp_path_factory.mktemp("chain")
    check_ok(launch("dico_scale/train.py", "configs/demo/evaluator.yaml", demo_overrides(tmp) + [
        f"train.output_dir={tmp}/evaluator", "train.max_steps=3", "train.micro_batch_size=8"]))
    weights = [f"evaluator.weights={tmp}/evaluator/model.pt", f"captioner.image_encoder_weights={tmp}/evaluator/model.pt"]
    check_ok(launch("dico_scale/train.py", "configs/demo/xe.yaml", demo_overrides(tmp) + weights + [
        f"train.output_dir={tmp}/xe", "train.max_steps=3", "train.micro_batch_size=4", "train.val_max_images=4"]))
    return tmp, weights
