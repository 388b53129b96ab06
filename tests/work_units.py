"""`make test`'s units of work (pytest-xdist --dist loadfile, with this module's scheduler): a module each, so that a
module-scoped fixture (often a 2-rank job) is built once; the modules on the demo's chain (conftest's demo and chain)
form one unit, so that the demo runs once. xdist's own grouping (--dist loadgroup) does nothing under pytest 9.2, which
no longer reads the node id that xdist rewrites. Units are handed out longest first (seconds on 2 cores), so that the
run does not end with one worker on a long unit while the other has nothing left; the rest follow in collection order.
The first pass (single-process tests, --dist worksteal) collects its longest modules first by the same list.
conftest imports the hook; no torch here, so a test runs it as a plugin (-p work_units) at little cost."""
import pytest

CHAIN_FILES = ("test_demo.py", "test_compare.py", "test_distributed.py")
LONG_FIRST = ("chain", "test_elastic.py", "test_captioners_e2e.py", "test_zero3.py", "test_slurm.py",
              "test_best_checkpoint.py", "test_evaluate.py", "test_folder_checkpoint.py", "test_tracking.py",
              "test_checkpoint_verify.py", "test_supervision.py", "test_benchmark_step.py", "test_ctrl_c.py",
              "test_loop.py", "test_toy_stage.py")


def work_unit(nodeid: str) -> str:
    name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return "chain" if name in CHAIN_FILES else name


@pytest.hookimpl(optionalhook=True)  # pytest without xdist (-p no:xdist) does not know the hook
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None  # xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # LONG_FIRST's order, not xdist's (most tests first)
    return WorkUnits(config, log)
