"""Checkpoints without DeepSpeed's engine.

`python -m dico_scale.export --checkpoint TAG_DIR --out model.pt` consolidates a training checkpoint (ZeRO shards)
into one fp32 file laid out as engine.export_weights writes it: {"state_dict", "config", "stage", "step",
"mlflow_run_id"}. `--format safetensors --out model.safetensors` writes the weights as safetensors (the format people
share: no pickle) and the rest as model.json beside them; it also converts a model.pt export. The helpers below read
every form (model.pt, .safetensors + .json, tag folder) for evaluate, caption and train.init_from; evaluate and
caption also read a transformers folder (folder_meta).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

if __package__ in (None, ""):  # run as a file (deepspeed dico_scale/X.py): our folder must not shadow other modules
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from dico_scale.config import Config, load_config, setting  # noqa: E402
from dico_scale.errors import CheckpointError, ConfigError, OneLineParser, first_line  # noqa: E402
from dico_scale.models.export_folder import EXPORT_MARK, export_run, foreign_folder, sidecar  # noqa: E402
from dico_scale.preflight import check_vlm_input, inside, out_file_problem, run_export  # noqa: E402
from dico_scale.stages import captioner_stages  # noqa: E402

# Overrides applied before the user's: evaluation needs neither the training start point nor the tower's source
# weights (the checkpoint holds the whole model), and those paths may be gone; the attention the run used is its
# machine's (flash-attn on a GPU): here transformers chooses again, unless the user's overrides name one.
EVAL_OVERRIDES = ["train.init_from=", "train.resume=none", "captioner.image_encoder_weights=",
                  "captioner.attn_implementation="]


def _client_state(tag: Path) -> dict:
    """DeepSpeed's model-states file of a tag (client state included), memory-mapped: only the small keys are read.
    ZeRO-3 writes one per rank (zero_pp_rank_0_... holds the same client state)."""
    import torch

    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    f = next((tag / n for n in names if (tag / n).is_file()), None)
    if f is None:
        raise ConfigError(f"checkpoint folder {tag} has no {' or '.join(names)}")
    return torch.load(f, map_location="cpu", weights_only=False, mmap=True)


def _sibling_run_id(export: Path, step) -> str | None:
    """The run id of the newest complete checkpoint beside an export file, if it is the same step (same run)."""
    from dico_scale.checkpoint import run_tags

    tags = run_tags(export.parent)
    if not tags:
        return None
    state = _client_state(tags[-1])
    return state.get("mlflow_run_id") if state.get("step") == step else None


def _safetensors_meta(p: Path) -> dict:
    """The sidecar's config, stage, step and run id; the weights file's header is read too (a bad file fails here)."""
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            f.keys()
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint '{p}': {first_line(e)}") from None
    j = sidecar(p)
    if not j.is_file():
        raise ConfigError(f"checkpoint '{p}' has no {j.name} beside it (config, stage, step: written by "
                          f"dico_scale.export --format safetensors)")
    try:
        meta = json.loads(j.read_text())
        assert isinstance(meta, dict) and isinstance(meta.get("config"), str)
    except (ValueError, AssertionError):
        raise ConfigError(f"checkpoint '{p}': {j.name} is not a dico_scale export's JSON (needs 'config')") from None
    return {k: meta.get(k) for k in ("config", "stage", "step", "mlflow_run_id")}


def checkpoint_meta(path: str) -> dict:
    """{"path", "is_tag", "config" (YAML text), "stage", "step", "mlflow_run_id"} of an export file or tag folder, or
    of a transformers folder (folder_meta; "folder": True)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    if p.is_dir() and not (p / "complete").is_file() and (p / "config.json").is_file():
        return folder_meta(p)
    if p.is_dir():
        if not (p / "complete").is_file():
            raise ConfigError(f"checkpoint folder {path} is not a complete training checkpoint (no 'complete' marker)")
        from dico_scale.checkpoint import verify_local

        if problem := verify_local(p):
            raise ConfigError(f"checkpoint folder {path} fails verification: {problem}")
        if not (p / "config.yaml").is_file():
            raise ConfigError(f"checkpoint folder {path} has no config.yaml")
        state = _client_state(p)
        step = state.get("step", state.get("global_steps"))
        meta = {"config": (p / "config.yaml").read_text(), "step": step, "mlflow_run_id": state.get("mlflow_run_id")}
    elif p.suffix == ".safetensors":
        meta = _safetensors_meta(p)
    else:
        from dico_scale.models.weights import load_torch_file

        blob = load_torch_file(path, "checkpoint", mmap=True)
        if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict) or "config" not in blob:
            raise ConfigError(f"checkpoint '{path}' is not a dico_scale export (needs a dict 'state_dict' and "
                              "'config')")
        meta = {"config": blob["config"], "step": blob.get("step"), "mlflow_run_id": blob.get("mlflow_run_id")}
    run_config_mapping(meta["config"], f"checkpoint '{path}'")
    if not p.is_dir() and meta["mlflow_run_id"] is None:  # exports written before the run id was stored
        meta["mlflow_run_id"] = _sibling_run_id(p, meta["step"])
    meta.update(path=str(p.resolve()), is_tag=p.is_dir())
    return meta


