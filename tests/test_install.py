"""The repository root never shadows an installed package, and the package installs as a wheel.

transformers >= 5.25 imports Hugging Face's `kernels`; our kernels/ once shadowed it from the repository root (where
`python -m ...` puts the working directory first on sys.path) and broke every fresh install.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLIS = ["train", "evaluate", "caption", "export", "compare", "demo"]


def root_names() -> dict[str, str]:
    """What the repository root exposes to `import`: {name: "module" | "package" | "namespace"}."""
    names = {}
    for entry in REPO.iterdir():
        if entry.suffix == ".py" and entry.stem.isidentifier():
            names[entry.stem] = "module"
        elif entry.is_dir() and entry.name.isidentifier():
            names[entry.name] = "package" if (entry / "__init__.py").exists() else "namespace"
    return names


def run_from_root(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_the_root_exposes_no_regular_module_a_distribution_also_ships():
    # A namespace portion (a folder without __init__.py) never wins over an installed regular package; a .py file or
    # a folder with __init__.py does. Only our own package and the build script may be regular at the root.
    shipped = metadata.packages_distributions()
    regular = {name for name, kind in root_names().items() if kind != "namespace"}
    assert regular <= {"dico_scale", "setup"}, regular
    clashes = {name: shipped[name] for name in regular if name in shipped and name != "dico_scale"}
    assert not clashes, f"the repository root shadows installed packages: {clashes}"
    assert root_names()["kernels"] == "namespace"


def test_from_the_root_kernels_is_hugging_faces_and_transformers_imports():
    if "kernels" not in metadata.packages_distributions():
        pytest.skip("Hugging Face's kernels is not installed (transformers < 5.25 does not need it)")
    code = ("import kernels, dico_scale.kernels as ours; from transformers import GPT2Model; "
            "print(kernels.__file__); print(ours.__file__)")
    theirs, ours = run_from_root(code).splitlines()
    # Not "outside REPO": a user's virtualenv may live inside the checkout (REPO/venv/lib/.../site-packages).
    assert "site-packages" in theirs and not Path(theirs).is_relative_to(REPO / "kernels"), theirs
    assert ours == str(REPO / "kernels" / "src" / "__init__.py")


def test_script_folders_expose_no_module_a_distribution_ships():
    # `python benchmarks/dico_step.py` puts benchmarks/ first on sys.path, as pytest's rootdir insertion does for
    # tests/: a benchmarks/kernels.py once shadowed Hugging Face's kernels there. No script's neighbour may carry the
    # name of an installed top-level module or of the standard library.
    taken = set(metadata.packages_distributions()) | set(sys.stdlib_module_names)
    for folder in ("benchmarks", "slurm", "tests", "tests/distributed", "tests/slurm"):
        names = {p.stem for p in (REPO / folder).glob("*.py")} | {
            p.name for p in (REPO / folder).iterdir() if p.is_dir() and (p / "__init__.py").exists()}
        assert not names & taken, f"{folder}/ shadows installed modules: {sorted(names & taken)}"


@pytest.mark.parametrize("cli", CLIS)
def test_every_cli_answers_help_from_the_root(cli):
    proc = subprocess.run([sys.executable, "-m", f"dico_scale.{cli}", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_launcher_form_keeps_our_folder_off_sys_path():
    # `deepspeed dico_scale/train.py` runs the file: Python puts dico_scale/ first on sys.path, where config.py,
    # data/, models/ ... would be importable as bare names. The entry point drops that folder before importing.
    for script in ("dico_scale/train.py", "dico_scale/evaluate.py"):
        proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    code = ("import runpy, sys; sys.argv = ['dico_scale/train.py', '--help']; sys.path.insert(0, 'dico_scale')\n"
            "try: runpy.run_path('dico_scale/train.py', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print([p for p in sys.path if p.rstrip('/').endswith('dico_scale')])")
    assert run_from_root(code).splitlines()[-1] == "[]"


def test_wheel_ships_dico_scale_kernels_and_no_top_level_kernels(tmp_path):
    # Built from a copy of what setup.py packages: setuptools writes build/ and *.egg-info beside setup.py.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("dico_scale", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("dico_scale-*.whl"))
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"dico_scale", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    # A clean virtualenv: the wheel installed into it, its dependencies (torch) seen through a path file, without
    # this environment's editable finder; run from outside the repository.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    deps = next(p for p in sys.path if p.endswith("site-packages") and (Path(p) / "torch").is_dir())
    (site / "deps.pth").write_text(deps + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True, timeout=300)
    code = ("import torch, dico_scale.kernels as k; from dico_scale.kernels import torch_path; "
            "x = torch.randn(2, 3, 7, dtype=torch.float64); y = torch.randint(0, 7, (2, 3)); m = torch.ones(2, 3); "
            "got = k.sequence_logprobs(x, y, m, kernel='torch'); "
            "want = x.log_softmax(-1).gather(-1, y[..., None])[..., 0].sum(-1); "
            "assert torch.allclose(got, want), (got, want); print(k.__file__)")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith(str(site / "dico_scale" / "kernels")), proc.stdout
