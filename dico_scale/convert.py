"""Other trainers' checkpoints as dico_scale exports.

    python -m dico_scale.convert dico-ref FOLDER --out model.pt

dico-ref: a `save_pretrained` folder of the DiCO reference code (aimagelab/DiCO) becomes a model.pt of the `dico_ref`
captioner row (its config names FOLDER as captioner.hf_path, where the architecture is read), for train.init_from,
evaluate and caption. Bad input: one line and exit 2 (missing or extra weight keys are named).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: our folder must not shadow other modules
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from dico_scale.config import REPO_ROOT, load_config, to_yaml  # noqa: E402
from dico_scale.errors import ConfigError, OneLineParser  # noqa: E402
from dico_scale.preflight import inside, out_file_problem  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "demo", "xe.yaml")

BLANK = ["evaluator.weights=", "captioner.image_encoder_weights=", "train.init_from="]


def convert_dico_ref(folder: str, out: str, config: str | None = None) -> dict:
    """Writes `out` as engine.export_weights does (stage xe, step 0) and returns the blob."""
    import torch

    from dico_scale.models import build_captioner

    # train.stage=xe: what the export records (a config of another stage, e.g. the evaluator's, would make it
    # an export that caption and train.init_from refuse)
    row = ["captioner.model=dico_ref", f"captioner.hf_path={os.path.abspath(folder)}", "train.stage=xe"]
    cfg = load_config(config or DEFAULT_CONFIG, BLANK + row)
    captioner = build_captioner(cfg)
    blob = {"state_dict": {k: v.detach().float().clone() for k, v in captioner.state_dict().items()},
            "config": to_yaml(cfg), "stage": "xe", "step": 0, "mlflow_run_id": None}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(blob, f"{out}.tmp")
    os.replace(f"{out}.tmp", out)
    return blob


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="dico_scale.convert", description=__doc__.splitlines()[0])
    p.add_argument("format", choices=("dico-ref",))
    p.add_argument("folder", help="the reference's save_pretrained folder")
    p.add_argument("--out", required=True, help="model.pt to write")
    p.add_argument("--config", default=None, help="run config the export carries (default: configs/demo/xe.yaml)")
    args = p.parse_args(argv)
    try:
        if problem := out_file_problem(args.out):
            raise ConfigError(f"--out {problem}")
        if inside(args.out, args.folder):  # e.g. the folder's own weights file replaced by the export
            raise ConfigError(f"--out '{args.out}' lies in the folder it converts ('{args.folder}'): write it "
                              "elsewhere")
        blob = convert_dico_ref(args.folder, args.out, args.config)
    except ConfigError as e:
        print(f"dico_scale.convert: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(blob['state_dict'])} tensors of the dico_ref captioner")
    return 0


if __name__ == "__main__":
    from dico_scale.exit_codes import leave_main

    leave_main(main, "dico_scale.convert")  # without the interpreter's teardown (seconds per process)
