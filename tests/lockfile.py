"""requirements.lock and setup.py's requirements, read for tests/test_lock.py and `make test-latest`.

`python tests/lockfile.py --newer-than-lock` prints each installed package whose version differs from the lock's.
"""
from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: exact version}; any line that is not `name==version` (or a comment) is an error."""
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==" or req.marker or req.url:
            raise ValueError(f"{path.name}:{n}: not an exact pin: {line!r}")
        pins[canonicalize_name(req.name)] = spec[0].version
    return pins


def setup_requirements(extras: tuple[str, ...] = ("dev",)) -> list[Requirement]:
    """install_requires and the named extras, read from setup.py's source (the file is not run)."""
    call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    lines = kwargs["install_requires"] + [r for extra in extras for r in kwargs["extras_require"][extra]]
    return [Requirement(line) for line in lines]


def newer_than_lock() -> list[str]:
    pins = read_lock()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    return [f"{name}: lock {pins.get(name, '-')}, installed {version}" for name, version in sorted(installed.items())
            if pins.get(name) != version and name not in ("dico-scale", "pip")]


if __name__ == "__main__":
    if sys.argv[1:] != ["--newer-than-lock"]:
        sys.exit("usage: python tests/lockfile.py --newer-than-lock")
    lines = newer_than_lock()
    print("\n".join(["installed versions that differ from requirements.lock:", *lines] if lines
                    else ["installed versions equal requirements.lock"]))
