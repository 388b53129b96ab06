import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

# Without a GPU the Triton kernels run through Triton's interpreter; it is read when triton is first imported.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every process the tests start finds the scripts installed beside this Python first (deepspeed, mlflow), as an
# activated virtualenv has it, however pytest was started (`make test PYTHON=venv/bin/python` activates nothing).
# Otherwise PATH's other installs run: a deepspeed whose Python lacks dico_scale, another install's mlflow server.
os.environ["PATH"] = f"{sysconfig.get_path('scripts')}{os.pathsep}{os.environ.get('PATH', '')}"
# The Slurm launcher (slurm/launch.sh) runs $PYTHON: `make X PYTHON=...` exports make's own, which need not be the
# Python under test (`make test-floor PYTHON=venv/bin/python` ran its Slurm jobs on that venv's MLflow, whose newer
# database schema this Python's MLflow then refused).
os.environ["PYTHON"] = sys.executable

import pytest  # noqa: E402
import torch  # noqa: E402
import work_units  # noqa: E402
from work_units import LONG_FIRST, work_unit  # noqa: E402

from dico_scale.engine import cpu_threads  # noqa: E402

# Under pytest-xdist each worker, and every process it starts (the ranks take it: engine.cpu_threads), runs on its
# share of the cores: with more OpenMP threads than cores the waiting threads spin against the working ones
# (test_hf_vlm.py beside a second copy of itself took 176 s at 2 threads each on 2 cores, 49 s at 1).
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(cpu_threads(0, workers)))
    torch.set_num_threads(cpu_threads(0, 1))

pytest_xdist_make_scheduler = work_units.pytest_xdist_make_scheduler  # `make test`'s units of work

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
    for item in items:
        if {"demo", "chain"} & set(item.fixturenames) and work_unit(item.nodeid) != "chain":
            raise pytest.UsageError(f"{item.nodeid} uses the demo's chain: add its file to work_units.CHAIN_FILES")
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))  # stable: the rest keep their order
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


@pytest.fixture(scope="session", autouse=True)
def _empty_mlflow_store(tmp_path_factory):
    """An empty MLflow sqlite store, tables made, that helpers.mlflow_uri copies for each new run store (also in the
    processes the tests start: they inherit the variable)."""
    from helpers import MLFLOW_TEMPLATE
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow_template") / "empty.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    os.environ[MLFLOW_TEMPLATE] = str(db)
    yield
    os.environ.pop(MLFLOW_TEMPLATE, None)


@pytest.fixture(scope="session")
def tiny_xe(tmp_path_factory) -> Path:
    """2 XE steps in one process (seconds): <tmp>/xe/model.pt; its data under <tmp>/data, 8 images per split
    (test-00000.tar, val-00000.tar). Read only: evaluate's and caption's inputs, their interrupts."""
    from helpers import check_ok, launch

    tmp = tmp_path_factory.mktemp("tiny_xe")
    overrides = [f"data.root={tmp}/data", "data.synthetic.n_train=40", "data.synthetic.n_val=8",
                 "data.synthetic.n_test=8", "data.synthetic.samples_per_shard=10", "data.samples_per_epoch=40",
                 "train.max_steps=2", f"train.output_dir={tmp}/xe", "evaluator.weights=",
                 "captioner.image_encoder_weights=", "train.init_from=", "tracking.enabled=false",
                 "train.validate_at_end=false"]
    check_ok(launch("dico_scale/train.py", "configs/demo/xe.yaml", overrides, ranks=1, timeout=300))
    return tmp / "xe" / "model.pt"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> dict:
    """A small synthetic dataset as real tar shards: {split: brace pattern}."""
    from dico_scale.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("shapes")
    return write_synthetic_dataset(out, seed=0, n_train=64, n_val=10, n_test=10, image_size=64,
                                   samples_per_shard=16)


@pytest.fixture(scope="session")
def vlm_folders(tmp_path_factory) -> dict:
    """Tiny random vision-language models of the hf_vlm row, one folder per family (dico_scale.models.tiny)."""
    from dico_scale.models.tiny import write
    from dico_scale.models.tiny_vlm import VLM_FAMILIES

    root = tmp_path_factory.mktemp("vlm")
    return {f: write(f, str(root / f)) for f in VLM_FAMILIES}


@pytest.fixture
def clean_env(monkeypatch):
    """No distributed variables inherited from the caller."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
        monkeypatch.delenv(k, raising=False)
    return os.environ


# `make demo`'s driver at a few steps per stage (evaluator -> xe -> dico, 2 CPU ranks each): test_demo checks it, and
# its evaluator and XE captioner are the weights the dico and scst tests and compare start from.
DEMO_STEPS = ["train.max_steps=2", "train.micro_batch_size=4", "train.val_max_images=4", "generation.candidates=3",
              "generation.max_len=5"]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo run once per session: (its --workdir, the finished process). Its stages' folders, store and data are
    <workdir>/runs/demo/{evaluator,xe,dico,mlflow.db,data}; the data are helpers.demo_overrides' sizes, so that runs
    given demo_overrides(<workdir>/runs/demo) read the same shards."""
    import sys

    from helpers import demo_overrides

    work = tmp_path_factory.mktemp("demo")
    data = [o for o in demo_overrides(work / "runs" / "demo") if not o.startswith("tracking.uri")]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as `make demo` starts: launch.py sets it
    proc = subprocess.run([sys.executable, "-m", "dico_scale.demo", "--workdir", str(work), *data, *DEMO_STEPS],
                          capture_output=True, text=True, timeout=900, env=env)
    return work, proc


@pytest.fixture(scope="session")
def chain(demo):
    """The demo's evaluator and XE runs: (folder, weight overrides), the weights the dico and scst stages (and compare)
    start from; <folder>/xe/model.pt is the XE captioner. Runs of other tests there use folders of their own (not
    evaluator, xe or dico: those are the demo's)."""
    work, proc = demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tmp = work / "runs" / "demo"
    weights = [f"evaluator.weights={tmp}/evaluator/model.pt", f"captioner.image_encoder_weights={tmp}/evaluator/model.pt"]
    return tmp, weights