def folder_meta(p: Path) -> dict:
    """checkpoint_meta of a transformers save_pretrained folder, read by the Hugging Face row of its architecture from
    its own weights: an export's hf/ as the run it comes from (its config, stage, step and MLflow run; LoRA merged),
    any other folder (the starting model: its scores before training) with the row's defaults, as stage xe."""
    from dico_scale.models.folders import row_reading

    try:
        row = row_reading(str(p))
    except ConfigError as e:
        raise ConfigError(f"checkpoint folder {e}") from None
    run = export_run(p) or {"config": "train:\n  stage: xe\n"}
    cfg = run_config_mapping(run["config"], f"checkpoint folder '{p}' ({EXPORT_MARK})")
    for key, value in (("captioner.model", row), ("captioner.hf_path", str(p.resolve())), ("captioner.lora.r", 0),
                       ("captioner.lora.modules_to_save", "")):  # the weights are the folder's, adapters merged
        OmegaConf.update(cfg, key, value)
    return {"config": OmegaConf.to_yaml(cfg), "step": run.get("step"), "mlflow_run_id": run.get("mlflow_run_id"),
            "path": str(p.resolve()), "is_tag": False, "folder": True}


def run_config_mapping(text, where: str) -> DictConfig:
    """The run config a checkpoint records (YAML text), as a mapping; a ConfigError naming `where` otherwise."""
    try:
        cfg = OmegaConf.create(text) if isinstance(text, str) else None
    except Exception:  # YAML's errors, whatever their type
        cfg = None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{where}: its run config is not a YAML mapping")
    return cfg


def _config_from_text(text: str, overrides: list[str], source: str) -> Config:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "config.yaml"
        f.write_text(text)
        try:
            return load_config(str(f), EVAL_OVERRIDES + list(overrides), training=False)
        except ConfigError as e:  # named by the checkpoint, not the temporary file that held its config
            raise ConfigError(str(e).replace(str(f), f"the run config of {source}")) from None


def own_folder(meta: dict) -> list[str]:
    """An override of captioner.hf_path to the export's own transformers folder (hf/ beside model.pt, or in the run's
    output folder for a checkpoint tag) when the folder the run started from is gone: the architecture and processor
    are the same, and the weights are the checkpoint's anyway. No override when the folder is there or no hf/ exists."""
    hf_path = OmegaConf.select(OmegaConf.create(meta["config"]), "captioner.hf_path", default="")
    if not hf_path or (Path(hf_path) / "config.json").is_file():
        return []
    p = Path(meta["path"])
    for folder in (p.parent / "hf", p.parent.parent / "hf"):
        if (folder / "config.json").is_file():
            print(f"dico_scale: note: captioner.hf_path '{hf_path}' is gone: using the export's own folder {folder}",
                  file=sys.stderr, flush=True)
            return [f"captioner.hf_path={folder}"]
    return []


