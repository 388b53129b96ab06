"""Checks that run before anything is built, so that a run that cannot work fails in seconds with one line:
an output directory that cannot be written or that belongs to another stage, a tracking server that does not
answer."""
from __future__ import annotations

import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import yaml

from .config import Config
from .errors import ConfigError
from .stages import STAGES, captioner_stages


def write_problem(folder) -> str | None:
    """Creates the folder and writes a probe file into it (removed again); why that failed, or None."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as e:
        return str(e.strerror or e)
    return None


def out_file_problem(path: str) -> str | None:
    """Why a file cannot be written at `path` (an entry point's --out), checked before the work that ends in it."""
    if not path.strip():
        return f"'{path}' names no file"
    if os.path.isdir(path):
        return f"'{path}' is a folder; name the file to write"
    if problem := write_problem(Path(path).resolve().parent):
        return f"'{path}' cannot be written ({problem})"
    return None


def inside(path: str, other: str) -> bool:
    """Whether `path` is `other` or lies inside it, links and '..' resolved: an output that would replace the input
    it is made from (a checkpoint, a model folder) or one of its files."""
    p, o = Path(path).resolve(), Path(other).resolve()
    return p == o or o in p.parents


def run_checkpoints_holding(path: str) -> Path | None:
    """The checkpoints/ folder of a run that `path` is or lies in (links and '..' resolved), or None: one that holds
    tags, or whose run folder holds a config.yaml."""
    p = Path(path).resolve()
    return next((d for d in (p, *p.parents) if d.name == "checkpoints" and d.is_dir()
                 and ((d.parent / "config.yaml").is_file() or any(d.glob("step_*")))), None)


def run_export(path: str, run_dir: Path) -> Path | None:
    """What a run in run_dir writes at its end (model.pt, hf/, best/) that `path` is or lies in, or None."""
    return next((run_dir / w for w in ("model.pt", "hf", "best") if inside(path, run_dir / w)), None)


def check_start_file(cfg: Config) -> None:
    """train.init_from, and the folder of a Hugging Face row, must not be what this run writes at its end (its
    model.pt, hf/ or best/ in train.output_dir): the export would replace the weights it started from."""
    from .models import MODELS

    starts = {"train.init_from": cfg.train.init_from}
    if MODELS[cfg.captioner.model].hf:
        starts["captioner.hf_path"] = cfg.captioner.hf_path
    for key, path in starts.items():
        if path and (written := run_export(path, Path(cfg.train.output_dir))):
            raise ConfigError(f"{key} '{path}' is what this run writes at its end ({written}): start from a copy, "
                              "or use another train.output_dir")


def check_output_dir(path: str) -> None:
    """The run's folder, and its checkpoints/ where one is there already (a file, a link to a scratch volume that is
    not mounted, a read-only mount): every save would fail, the first after the first steps."""
    from .checkpoint import checkpoints_dir

    if holder := run_checkpoints_holding(path):
        raise ConfigError(f"train.output_dir '{path}' lies in the checkpoints of the run {holder.parent}, whose saves "
                          "empty and prune the folders there: give the run a folder of its own")
    if problem := write_problem(path):
        raise ConfigError(f"train.output_dir '{path}' cannot be created or written: {problem}")
    ckpt = checkpoints_dir(path)
    if ckpt.is_symlink() and not ckpt.exists():
        problem = f"a link to '{os.readlink(ckpt)}', which does not exist"
    elif ckpt.exists() and not ckpt.is_dir():
        problem = "not a folder"
    elif ckpt.is_dir():
        problem = write_problem(ckpt)
    if problem:
        raise ConfigError(f"train.output_dir '{path}': its checkpoints folder '{ckpt}' cannot hold checkpoints: "
                          f"{problem}")


def check_tracking_server(uri: str, timeout: float) -> str | None:
    """None when an http(s) MLflow server answers its health check within timeout seconds, else why not.
    Other stores (sqlite, files, databricks) are not probed."""
    if not uri.startswith(("http://", "https://")):
        return None
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return None if r.status == 200 else f"{url} answered HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"{url} answered HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"no answer from {url} within {timeout:g} s ({reason})"


def check_sqlite_store(uri: str) -> str | None:
    """A sqlite store's folder must exist or be creatable and be writable."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = Path(uri[len("sqlite:///"):]).parent
    problem = write_problem(folder)
    return f"cannot write the sqlite store's folder {folder} ({problem})" if problem else None


def check_file_store(uri: str) -> str | None:
    """A path (or file: URI) names MLflow's folder store: a regular file there fails in MLflow's client, on rank 0
    alone and after the models are built, while the other ranks wait for it in a collective."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file") or not Path(parsed.path if parsed.scheme else uri).is_file():
        return None
    return ("it is a regular file, neither a folder store nor an sqlite:/// URI; a tracking.uri is "
            "http(s)://<host>:<port>, sqlite:///<folder>/mlflow.db or a folder")


