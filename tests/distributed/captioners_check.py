"""Run under `deepspeed --num_gpus 2`: every Hugging Face captioner row through the real loop (dico_scale.train.run)
in one process group. Usage: captioners_check.py OUT_DIR FAMILY=FOLDER ... -- key=value ...
(FAMILY: a dico_scale.models.tiny family; dico-ref runs the dico_ref row, the vision-language families hf_vlm, the
others hf_encoder_decoder)

Per family: xe -> dico -> scst (2 steps each, ZeRO-2); for the first family also dico in bf16, and dico under
ZeRO-3 stopped at step 2 and resumed to step 3; for the last (a vision-language model) dico with LoRA adapters
under ZeRO-3 (the reference: the policy with its adapters disabled), checkpointed at each step. Writes OUT_DIR/captioners.json (rank 0): each run's step, MLflow run id,
seconds and last train metrics."""
import json
import os
import sys
import time

import torch.distributed as dist

from dico_scale.config import load_config  # noqa: E402
from dico_scale.models.tiny_vlm import VLM_FAMILIES, prompt_overrides  # noqa: E402
from dico_scale.train import run, shutdown  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
split = args.index("--")
out, folders, common = args[0], dict(a.split("=", 1) for a in args[1:split]), args[split + 1:]
DS = "configs/deepspeed/{}.json"
ROWS = {"dico-ref": "dico_ref", **{family: "hf_vlm" for family in VLM_FAMILIES}}
result = {"runs": {}}


VALIDATED = ("vit-gpt2_dico", "idefics3_dico")  # validation on 2 ranks, per kind of row; the others skip it (time)


def train(name: str, config: str, folder: str, *overrides: str) -> dict:
    family = name.split("_")[0]
    row = ROWS.get(family, "hf_encoder_decoder")
    skip = [] if name in VALIDATED else ["train.validate_at_end=false"]
    cfg = load_config(f"configs/demo/{config}.yaml", common + [*skip, 
        f"train.output_dir={out}/{name}", f"captioner.model={row}", f"captioner.hf_path={folder}",
        *prompt_overrides(family), *overrides])
    start = time.perf_counter()
    summary = run(cfg)
    result["runs"][name] = {"step": summary["step"], "mlflow_run_id": summary["mlflow_run_id"],
                            "seconds": time.perf_counter() - start, "train": summary.get("train", {}),
                            "val": summary.get("val", {})}
    return summary


for i, (family, folder) in enumerate(folders.items()):
    zero2 = f"train.deepspeed_config={DS.format('zero2')}"
    train(f"{family}_xe", "xe", folder, "train.max_steps=2", "optim.lr=1e-3", zero2)
    init = f"train.init_from={out}/{family}_xe/model.pt"
    train(f"{family}_dico", "dico", folder, init, "train.max_steps=2", zero2)
    train(f"{family}_scst", "scst", folder, init, "train.max_steps=2", "scst.candidates=3", zero2)
    if i == 0:  # dico under ZeRO-3 (stopped at step 2, resumed to 3), and in bf16
        zero3 = f"train.deepspeed_config={DS.format('zero3')}"
        train(f"{family}_dico_bf16", "dico", folder, init, "train.max_steps=2", "train.precision=bf16", zero2)
        first = train(f"{family}_resume", "dico", folder, init, "train.max_steps=2", "train.save_every=1", zero3)
        result["resume_first_id"] = first["mlflow_run_id"]
        train(f"{family}_resume", "dico", folder, init, "train.max_steps=3", "train.resume=auto", zero3)
    if i == len(folders) - 1:  # LoRA under ZeRO-3, its text layers recomputed in backward, its final norm trained whole
        train(f"{family}_lora_zero3", "dico", folder, init, "train.max_steps=2", "train.save_every=1",
              "captioner.lora.r=4", "optim.lr=1e-2", f"train.deepspeed_config={DS.format('zero3')}",
              "captioner.gradient_checkpointing=true", "captioner.lora.modules_to_save=language_model.norm")

if dist.get_rank() == 0:
    with open(os.path.join(out, "captioners.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
shutdown()

from dico_scale.exit_codes import leave  # noqa: E402

leave(0)  # as the entry points: no interpreter teardown, in which a thread's destructor once aborted a rank