def load_run_config(meta: dict, overrides: list[str] = ()) -> Config:
    """The checkpoint's resolved config with EVAL_OVERRIDES and then the user's key=value overrides on top; a Hugging
    Face row whose starting folder is gone reads the export's own (own_folder)."""
    if item := setting(overrides, ("train.stage",)):
        raise ConfigError(f"'{item}': the stage is the checkpoint's (what its weights were trained as), not "
                          "an override")
    cfg = _config_from_text(meta["config"], own_folder(meta) + list(overrides), meta["path"])
    stage = cfg.train.stage
    if stage not in captioner_stages():
        raise ConfigError(f"checkpoint {meta['path']} is a '{stage}'-stage model, not a captioner "
                          f"({', '.join(captioner_stages())})")
    meta["stage"] = stage
    check_vlm_input(cfg)  # a prompt the processor refuses, before any weights load
    if meta.get("folder"):  # what the folder's generation_config.json asks that the search does not do, as training
        from dico_scale.models.folders import generation_note

        if note := generation_note(meta["path"], cfg.generation):
            print(f"dico_scale: {note}", file=sys.stderr, flush=True)
    return cfg


def load_captioner(cfg: Config, meta: dict, device):
    """(captioner in eval mode on device, tokenizer) with the checkpoint's weights."""
    import torch

    from dico_scale.models import build_captioner

    if meta["is_tag"] and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
    with contextlib.redirect_stdout(sys.stderr):  # zero_to_fp32 prints progress; stdout may carry results
        captioner = build_captioner(cfg, None if meta.get("folder") else meta["path"])  # a folder: its own weights
    return captioner.to(device).eval(), captioner.tokenizer


def consolidate(tag_dir: str, fmt: str = "pt", meta: dict | None = None) -> dict:
    """The fp32 export of a training checkpoint tag, as engine.export_weights would have written it; for
    fmt='safetensors' also the contents of a model.pt export. meta: checkpoint_meta(tag_dir), when already read."""
    meta = meta or checkpoint_meta(tag_dir)
    if not meta["is_tag"]:
        if fmt == "pt" or tag_dir.endswith(".safetensors"):
            raise ConfigError(f"{tag_dir} is already an exported file, not a checkpoint folder")
        import torch
        blob = torch.load(tag_dir, map_location="cpu", weights_only=True)
        stage = blob.get("stage") or OmegaConf.create(meta["config"]).train.stage
        return {"state_dict": blob["state_dict"], "config": meta["config"], "stage": stage, "step": meta["step"],
                "init_from": blob.get("init_from"), "mlflow_run_id": meta["mlflow_run_id"]}
    if not os.environ.get("DS_ACCELERATOR"):
        import torch
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    p = Path(meta["path"])
    with contextlib.redirect_stdout(sys.stderr):
        state = get_fp32_state_dict_from_zero_checkpoint(str(p.parent), tag=p.name)
    train = OmegaConf.create(meta["config"]).train  # read, not validated: its paths may be gone by now
    return {"state_dict": {k: v.float().contiguous() for k, v in state.items()}, "config": meta["config"],
            "stage": train.stage, "step": meta["step"], "init_from": train.get("init_from", ""),
            "mlflow_run_id": meta["mlflow_run_id"]}


def write_export(blob: dict, out: str, fmt: str) -> None:
    """model.pt as engine.export_weights writes it, or out.safetensors + out.json; each file written atomically,
    the JSON last (a safetensors export without its JSON is not read)."""
    from dico_scale.checkpoint import describe_save_failure

    tmp, j = f"{out}.tmp", sidecar(out)
    try:
        _write_files(blob, out, fmt, tmp, j)
    except Exception as e:  # a full disk: torch's writer says 'unexpected pos', safetensors its own words
        for t in (tmp, f"{j}.tmp"):
            with contextlib.suppress(OSError):
                os.remove(t)
        raise CheckpointError(describe_save_failure(e, Path(out), "export")) from None


