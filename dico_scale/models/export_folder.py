"""Folders an export writes (a Hugging Face row's `hf/` beside model.pt, peft's adapter folder): written beside, then
moved in place of the earlier export, never in place of a folder of something else.

An export folder carries a mark (EXPORT_MARK); the export CLI, which writes where the user points it, replaces only a
missing or empty folder or one with that mark, so that `--out /models/model.pt` cannot wipe a `/models/hf/` (the
starting model's folder, say) that is not ours. A training run writes its own output_dir only.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

EXPORT_MARK = "dico_scale_export.json"
RUN_KEYS = ("config", "stage", "step", "mlflow_run_id")  # what an export folder keeps of its run (export_run)


def write_folder(folder: str | Path, write: Callable[[Path], None], what: str, run: dict | None = None) -> None:
    """`write(tmp)` fills a folder beside `folder`; it is marked ours (what it holds: `what`; of `run`, an export's
    fields, the RUN_KEYS that caption and evaluate read back: export_run) and moved in place."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    mark = {"written_by": "dico_scale", "holds": what, **({"run": {k: run.get(k) for k in RUN_KEYS}} if run else {})}
    (tmp / EXPORT_MARK).write_text(json.dumps(mark) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def sidecar(path: str | Path) -> Path:
    """The JSON beside a safetensors export (model.safetensors -> model.json): its run config, stage, step, run id."""
    return Path(path).with_suffix(".json")


def export_run(folder: str | Path) -> dict | None:
    """The run an export folder was written from (write_folder's `run`); None for another folder or an older export."""
    try:
        run = json.loads((Path(folder) / EXPORT_MARK).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if isinstance(run, dict) and isinstance(run.get("config"), str) else None


def foreign_folder(folder: str | Path) -> str | None:
    """Why an export must not replace `folder` (None when it may: missing, empty, or an earlier export)."""
    folder = Path(folder)
    if not folder.exists():
        return None
    if not folder.is_dir():
        return f"{folder} exists and is not a folder"
    if (folder / EXPORT_MARK).is_file() or not any(folder.iterdir()):
        return None
    return (f"{folder} holds files and is not a dico_scale export (no {EXPORT_MARK}): the export would replace it; "
            "move it or export elsewhere")