def check_tracking(cfg: Config, rank: int) -> None:
    """One line and ConfigError when the tracking store is unusable; with tracking.required=false, a warning on
    rank 0 and tracking off instead."""
    if not cfg.tracking.enabled:
        return
    from .tracking import tracking_uri

    uri = tracking_uri(cfg)
    problem = (check_tracking_server(uri, cfg.tracking.connect_timeout_s) or check_sqlite_store(uri)
               or check_file_store(uri))
    if problem is None:
        return
    what = f"tracking {'server' if uri.startswith(('http://', 'https://')) else 'store'} '{uri}'"
    if cfg.tracking.required:
        raise ConfigError(f"{what} is unusable: {problem} (tracking.required=false trains without it)")
    if rank == 0:
        print(f"dico_scale: warning: {what} is unusable: {problem}; training without tracking "
              "(tracking.required=false)", file=sys.stderr, flush=True)
    cfg.tracking.enabled = False


def tag_setting(tag: Path, key: str):
    """train.<key> of the run that wrote a checkpoint tag, from the config.yaml saved in it; None when unknown."""
    try:
        return ((yaml.safe_load((tag / "config.yaml").read_text()) or {}).get("train") or {}).get(key)
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def tag_stage(tag: Path) -> str | None:
    """The stage a checkpoint tag was written by: its marker, else (older tags) the config.yaml saved beside it."""
    from .checkpoint import read_marker

    stage = read_marker(tag).get("stage")
    return tag_setting(tag, "stage") if stage is None else stage


def export_record(path: Path) -> dict:
    """What an exported model.pt records beside its weights (engine.export_weights: stage, step, ...); mapped, not
    read, however large. {} when it is missing or unreadable."""
    import torch

    if not path.is_file():
        return {}
    try:
        blob = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable export records nothing
        return {}
    return {k: v for k, v in blob.items() if k != "state_dict"} if isinstance(blob, dict) else {}


def export_stage(path: Path) -> str | None:
    return export_record(path).get("stage")


def finished_run(cfg: Config) -> str | None:
    """With train.resume=auto, a folder whose run has finished (its newest complete checkpoint at train.max_steps and
    model.pt exported at that step): what to say instead of building anything. A finished Slurm job resubmitted or
    requeued would otherwise load every model to train no step and export model.pt again. Any other case (a lower
    max_steps, a newer tag that may not verify) goes through the resume as before."""
    from .checkpoint import run_tags, tag_name

    t, out = cfg.train, Path(cfg.train.output_dir)
    tags = run_tags(out) if t.resume == "auto" else []
    newest_is_last = bool(tags) and tags[-1].name == tag_name(t.max_steps)
    if not newest_is_last or export_record(out / "model.pt").get("step") != t.max_steps:
        return None
    return (f"train.output_dir '{out}': the run finished at step {t.max_steps} ({out / 'model.pt'}); nothing to do "
            "(raise train.max_steps to train on)")


def check_stage(cfg: Config, rank: int) -> None:
    """A run folder belongs to one stage: refuse to resume another stage's checkpoint, or to write checkpoints and
    model.pt into a folder whose newest checkpoint (else its model.pt) is another stage's. Unknown: a warning."""
    from .checkpoint import MARKER, run_tags

    t, out = cfg.train, Path(cfg.train.output_dir)
    tags = run_tags(out)
    if t.resume not in ("none", "auto") and (Path(t.resume) / MARKER).is_file():
        found = Path(t.resume), tag_stage(Path(t.resume)), f"train.resume={t.resume}: the checkpoint"
    elif tags:
        found = tags[-1], tag_stage(tags[-1]), f"train.output_dir '{out}': its newest checkpoint {tags[-1].name}"
    elif (out / "model.pt").is_file():
        found = out / "model.pt", export_stage(out / "model.pt"), f"train.output_dir '{out}': its model.pt"
    else:
        return
    path, stage, where = found
    if stage is None:
        if rank == 0:
            print(f"dico_scale: warning: {path} does not record its stage (written before stages were recorded); "
                  f"make sure it is a {t.stage} run's", file=sys.stderr, flush=True)
    elif stage != t.stage:
        raise ConfigError(f"{where} belongs to the {stage} stage, this run is {t.stage}: use one "
                          "train.output_dir per stage (and train.init_from=<the other folder>/model.pt)")


