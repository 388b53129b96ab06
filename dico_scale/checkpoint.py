"""Training checkpoints: one fresh DeepSpeed tag per save, verified before anything is loaded from it.

Each tag folder ends with a `complete` marker, written last by rank 0: the step, the world size and ZeRO stage it was
written at, and every file of the tag with its size and CRC-32 (the ranks checksum disjoint shares of the files, in
parallel). A crash mid-save leaves no marker, so the tag is never resumed. Before a resume every rank verifies a
share of the files against the marker and all ranks agree on the result: a damaged newest tag is skipped (one line
naming the file) for the previous complete one; an explicit tag that fails stops the run with ConfigError.
A tag written at another world size is resumed through its universal conversion (universal.py), kept beside it as
`<tag>_universal` and removed with it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zlib
from pathlib import Path

import torch.distributed as dist

from .errors import AgreedConfigError, CheckpointError, ConfigError
from .frozen import KEY as FROZEN_KEY

MARKER = "complete"
UNIVERSAL = "_universal"  # suffix of a tag's universal conversion (universal.py), removed with the tag


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(output_dir: str | Path) -> Path:
    """Where a run keeps its checkpoint tags: <train.output_dir>/checkpoints/."""
    return Path(output_dir) / "checkpoints"


def run_tags(output_dir: str | Path) -> list[Path]:
    """The run's complete tags, oldest first (complete_tags of its checkpoints_dir)."""
    return complete_tags(checkpoints_dir(output_dir))


def own_tag(tag: str | Path, output_dir: str | Path) -> bool:
    """Whether a tag lies in the run folder's own checkpoints/ (links and '..' resolved), not another folder's."""
    return Path(tag).resolve().parent == checkpoints_dir(output_dir).resolve()


def tag_folders(tag_dir: Path) -> tuple[Path, ...]:
    """The tag and what goes with it: its universal conversion, finished or not."""
    return tag_dir, *(tag_dir.with_name(tag_dir.name + s) for s in (UNIVERSAL, UNIVERSAL + ".tmp"))


def complete_tags(ckpt_dir: str | Path) -> list[Path]:
    """Tag folders holding a `complete` marker, oldest first (not their `_universal` conversions)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / MARKER).is_file())


def crc32(path: Path, chunk: int = 8 << 20) -> str:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            value = zlib.crc32(block, value)
    return f"{value:08x}"


def _share(names: list[str]) -> list[str]:
    """This rank's share of a sorted file list: the ranks read disjoint files at once."""
    return names[dist.get_rank()::dist.get_world_size()]


def _gathered(obj, group=None) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def describe_save_failure(e: BaseException, tag_dir: Path, what: str = "checkpoint") -> str:
    """One line naming `what` (a checkpoint tag, an export) and its path; torch's writer reports a full disk as 'file
    write failed' or 'unexpected pos', so the free space decides too."""
    chain, cause = [], e
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    try:
        free = shutil.disk_usage(tag_dir.parent).free
    except OSError:
        free = -1
    if any(getattr(c, "errno", None) == errno.ENOSPC or "No space left" in str(c) for c in chain) or 0 <= free < 1 << 20:
        return f"{what} {tag_dir}: no space left on device ({free} bytes free in {tag_dir.parent})"
    return f"{what} {tag_dir}: saving failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def agree(failure: str, error: type[Exception] = CheckpointError, group=None) -> None:
    """A collective: `error` on every rank when any rank failed (its message, one line)."""
    failures = [f for f in _gathered(failure, group) if f]
    if failures:
        raise error(failures[0])


def manifest(folder: Path) -> dict[str, dict]:
    """A collective: {file: {size, crc32}} of every file under folder but the marker; the ranks read disjoint shares."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    mine = {n: {"size": (folder / n).stat().st_size, "crc32": crc32(folder / n)} for n in _share(names)}
    return dict(sorted((n, f) for part in _gathered(mine) for n, f in part.items()))


def write_marker(folder: Path, marker: dict) -> None:
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, folder / MARKER)


def fresh_tag_folder(tag_dir: Path) -> None:
    """A collective: rank 0 makes the tag's folder empty, then all ranks agree. What a save that died left there (no
    marker; files of another world size's ranks, a stale conversion) must not join this tag's manifest; and DeepSpeed
    makes the folder on rank 0 alone before its first barrier, so a failure there (`checkpoints` a file or a dangling
    link) left the other ranks waiting in that barrier until gloo's timeout."""
    failure = ""
    if dist.get_rank() == 0:
        try:
            for old in tag_folders(tag_dir):
                if old.is_symlink() or old.is_file():
                    old.unlink()
                elif old.is_dir():
                    shutil.rmtree(old)
            tag_dir.mkdir(parents=True)
        except OSError as e:
            failure = describe_save_failure(e, tag_dir)
    agree(failure)


