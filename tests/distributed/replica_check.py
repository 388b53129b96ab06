"""Run under `deepspeed --num_gpus 2`: trains one stage through dico_scale.train.run, then writes what this rank
holds (optimizer steps taken, a digest of every parameter) to <output_dir>/rank<r>.json for the test to compare."""
import hashlib
import json
import os
import sys

from dico_scale.train import parse_args, run, shutdown  # noqa: E402

cfg = parse_args(sys.argv[1:])
summary = run(cfg)
from deepspeed.comm import comm  # noqa: E402  (after run: dico_scale imports DeepSpeed its own way)

engine = summary["engine"]
report = {
    "rank": summary["rank"], "world_size": summary["world_size"], "global_steps": engine.global_steps,
    "val": summary["val"], "mlflow_run_id": summary["mlflow_run_id"],
    "shm_allreduce_op": comm.cdb.shm_comm_op is not None,
    "digest": {n: hashlib.sha256(p.detach().float().cpu().numpy().tobytes()).hexdigest()
               for n, p in engine.module.named_parameters()},
}
with open(os.path.join(cfg.train.output_dir, f"rank{summary['rank']}.json"), "w") as f:
    json.dump(report, f)
shutdown()

from dico_scale.exit_codes import leave  # noqa: E402

leave(0)  # as the entry points: no interpreter teardown, in which a thread's destructor once aborted a rank
