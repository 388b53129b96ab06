"""benchmarks/first_start.sh: a fresh install's first 2-rank start, timed, and what it compiled (nothing)."""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed


def test_first_start_benchmark_smoke(repo):
    p = subprocess.run(["bash", "benchmarks/first_start.sh"], cwd=repo, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    m = re.fullmatch(r"[0-9a-f]+: first start (\d+\.\d) s, compiled: (.*)", p.stdout.strip())
    assert m and float(m.group(1)) > 0, p.stdout
    assert m.group(2) == "nothing"  # DeepSpeed's shared-memory op is switched off on the CPU