def _write_files(blob: dict, out: str, fmt: str, tmp: str, j) -> None:
    import torch

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if fmt == "pt":
        torch.save(blob, tmp)
        os.replace(tmp, out)
        return
    from safetensors.torch import save_file

    # clone: ZeRO's consolidated tensors are views of flat buffers, and safetensors refuses shared storage
    save_file({k: v.float().clone().contiguous() for k, v in blob["state_dict"].items()}, tmp,
              metadata={"format": "pt", "producer": "dico_scale.export"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes owner-only (0600): readable as model.pt is, by the umask
    os.replace(tmp, out)
    info = {k: blob[k] for k in ("config", "stage", "step", "mlflow_run_id")}
    Path(f"{j}.tmp").write_text(json.dumps({**info, "weights": os.path.basename(out)}, indent=1))
    os.replace(f"{j}.tmp", j)


def adapted_captioner(blob: dict):
    """The captioner of a LoRA run's checkpoint with its adapters (from the blob's state), or None when the blob
    holds no adapters."""
    if not any(".lora_" in k for k in blob["state_dict"]):
        return None
    from dico_scale.models import build_captioner
    from dico_scale.models.weights import load_state

    captioner = build_captioner(_config_from_text(blob["config"], [], "the checkpoint"))
    load_state(captioner, blob["state_dict"], "the checkpoint")
    return captioner


def merge_adapters(blob: dict, captioner) -> dict:
    """The blob with the adapters of `captioner` (adapted_captioner's) merged into their weights (the keys of the
    plain model), as training's own export writes them; the blob itself without adapters."""
    if captioner is None:
        return blob
    from dico_scale.models.lora import merged_state

    return {**blob, "state_dict": merged_state(captioner, blob["state_dict"])}


def run_export_problem(out: str, tag: Path) -> str | None:
    """Why `out` must not be written: it is what a run writes at its end (model.pt, hf/, best/ of a folder holding
    checkpoints/), which its resume and the next stage's train.init_from read; the tag's own run or another."""
    from dico_scale.checkpoint import checkpoints_dir

    for run_dir in Path(out).resolve().parents:
        if checkpoints_dir(run_dir).is_dir() and (own := run_export(out, run_dir)):
            whose = "the run's own" if tag.parent == checkpoints_dir(run_dir) else f"the run {run_dir}'s"
            return (f"'{out}' is {whose} export ({own}), which its resume and the next stage's train.init_from "
                    "read: write it elsewhere")
    return None


def other_export(hf: Path, out: str) -> str | None:
    """Why the hf/ beside `out` belongs to another export in that folder (None: none there, or the one `out` holds,
    which this export replaces with it): two exports into one folder would share one hf/."""
    run = export_run(hf)
    if run is None:  # no folder, not ours (foreign_folder), or written before folders recorded their run
        return None
    try:
        here = checkpoint_meta(out) if os.path.exists(out) else None
    except ConfigError:
        here = None
    if here and all(str(here.get(k)) == str(run.get(k)) for k in ("config", "step", "mlflow_run_id")):
        return None
    return (f"{hf} is the transformers folder of another export there ({run.get('stage')} step "
            f"{run.get('step')}), which this one would replace: export into a folder of its own")


def hf_folder(blob: dict, out: str) -> Path | None:
    """hf/ beside `out` for a Hugging Face captioner row (as training's own export writes it); None for others."""
    from dico_scale.models import MODELS

    row = OmegaConf.create(blob["config"]).get("captioner", {}).get("model", "builtin")
    if blob["stage"] not in captioner_stages() or not MODELS[row].hf:
        return None
    return Path(out).resolve().parent / "hf"


def write_hf_folder(blob: dict, folder: Path, captioner=None) -> None:
    """`captioner`: the run's, when already built (a LoRA run's, for its merge)."""
    from dico_scale.models import build_captioner

    cfg = _config_from_text(blob["config"], [], "the checkpoint")
    captioner = captioner or build_captioner(cfg)
    captioner.save_pretrained(folder, blob["state_dict"], cfg.generation, blob)


def write_adapters(blob: dict, captioner, out: str) -> int:
    """peft's adapter folder of a LoRA run's checkpoint (PeftModel.from_pretrained(base model, out) loads it)."""
    from dico_scale.models.lora import save_adapters

    if captioner is None:  # a LoRA run whose state has no adapter weights (main refuses lora.r=0 before this)
        raise ConfigError("--adapters-only: the checkpoint's weights hold no LoRA adapters (lora_A / lora_B)")
    save_adapters(captioner, out)
    print(f"wrote {out}: LoRA adapters (peft), stage={blob['stage']} step={blob['step']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="dico_scale.export", description="Consolidates a training checkpoint (ZeRO "
                           "shards) into one fp32 model.pt, or writes safetensors (also from a model.pt export).")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint tag folder, e.g. <output_dir>/checkpoints/step_00000100 (with "
                        "--format safetensors also a model.pt export)")
    parser.add_argument("--out", required=True, help="the file to write (fp32, whole model, with its config)")
    parser.add_argument("--format", choices=("pt", "safetensors"), default="pt",
                        help="pt: one torch file (as the run's model.pt); safetensors: OUT (.safetensors) + its .json")
    parser.add_argument("--adapters-only", action="store_true",
                        help="a LoRA run: write peft's adapter folder OUT (adapter_config.json, adapter_model."
                        "safetensors) instead of the merged model")
    args = parser.parse_args(argv)
    try:
        if args.adapters_only and args.format != "pt":
            raise ConfigError("--adapters-only writes peft's adapter folder (safetensors): --format does not apply")
        if args.format == "safetensors" and not args.out.endswith(".safetensors"):
            raise ConfigError(f"--out '{args.out}' must end with .safetensors for --format safetensors")
        tag = Path(args.checkpoint).resolve()  # a tag in a run's checkpoints/: before --out's folder is made
        if problem := run_export_problem(args.out, tag):
            raise ConfigError(f"--out {problem}")
        if problem := (foreign_folder(args.out) if args.adapters_only else out_file_problem(args.out)):
            raise ConfigError(f"--out {problem}")
        if inside(args.out, args.checkpoint):  # a file of the tag replaced: the checkpoint fails its verification
            raise ConfigError(f"--out '{args.out}' lies in --checkpoint '{args.checkpoint}': write it elsewhere")
        meta = checkpoint_meta(args.checkpoint)
        if meta.get("folder"):
            raise ConfigError(f"--checkpoint {args.checkpoint} is a transformers folder, not a training checkpoint: "
                              "nothing to consolidate")
        if args.adapters_only and not OmegaConf.create(meta["config"]).get("captioner", {}).get("lora", {}).get("r"):
            raise ConfigError("--adapters-only: the checkpoint holds no LoRA adapters (captioner.lora.r=0)")
        blob = consolidate(args.checkpoint, args.format, meta)  # ZeRO shards consolidated only past the checks
        if (hf := None if args.adapters_only else hf_folder(blob, args.out)) and (
                problem := run_export_problem(str(hf), tag) or foreign_folder(hf) or other_export(hf, args.out)):
            raise ConfigError(f"--out {args.out}: a Hugging Face row's export writes hf/ beside it, but {problem}")
        captioner = adapted_captioner(blob)  # built once: for the merge and the hf/ folder, or the adapters
        if args.adapters_only:
            return write_adapters(blob, captioner, args.out)
        blob = merge_adapters(blob, captioner)
    except ConfigError as e:
        print(f"dico_scale.export: error: {e}", file=sys.stderr)
        return 2
    try:
        write_export(blob, args.out, args.format)
        if hf:
            write_hf_folder(blob, hf, captioner)
            print(f"wrote {hf}: a transformers save_pretrained folder")
    except CheckpointError as e:  # the writing failed (a full disk): the temporary files are gone
        print(f"dico_scale.export: error: {e}", file=sys.stderr)
        return 1
    extra = f" + {sidecar(args.out)}" if args.format == "safetensors" else ""
    print(f"wrote {args.out}{extra}: {len(blob['state_dict'])} tensors, stage={blob['stage']} step={blob['step']}")
    return 0


if __name__ == "__main__":
    from dico_scale.exit_codes import leave_main

    leave_main(main, "dico_scale.export")  # without the interpreter's teardown (seconds per process)
