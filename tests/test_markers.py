"""The `distributed` marker is what `-m 'not distributed'` (make test-latest, quick runs) relies on: a test that starts
a multi-rank job without it fails at the launch instead of slipping into those runs."""
import subprocess

import pytest
from conftest import _starts_ranks


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
