"""The frozen models are part of a run's identity: every checkpoint records a fingerprint (sha256 and size) of the
weights its reference and evaluator were built from, and a resume whose files differ stops with one line naming the
file, instead of silently training against another reference or reward.

Which files those are is the stage's to say (`frozen_files` on its class, stages/): a stage that gains a frozen
model names it there, and nothing here changes. The fingerprint is taken once per run, on rank 0, and shared; the
check runs from the tag's `complete` marker, before any model is built or the MLflow run is touched.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch.distributed as dist

from .config import Config
from .errors import ConfigError
from .stages import stage_class

KEY = "frozen_models"  # in the checkpoint's client state and in its `complete` marker


def frozen_model_files(cfg: Config) -> dict[str, str]:
    """{label: weights path} of the frozen models the training stage is built from; "" = drawn at random (train.seed).
    Stage.frozen_files says which: xe and evaluator train against none, dico against its reference and (when its
    reward reads it) the evaluator, scst against the evaluator when its reward reads it."""
    return stage_class(cfg.train.stage).frozen_files(cfg)


def sha256_of(path: str | Path, chunk: int = 8 << 20) -> tuple[str, int]:
    """(hex digest, bytes) of a file, or of a folder (a checkpoint tag, a Hugging Face snapshot): every file in sorted
    order, each preceded by its relative name. Read in chunks: a ViT-L file is 1.7 GB."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h, size = hashlib.sha256(), 0
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
                size += len(block)
    return h.hexdigest(), size


def fingerprint(path: str, seed: int) -> dict:
    if not path:
        return {"random": True, "seed": seed}
    digest, size = sha256_of(path)
    return {"path": os.path.abspath(path), "size": size, "sha256": digest}


def frozen_fingerprints(cfg: Config, log) -> dict[str, dict]:
    """A collective: rank 0 fingerprints the frozen model files (the cost logged), every rank gets the result."""
    out = [None]
    if dist.get_rank() == 0:
        start, files = time.perf_counter(), frozen_model_files(cfg)
        out[0] = {label: fingerprint(path, cfg.train.seed) for label, path in files.items()}
        read, seconds = sum(f.get("size", 0) for f in out[0].values()), time.perf_counter() - start
        if files:
            log(f"fingerprinted the frozen models' weights ({read / 2**20:.1f} MiB) in {seconds:.1f} s")
    dist.broadcast_object_list(out, src=0)
    return out[0]


def _describe(f: dict) -> str:
    if f.get("random"):
        return f"drawn at random with train.seed={f['seed']}"
    return f"{f['path']}: {f['size']} bytes, sha256 {f['sha256'][:16]}"


def same(a: dict, b: dict) -> bool:
    """The same weights: both drawn from one seed, or files of the same content wherever they lie now."""
    keys = ("random", "seed") if a.get("random") or b.get("random") else ("size", "sha256")
    return all(a.get(k) == b.get(k) for k in keys)


def check_fingerprints(marker: dict, now: dict[str, dict], tag: Path, log) -> None:
    """ConfigError (one line naming the file) when a frozen model's weights differ from those the checkpoint's run
    started from; a one-line warning when the checkpoint records none (written before fingerprints existed)."""
    if not now:
        return
    saved = marker.get(KEY)
    if saved is None:
        log(f"warning: checkpoint {tag} records no fingerprint of the frozen models (written before fingerprints "
            f"existed): the {' and '.join(now)} are not checked against the ones it started from")
        return
    for label, f in now.items():
        if (then := _saved(saved, label)) is None:
            log(f"warning: checkpoint {tag} records no fingerprint of the {label}: not checked")
        elif not same(then, f):
            raise ConfigError(f"train.resume: the {label} differ from the ones checkpoint {tag} started from: now "
                              f"{_describe(f)}; then {_describe(then)} (restore that file, or set "
                              "train.output_dir to a new folder to start over)")


def _saved(saved: dict[str, dict], label: str) -> dict | None:
    """The checkpoint's fingerprint of `label`'s model, also where it was read through another key then (the DiCO
    reference from captioner.hf_path, now from train.init_from). A random one under another key is not: checkpoints
    written before the folder was fingerprinted record a reference started from captioner.hf_path as random."""
    if label in saved:
        return saved[label]
    model = label.split(" (")[0]
    return next((f for k, f in saved.items() if k.split(" (")[0] == model and not f.get("random")), None)
