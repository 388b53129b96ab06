"""Run under `torchrun --nproc_per_node 2`: each rank reads every spec given with eval_loader (2 workers) and rank 0
writes, per spec, the keys each (rank, worker) reader produced to OUT_DIR/eval_split.json.
Usage: eval_split_check.py OUT_DIR SPEC [SPEC ...]"""
import json
import os
import sys

import torch.distributed as dist
from torch.utils.data import get_worker_info
from torchvision import transforms

from dico_scale.data.pipeline import Collate, eval_loader  # noqa: E402
from dico_scale.data.tokenizer import CaptionTokenizer  # noqa: E402


class TaggingCollate(Collate):
    """Records which worker built the batch (test only)."""

    def __call__(self, samples):
        return {**super().__call__(samples), "worker": get_worker_info().id}


dist.init_process_group("gloo")
rank = dist.get_rank()
collate = TaggingCollate(transforms.Compose([transforms.Resize(32), transforms.ToTensor()]), None, CaptionTokenizer(),
                         24, seed=0)
result = {}
for spec in sys.argv[2:]:
    mine = {}
    for batch in eval_loader(spec, collate, batch_size=2, num_workers=2):
        mine.setdefault(f"{rank}/{batch['worker']}", []).extend(batch["keys"])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    result[spec] = {reader: keys for part in gathered for reader, keys in part.items()}
if rank == 0:
    with open(os.path.join(sys.argv[1], "eval_split.json"), "w") as f:
        json.dump(result, f)
dist.barrier()
dist.destroy_process_group()

from dico_scale.exit_codes import leave  # noqa: E402

leave(0)  # as the entry points: no interpreter teardown, in which a thread's destructor once aborted a rank