def save_checkpoint(engine, ckpt_dir: str, step: int, client_state: dict, config_yaml: str, keep: int) -> Path:
    """A collective: DeepSpeed's save, config.yaml, the file manifest, then the marker; older tags beyond `keep`
    removed. CheckpointError on every rank when any rank failed to write (no marker then)."""
    tag_dir = Path(ckpt_dir) / tag_name(step)
    fresh_tag_folder(tag_dir)
    failure = ""
    try:
        # universal_checkpoint_info lets ds_to_universal.py convert this ZeRO-2 checkpoint to another world size
        engine.save_checkpoint(ckpt_dir, tag=tag_dir.name, client_state={**client_state, "universal_checkpoint_info": {}})
    except Exception as e:  # noqa: BLE001 - reported to every rank by agree
        failure = describe_save_failure(e, tag_dir)
        # The write failed between the barriers that open and close DeepSpeed's save_checkpoint; the other ranks
        # wait in the closing one: enter it here, so that every rank gets to the agreement instead of hanging.
        dist.barrier()
    agree(failure)
    try:
        if dist.get_rank() == 0:
            (tag_dir / "config.yaml").write_text(config_yaml)
    except OSError as e:
        failure = describe_save_failure(e, tag_dir)
    agree(failure)
    files = manifest(tag_dir)
    if dist.get_rank() == 0:
        try:
            marker = {"step": step, "world_size": dist.get_world_size(), "zero_stage": engine.zero_optimization_stage(),
                      "files": files}
            for key in ("stage", "init_from", FROZEN_KEY):  # checked before a resume builds anything
                if client_state.get(key) is not None:
                    marker[key] = client_state[key]
            write_marker(tag_dir, marker)
            for old in complete_tags(ckpt_dir)[:-keep]:
                for folder in tag_folders(old):
                    shutil.rmtree(folder, ignore_errors=True)
        except OSError as e:
            failure = describe_save_failure(e, tag_dir)
    agree(failure)
    return tag_dir


def read_marker(tag_dir: Path) -> dict:
    """The marker's JSON; a marker written before manifests existed holds only the step."""
    try:
        marker = json.loads((tag_dir / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {tag_dir}: unreadable '{MARKER}' marker ({e})") from None
    if not isinstance(marker, dict):
        raise ConfigError(f"checkpoint {tag_dir}: the '{MARKER}' marker is not a JSON object")
    return marker


def file_problem(tag_dir: Path, name: str, want: dict) -> str | None:
    """What is wrong with one file of a tag, or None."""
    path = tag_dir / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != want.get("size"):
        return f"{name} has {size} bytes, the marker recorded {want.get('size')}"
    if "crc32" in want and crc32(path) != want["crc32"]:
        return f"{name} is damaged (CRC-32 {crc32(path)}, the marker recorded {want['crc32']})"
    return None


def verify_local(tag_dir: str | Path) -> str | None:
    """One process checks every file of a tag (export, evaluate): the first problem, or None."""
    tag_dir = Path(tag_dir)
    try:
        files = read_marker(tag_dir).get("files", {})
    except ConfigError as e:
        return str(e)
    return next((p for n in sorted(files) if (p := file_problem(tag_dir, n, files[n]))), None)


def verify(tag_dir: Path) -> str | None:
    """A collective: the ranks check disjoint shares of the tag's files; every rank returns the same first problem."""
    try:
        files = read_marker(tag_dir).get("files", {})
        mine = [p for n in _share(sorted(files)) if (p := file_problem(tag_dir, n, files[n]))]
    except ConfigError as e:
        mine = [str(e)]
    problems = sorted(p for part in _gathered(mine) for p in part)
    return problems[0] if problems else None


def saved_world_size(tag_dir: Path) -> int | None:
    marker = read_marker(tag_dir)
    if "world_size" in marker:
        return int(marker["world_size"])
    shards = list(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))  # older markers: one per ZeRO rank
    return len(shards) or None


def select_resume_tag(resume: str, ckpt_dir: str, log) -> Path | None:
    """The tag to resume from (a collective), or None to start fresh.

    auto: the newest complete tag that verifies (each skipped one logged with its problem); ConfigError when there
    are complete tags but none verifies (starting over would silently drop the run). An explicit tag that fails
    verification: ConfigError. The tag may have been written at another world size (resume.py converts it).
    """
    if resume == "none":
        return None
    candidates = list(reversed(complete_tags(ckpt_dir))) if resume == "auto" else [Path(resume)]
    if resume != "auto" and not (candidates[0] / MARKER).is_file():
        raise ConfigError(f"train.resume={resume}: not a complete checkpoint (no '{MARKER}' marker)")
    if resume != "auto" and candidates[0].name.endswith(UNIVERSAL):
        raise ConfigError(f"train.resume={resume}: a universal conversion; resume from its tag "
                          f"{candidates[0].name[:-len(UNIVERSAL)]} (it is converted when the world size differs)")
    chosen, skipped = None, []
    for tag in candidates:
        problem = verify(tag)
        if problem is None:
            chosen = tag
            break
        if resume != "auto":
            raise AgreedConfigError(f"train.resume={resume}: checkpoint fails verification: {problem}")
        log(f"skipping checkpoint {tag}: {problem}")
        skipped.append(tag)
    if chosen is None and skipped:
        raise AgreedConfigError(f"train.resume=auto: none of the {len(skipped)} complete checkpoints in {ckpt_dir} "
                                "verifies (see above); remove them to start over")
    return chosen


def load_checkpoint(engine, tag_dir: str | Path) -> dict:
    tag_dir = Path(tag_dir)
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise RuntimeError(f"checkpoint {tag_dir}: DeepSpeed could not load it")
    return client_state or {}