def check_history(cfg: Config) -> None:
    """A run must not start beside complete checkpoints of another history: all of the folder's when it starts
    fresh or from another folder's tag, those after its tag when it resumes an older one of its own. They would
    outlive its own in the pruning (the newest are kept), and a later train.resume=auto (a requeued job's) would
    continue them instead of this run."""
    from .checkpoint import own_tag, run_tags

    t, out = cfg.train, Path(cfg.train.output_dir)
    tags = run_tags(out)
    if t.resume == "auto" or not tags:
        return
    start = None if t.resume == "none" else Path(t.resume).resolve()
    own = start is not None and own_tag(start, out)
    if not (other := [p for p in tags if p.name > start.name] if own else tags):
        return
    this = f"resumes {start.name}" if own else "starts fresh" if start is None else f"starts from {t.resume}"
    held = f"checkpoints after {start.name}" if own else "another run's checkpoints"
    raise ConfigError(f"train.output_dir '{out}' holds {held} (up to {other[-1].name}) and this run {this}: a later "
                      "train.resume=auto would continue those instead; continue them with train.resume=auto, or "
                      "remove them (or use another output_dir) to start over")


def check_lone_export(cfg: Config) -> None:
    """A folder with model.pt and no complete checkpoint (a finished run whose checkpoints were removed to save
    space, then its job resubmitted): a run there starts over and would replace that model at its end."""
    from .checkpoint import run_tags

    out = Path(cfg.train.output_dir)
    if run_tags(out) or not (out / "model.pt").is_file():
        return
    step = export_record(out / "model.pt").get("step")
    raise ConfigError(f"train.output_dir '{out}' holds a model.pt{f' of step {step}' if step is not None else ''} "
                      "and no checkpoint to continue: this run would start over and replace it at its end; move it "
                      "away (or use another output_dir)")


def check_device(cfg: Config) -> None:
    """train.device=cuda where torch sees no GPU: DeepSpeed would pick its CPU accelerator and train there, silently
    (the GPU check's harness, run on a CPU, trained on it)."""
    import torch

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda, but torch sees no CUDA device here (train.device=auto uses one when "
                          "there is one)")


def check_vlm_input(cfg) -> None:
    """An hf_vlm captioner's processor, prompt and image options (vlm_processor.check_folder), in seconds: training's
    preflight, and caption and evaluate before they load the weights."""
    if cfg.captioner.model == "hf_vlm":
        from .models.vlm_processor import check_folder

        check_folder(cfg.captioner.hf_path, cfg.captioner.prompt, dict(cfg.captioner.images_kwargs))


def check_flex_on_cpu(cfg: Config) -> None:
    """PyTorch's FlexAttention has no backward on the CPU: a captioner trained there with it would stop at its first
    step with NotImplementedError. Inference (evaluate, caption, the frozen reference) runs it."""
    from .engine import uses_cpu

    if (cfg.captioner.attn_implementation == "flex_attention" and cfg.train.stage in captioner_stages()
            and uses_cpu(cfg)):
        raise ConfigError(f"captioner.attn_implementation=flex_attention: PyTorch's FlexAttention has no backward on "
                          f"the CPU, where this run trains (train.device={cfg.train.device}); sdpa or eager train here")


def run_preflight(cfg: Config) -> None:
    rank = int(os.environ.get("RANK", "0"))
    check_device(cfg)
    check_output_dir(cfg.train.output_dir)
    check_stage(cfg, rank)
    check_history(cfg)
    check_start_file(cfg)
    check_lone_export(cfg)
    check_tracking(cfg, rank)
    if cfg.captioner.model == "dico_ref" and STAGES[cfg.train.stage].exports == "captioner":
        from .models.dico_ref import check_folder_weights

        check_folder_weights(cfg.captioner.hf_path)  # missing / extra keys named, before any process group
    if cfg.captioner.attn_implementation:  # before any process group: an attention this model or machine lacks
        from .models.folders import check_attention

        check_attention(cfg.captioner.hf_path, cfg.captioner.attn_implementation)
        check_flex_on_cpu(cfg)
    check_vlm_input(cfg)  # before any process group
