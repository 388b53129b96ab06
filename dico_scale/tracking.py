"""MLflow run tracking from rank 0 only; a resumed job continues the same run."""
from __future__ import annotations

import os
import time
from pathlib import Path

from .config import Config, flatten, to_yaml


def tracking_uri(cfg: Config) -> str:
    """Config key, else MLFLOW_TRACKING_URI, else MLflow 3's embedded default: sqlite mlflow.db in the working dir."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created when missing; with a sqlite store its artifacts go beside the database file,
    not into ./mlruns of the working directory."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///"):]).resolve().parent.joinpath("mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


class Tracker:
    """No-op off rank 0 or when disabled, so the training loop never branches on the rank."""

    def __init__(self, cfg: Config, rank: int, resume_run_id: str | None = None):
        self.run_id = None
        self.active = cfg.tracking.enabled and rank == 0
        if not self.active:
            return
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(cfg)
        self.client = MlflowClient(tracking_uri=uri)
        exp_id = experiment_id(self.client, cfg.tracking.experiment, uri)
        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            return
        name = cfg.tracking.run_name or f"{cfg.train.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        tags = {"stage": cfg.train.stage}
        if cfg.tracking.parent_run_id:  # how the MLflow UI nests runs (dico_scale.compare's children)
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        self.run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        self.log_params(flatten(cfg))
        self.log_text(to_yaml(cfg), "config.yaml")

    def log_params(self, params: dict) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict) -> None:
        if not self.active or not tags:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.active:
            self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, obj, artifact_file: str) -> None:
        if self.active:
            self.client.log_dict(self.run_id, obj, artifact_file)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.active:
            self.client.log_artifact(self.run_id, path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self.client.set_terminated(self.run_id, status=status)
