"""Resuming at another world size through DeepSpeed's universal checkpoint.

A tag written by N ranks holds its optimizer state in N partitions, which M != N ranks cannot load. DeepSpeed's
`ds_to_universal.py` rewrites it as one folder per parameter (fp32 weights, Adam moments, step) that any number of
ranks loads with `"checkpoint": {"load_universal": true}`. `universal_checkpoint` converts a tag once, on rank 0
while the others wait, into `<tag>_universal` beside it: written inside `<tag>_universal.tmp`, given its own
`complete` marker (file manifest, and the tag's marker digest so that a tag rewritten by a run started over is not
mistaken for its source), then renamed into place. A later resume verifies and reuses it; a damaged, half-written or
stale one is converted again. `save_checkpoint` removes it with its tag.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import MARKER, UNIVERSAL, agree, manifest, read_marker, verify, write_marker
from .errors import ConfigError

WAIT = timedelta(hours=6)  # how long the other ranks wait for rank 0's conversion
PARAM = "param"  # the tensor's key in a universal zero/<name>/fp32.pt (deepspeed.checkpoint.constants.PARAM)


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.with_name(tag_dir.name + UNIVERSAL)


def _source_digest(tag_dir: Path) -> str:
    return hashlib.sha256((tag_dir / MARKER).read_bytes()).hexdigest()


def _rank0(value):
    """Rank 0's value on every rank: each rank then takes the same branch into the collectives that follow."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _problem(out: Path, tag_dir: Path) -> str | None:
    """A collective: why `out` cannot be used as the conversion of tag_dir, or None."""
    problem = None
    if dist.get_rank() == 0:
        if not (out / MARKER).is_file():
            problem = "missing" if not out.exists() else f"no '{MARKER}' marker (half-written)"
        else:
            try:
                marker = read_marker(out)
            except ConfigError as e:
                marker = {"error": str(e)}
            if marker.get("source") != _source_digest(tag_dir):
                problem = marker.get("error") or f"converted from another {tag_dir.name} (its marker differs)"
    problem = _rank0(problem)
    return problem if problem is not None else verify(out)


def _convert(tag_dir: Path, dst: Path) -> None:
    """ds_to_universal.py's main, in this process: one worker each, so it runs in sequence without forking a process
    that holds a process group (and without the seconds a new interpreter spends importing DeepSpeed). Its chatter is
    kept out of the run's log. inject_missing_state: tags saved before `universal_checkpoint_info` convert too."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(dst), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
            if read_marker(tag_dir).get("zero_stage") == 3:
                _add_frozen_zero3(tag_dir, dst)
    except Exception as e:
        raise RuntimeError(f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from e


def _add_frozen_zero3(tag_dir: Path, dst: Path) -> None:
    """The ZeRO-3 path of ds_to_universal.py writes only the optimizer's parameters; the frozen ones (and buffers)
    come from the tag's own consolidation, so that `finish_universal_load` finds every tensor (the ZeRO-1/2 path writes
    them itself)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    for name, tensor in state.items():
        path = dst / "zero" / name / "fp32.pt"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({PARAM: tensor.float()}, path)


def universal_checkpoint(tag_dir: Path, log) -> Path:
    """A collective: the verified universal conversion of tag_dir, converted now when there is none usable.
    ConfigError (on every rank, one line) when the conversion fails."""
    out = universal_dir(tag_dir)
    saved = read_marker(tag_dir).get("world_size")
    problem = _problem(out, tag_dir)
    if problem is None:
        log(f"checkpoint {tag_dir} was written by {saved} ranks: loading its universal conversion {out} "
            "(converted earlier)")
        return out
    if problem != "missing":
        log(f"not using {out}: {problem}; converting {tag_dir} again")
    tmp, failure, start = out.with_name(out.name + ".tmp"), "", time.perf_counter()
    # The others wait for rank 0 in a gloo group of their own: converting a big checkpoint (about 55 MB/s measured,
    # BENCHMARKS.md) can outlast the main group's timeout (DEEPSPEED_TIMEOUT, 10 min), whose NCCL watchdog would
    # end the job.
    waiting = dist.new_group(backend="gloo", timeout=WAIT)
    if dist.get_rank() == 0:
        try:
            for folder in (out, tmp):
                shutil.rmtree(folder, ignore_errors=True)
            # the converter writes `latest_universal` beside its output: inside tmp, it goes away with it
            _convert(tag_dir, tmp / out.name)
        except Exception as e:  # noqa: BLE001 - reported on every rank by agree
            failure = f"checkpoint {tag_dir}: converting it for {dist.get_world_size()} ranks failed: {e}"
    try:
        agree(failure, ConfigError, group=waiting)
    finally:
        dist.destroy_process_group(waiting)
    files = manifest(tmp / out.name)  # the ranks checksum shares of it, as for a save
    if dist.get_rank() == 0:
        try:
            write_marker(tmp / out.name, {"universal_of": tag_dir.name, "source": _source_digest(tag_dir),
                                          "world_size": saved, "files": files})
            (tmp / out.name).rename(out)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            failure = f"checkpoint {tag_dir}: cannot keep its universal conversion in {out}: {e}"
    agree(failure, ConfigError)
    log(f"checkpoint {tag_dir} was written by {saved} ranks: converted it to {out} for {dist.get_world_size()} "
        f"ranks in {time.perf_counter() - start:.1f} s")
    return out


def finish_universal_load(engine, universal: Path) -> None:
    """After engine.load_checkpoint from a universal folder.

    The flag is switched off: DeepSpeed 0.19.8 reads it only while loading (runtime/engine.py), and DeepSpeed #7546
    reports ZeRO-3 saves with it on that wrote rank 0's model states only (not seen here at 2 CPU ranks), so the
    run's next save is made exactly as a run that never loaded a universal checkpoint makes it.
    The universal load restores only the optimizer's parameters: frozen parameters and buffers are copied here from
    the conversion, so that they are the checkpoint's, not those the config built."""
    engine._config.load_universal_checkpoint = False
    import deepspeed

    module = engine.module
    saved_names = set(module.state_dict())  # persistent tensors only: a non-persistent buffer is never saved
    tensors = [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()]
               if n in saved_names and not t.requires_grad]
    missing = [n for n, _ in tensors if not (universal / "zero" / n / "fp32.pt").is_file()]
    if missing:
        raise ConfigError(f"checkpoint {universal}: no saved value of {len(missing)} frozen tensors, e.g. {missing[0]}")
    params = [t for _, t in tensors if isinstance(t, torch.nn.Parameter)]
    with torch.no_grad(), deepspeed.zero.GatheredParameters(params, modifier_rank=0,
                                                             enabled=engine.zero_optimization_stage() == 3):
        for name, t in tensors:
            saved = torch.load(universal / "zero" / name / "fp32.pt", map_location="cpu", weights_only=False)[PARAM]
            t.copy_(saved.view(t.shape).to(t.dtype))
