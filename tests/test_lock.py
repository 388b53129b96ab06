"""requirements.lock (what `make install` installs) pins every package exactly, within setup.py's ranges."""
from pathlib import Path

from packaging.utils import canonicalize_name

from lockfile import LOCK, read_lock, setup_requirements


def test_the_lock_pins_every_package_setup_py_names_within_its_range():
    pins = read_lock()
    for req in setup_requirements(extras=("dev",)):
        if req.marker is not None and not req.marker.evaluate({"extra": "dev"}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{LOCK.name} lacks {req.name}, which setup.py requires"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{LOCK.name} pins {req.name}=={pins[name]}, outside setup.py's {req}"
    assert {"torch", "torchvision", "triton", "transformers", "deepspeed"} <= set(pins)


def test_a_range_or_a_missing_pin_is_refused(tmp_path):
    bad = tmp_path / "requirements.lock"
    bad.write_text("torch==2.14.1\n    # via dico-scale\ntransformers>=5.20\n")
    try:
        read_lock(bad)
    except ValueError as e:
        assert "requirements.lock:3: not an exact pin" in str(e)
    else:
        raise AssertionError("a range in the lock was accepted")


def test_every_requirement_has_a_floor_below_the_lock_and_no_known_bad_one():
    """`make test-floor` installs each requirement at the bottom of setup.py's range: every one needs a `>=`, and the
    releases found broken there stay excluded."""
    from lockfile import floor
    from packaging.version import Version

    pins = read_lock()
    for req in setup_requirements(extras=("dev",)):
        assert Version(floor(req.name)) <= Version(pins[canonicalize_name(req.name)]), req
    # transformers 5.20-5.23 take `past_key_values`, not the `cache` we pass; peft 0.17 imports transformers 4's
    # HybridCache; mlflow 3.0-3.8 a pool class SQLAlchemy 2.1 dropped; num2words 0.5.0 is Python 2, 0.5.1-0.5.4 do
    # not build; DeepSpeed before 0.19.8 leaves frozen parameters out of a universal checkpoint
    for name, first_good in {"transformers": "5.24", "peft": "0.18", "mlflow": "3.9", "num2words": "0.5.5",
                             "deepspeed": "0.19.8"}.items():
        assert Version(floor(name)) >= Version(first_good), name


def test_pips_indexes_become_uvs_options_once_each():
    from lockfile import uv_index_args

    config = ("global.extra-index-url='file:///a/simple file:///b/simple'\n:env:.find-links='/opt/wheels'\n"
              "global.find-links='/opt/wheels'\nglobal.constraint='/etc/c.txt'\nglobal.index-url='https://mirror/simple'\n")
    assert uv_index_args(config) == ["--index-strategy", "unsafe-best-match", "--extra-index-url", "file:///a/simple",
                                     "--extra-index-url", "file:///b/simple", "--find-links", "/opt/wheels",
                                     "--index-url", "https://mirror/simple"]
    assert uv_index_args("") == ["--index-strategy", "unsafe-best-match"]


def test_the_gpu_machines_wheels_are_the_locks_versions():
    """benchmarks/fetch_wheels.sh fetches what the GPU check carries: at the lock's versions, so the GPU runs the code
    the suite tested (the benchmark's peers, which the lock does not hold, aside)."""
    import re

    from lockfile import REPO

    pins, peers = read_lock(), {"liger-kernel", "cut-cross-entropy"}
    script = (REPO / "benchmarks" / "fetch_wheels.sh").read_text()
    fetched = {canonicalize_name(n): v for n, v in re.findall(r"\b([A-Za-z0-9][\w.-]*)==([\w.]+)", script)}
    assert {"transformers", "deepspeed", "peft", "regex"} <= set(fetched)
    for name, version in fetched.items():
        if name not in peers:
            assert pins.get(name) == version, f"fetch_wheels.sh fetches {name}=={version}, the lock pins {pins.get(name)}"


def test_processes_the_tests_start_run_this_pythons_scripts():
    """conftest puts the scripts installed with this Python first on PATH: the 2-rank tests' `deepspeed`, the tracking
    test's `mlflow server` and the ninja that builds DeepSpeed's ops are this install's, whatever PATH held; the Slurm
    jobs' $PYTHON is this Python."""
    import os
    import shutil
    import sys
    import sysconfig

    for script in ("deepspeed", "mlflow", "ninja"):
        found = shutil.which(script)
        assert found and Path(found).parent == Path(sysconfig.get_path("scripts")), f"{script} on PATH is {found}"
    assert os.environ["PYTHON"] == sys.executable  # what slurm/launch.sh runs


def test_make_lock_moves_to_the_newest_releases(tmp_path):
    """`make lock` writes over the lock: a pin older than the newest allowed release moves up (uv keeps the pins of
    the file it writes to unless told to upgrade). Resolves against the package index, as `make install` installs."""
    import subprocess
    import sys

    from packaging.version import Version

    from lockfile import REPO

    lock = tmp_path / "requirements.lock"
    old = "2025.11.3"  # regex (transformers': any release but 2019.12.17) a year before the lock's
    lock.write_text(LOCK.read_text().replace(f"regex=={read_lock()['regex']}", f"regex=={old}"))
    proc = subprocess.run(["make", "-s", "lock", f"PYTHON={sys.executable}", f"LOCK={lock}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Version(read_lock(lock)["regex"]) >= Version(read_lock()["regex"]) > Version(old)
