"""The `distributed` marker is what `-m 'not distributed'` (make test-latest, quick runs) relies on: a test that starts
a multi-rank job without it fails at the launch instead of slipping into those runs. And `make test`'s units of work
(pytest-xdist --dist loadfile with work_units' scheduler): a module each, the demo's chain one, the longest first."""
import os
import subprocess
import sys

import pytest
from conftest import REPO, _starts_ranks
from work_units import CHAIN_FILES, LONG_FIRST, work_unit


@pytest.mark.parametrize("argv, multi", [
    (["deepspeed", "--num_gpus", "2", "--master_port", "1", "dico_scale/train.py"], True),
    (["/venv/bin/deepspeed", "--num_gpus", "1", "x.py"], False),
    (["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "x.py"], True),
    (["python", "-m", "torch.distributed.run", "--nproc_per_node", "1", "x.py"], False),
    (["python", "slurm/torchrun.py", "--nproc_per_node", "2", "--master_port", "1", "x.py"], True),
    (["sbatch", "--wait", "job.sh"], True),
    (["python", "dico_scale/train.py", "--config", "c.yaml"], False),
])
def test_multi_rank_commands_are_recognised(argv, multi):
    assert _starts_ranks(argv) is multi


def test_an_unmarked_test_cannot_start_two_ranks():
    with pytest.raises(AssertionError, match="mark it @pytest.mark.distributed"):
        subprocess.run(["deepspeed", "--num_gpus", "2", "dico_scale/train.py", "--help"], capture_output=True)


def test_a_unit_of_work_is_a_module_or_the_demos_chain():
    assert work_unit("tests/test_markers.py::test_x[a::b]") == "test_markers.py"
    assert work_unit("tests/test_compare.py::test_y") == work_unit("tests/test_demo.py::test_z") == "chain"
    # a module renamed or removed would silently lose its place (at the head of the queue, or in the chain's unit)
    assert [u for u in LONG_FIRST + CHAIN_FILES if u != "chain" and not (REPO / "tests" / u).is_file()] == []


SPY = """
import os, time, pytest
@pytest.fixture(scope="module")
def built(request):  # a module fixture that must be built once per module
    with open(os.environ["LOG"], "a") as f:
        f.write(f"built {request.module.__name__}\\n")
@pytest.mark.parametrize("i", range(4))
def test_one(built, i):
    time.sleep(DELAY)
    with open(os.environ["LOG"], "a") as f:
        f.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'alone')} {__name__}\\n")
"""


def test_make_tests_scheduler_keeps_a_unit_on_one_worker(tmp_path):
    """Four modules under work_units' scheduler on 2 workers: each module's tests on one worker, its module fixture
    built once, the two chain modules on the same worker (xdist's --dist loadgroup failed all three). A slow
    test_compare makes plain loadfile hand test_demo to the other worker."""
    for name in ("test_compare", "test_d1", "test_demo", "test_x"):
        (tmp_path / f"{name}.py").write_text(f"DELAY = {1.0 if name == 'test_compare' else 0.0}\n" + SPY)
    log = tmp_path / "log"
    env = {**os.environ, "LOG": str(log), "PYTHONPATH": str(REPO / "tests")}

    def pytest(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "work_units", *args,
                               str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)

    p = pytest("-n", "2", "--dist", "loadfile")
    assert p.returncode == 0 and "16 passed" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    lines = log.read_text().split("\n")
    assert sorted(line for line in lines if line.startswith("built")) == [f"built {m}" for m in
                                                                          ("test_compare", "test_d1", "test_demo", "test_x")]
    workers = {}
    for line in lines:
        if line.startswith("gw"):
            worker, module = line.split()
            workers.setdefault(module, set()).add(worker)
    assert all(len(w) == 1 for w in workers.values()), workers
    assert workers["test_demo"] == workers["test_compare"]
    p = pytest("-p", "no:xdist", "-k", "test_x")  # the hook is optional: pytest without xdist runs the same folder
    assert p.returncode == 0 and "4 passed" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
