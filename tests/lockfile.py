"""requirements.lock and setup.py's requirements, read for tests/test_lock.py and `make test-latest`.

`python tests/lockfile.py --newer-than-lock` prints each installed package whose version differs from the lock's;
`python tests/lockfile.py --uv-index-args` prints pip's configured indexes as uv's options (`make install` installs
the lock with uv, which reads no pip configuration). Runs without `packaging` for that (a fresh virtualenv has
none).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: exact version}; any line that is not `name==version` (or a comment) is an error."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

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


def setup_requirements(extras: tuple[str, ...] = ("dev",)) -> list:
    """install_requires and the named extras, read from setup.py's source (the file is not run)."""
    call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    from packaging.requirements import Requirement

    lines = kwargs["install_requires"] + [r for extra in extras for r in kwargs["extras_require"][extra]]
    return [Requirement(line) for line in lines]


def newer_than_lock() -> list[str]:
    from packaging.utils import canonicalize_name

    pins = read_lock()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    return [f"{name}: lock {pins.get(name, '-')}, installed {version}" for name, version in sorted(installed.items())
            if pins.get(name) != version and name not in ("dico-scale", "pip", "uv")]


def floor(name: str) -> str:
    """The version of setup.py's `name>=X` requirement: the oldest release we claim to work with (`make test-floor`
    installs it)."""
    req = next(r for r in setup_requirements() if r.name == name)
    return next(s.version for s in req.specifier if s.operator == ">=")


UV_INDEX_OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}


def uv_index_args(pip_config: str | None = None) -> list[str]:
    """pip's index-url, extra-index-url and find-links (files and PIP_* variables, `pip config list`) as uv options.
    pip weighs every index alike; uv by default takes a package from the first index that has it, which on a machine
    with a partial local mirror misses pinned versions: hence unsafe-best-match, pip's behaviour."""
    if pip_config is None:
        pip_config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                                    text=True).stdout
    args, seen = ["--index-strategy", "unsafe-best-match"], set()
    for line in pip_config.splitlines():  # e.g. global.extra-index-url='a b' or :env:.find-links='/opt/wheels'
        key, _, value = line.partition("=")
        option = UV_INDEX_OPTIONS.get(key.rsplit(".", 1)[-1])
        for item in value.strip().strip("'\"").split() if option else []:
            if (option, item) not in seen:  # a file and a PIP_* variable may say the same
                seen.add((option, item))
                args += [option, item]
    return args


if __name__ == "__main__":
    if sys.argv[1:] == ["--uv-index-args"]:
        print(" ".join(uv_index_args()))
        sys.exit()
    if sys.argv[1:] != ["--newer-than-lock"]:
        sys.exit("usage: python tests/lockfile.py --newer-than-lock | --uv-index-args")
    lines = newer_than_lock()
    print("\n".join(["installed versions that differ from requirements.lock:", *lines] if lines
                    else ["installed versions equal requirements.lock"]))
