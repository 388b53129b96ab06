"""Checks that run before anything is built, so that a run that cannot work fails in seconds with one line:
an output directory that cannot be written, a tracking server that does not answer."""
from __future__ import annotations

import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .config import Config, ConfigError


def _write_problem(folder) -> str | None:
    """Creates the folder and writes a probe file into it (removed again); why that failed, or None."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as e:
        return str(e.strerror or e)
    return None


def check_output_dir(path: str) -> None:
    if problem := _write_problem(path):
        raise ConfigError(f"train.output_dir '{path}' cannot be created or written: {problem}")


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
    problem = _write_problem(folder)
    return f"cannot write the sqlite store's folder {folder} ({problem})" if problem else None


def check_tracking(cfg: Config, rank: int) -> None:
    """One line and ConfigError when the tracking store is unusable; with tracking.required=false, a warning on
    rank 0 and tracking off instead."""
    if not cfg.tracking.enabled:
        return
    from .tracking import tracking_uri

    uri = tracking_uri(cfg)
    problem = check_tracking_server(uri, cfg.tracking.connect_timeout_s) or check_sqlite_store(uri)
    if problem is None:
        return
    if cfg.tracking.required:
        raise ConfigError(f"tracking server '{uri}' is unusable: {problem} (tracking.required=false trains without it)")
    if rank == 0:
        print(f"dico_scale: warning: tracking server '{uri}' is unusable: {problem}; training without tracking "
              "(tracking.required=false)", file=sys.stderr, flush=True)
    cfg.tracking.enabled = False


def run_preflight(cfg: Config) -> None:
    rank = int(os.environ.get("RANK", "0"))
    check_output_dir(cfg.train.output_dir)
    check_tracking(cfg, rank)
    if cfg.captioner.model == "dico_ref" and cfg.train.stage != "evaluator":
        from .models.dico_ref import check_folder_weights

        check_folder_weights(cfg.captioner.hf_path)  # missing / extra keys named, before any process group
