"""MLflow run tracking from rank 0 only; a resumed job continues the same run.

The run is created (or resumed) at start; everything logged afterwards goes through a bounded queue to a sender
thread, so a slow or dead tracking server never holds up a step. What cannot be sent (server down, queue full) is
kept in <output_dir>/mlflow_backlog.jsonl (backlog.py) with its original steps and times, retried every
tracking.retry_every_s while the run lives, and sent afterwards with

    python -m dico_scale.tracking sync RUN_DIR [--uri URI]
"""
from __future__ import annotations

import atexit
import os
import queue
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from .backlog import NAME as BACKLOG_NAME, Backlog
from .config import Config, flatten, to_yaml
from .errors import ConfigError, OneLineParser, first_line

_STOP = object()
# MLflow 3 refuses a folder as its store unless told otherwise; its own message says so past the first line
FILE_STORE_HINT = (" (a folder as store: MLflow 3 wants MLFLOW_ALLOW_FILE_STORE=true for it; "
                   "sqlite:///<folder>/mlflow.db needs nothing)")


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


def fail_fast() -> None:
    """MLflow's default is 7 retries with backoff (minutes against a dead server); the sender retries by itself.
    Only where the user has not chosen."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def send(client, record: dict) -> None:
    """One tracker call (a backlog record) to the store; raises when it fails."""
    from mlflow.entities import Metric, Param, RunTag

    op, run_id = record["op"], record["run_id"]
    if op == "batch":
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in record.get("metrics", [])],
                         params=[Param(k, v) for k, v in record.get("params", {}).items()],
                         tags=[RunTag(k, v) for k, v in record.get("tags", {}).items()])
    elif op == "text":
        client.log_text(run_id, record["text"], record["file"])
    elif op == "dict":
        client.log_dict(run_id, record["obj"], record["file"])
    elif op == "end":
        client.set_terminated(run_id, status=record["status"], end_time=record["time"])
    else:
        raise ValueError(f"unknown backlog record '{op}'")


def _say(line: str) -> None:
    print(f"dico_scale: {line}", file=sys.stderr, flush=True)


class Sender(threading.Thread):
    """Sends queued records in order; while the store fails, appends them to the backlog and retries that every
    retry_every_s. One line when the store goes away, one when it is back."""

    def __init__(self, client, uri: str, backlog: Backlog, queue_size: int, retry_every_s: float,
                 finish_wait_s: float):
        super().__init__(daemon=True, name="mlflow-sender")
        self.client, self.uri, self.backlog, self.retry_every_s = client, uri, backlog, retry_every_s
        self.finish_wait_s = finish_wait_s
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.down, self.next_retry, self.in_flight, self.closed = False, 0.0, None, False

    def run(self) -> None:
        while True:
            try:
                record = self.queue.get(timeout=1.0)
            except queue.Empty:
                record = None
            if record is _STOP:
                self._retry(force=True)  # a last try before the run ends
                return
            if record is not None:
                self._handle(record)
            self._retry()

    def _handle(self, record: dict) -> None:
        if self.down or self.backlog.path.exists():  # behind the backlog: keep the order
            self.backlog.append(record)
            return
        self.in_flight = record
        try:
            send(self.client, record)
        except Exception as e:  # noqa: BLE001 - any failure of the store: keep the record, train on
            self.backlog.append(record)
            self._went_down(e)
        finally:
            self.in_flight = None

    def _retry(self, force: bool = False) -> None:
        if not self.backlog.path.exists() or (time.monotonic() < self.next_retry and not force):
            return
        try:
            sent, _ = self.backlog.replay(lambda r: send(self.client, r))
        except Exception as e:  # noqa: BLE001
            self._went_down(e)
            return
        if self.down:
            _say(f"tracking: {self.uri} is back; sent the {sent} records kept meanwhile")
            self.down = False

    def _went_down(self, e: BaseException) -> None:
        self.next_retry = time.monotonic() + self.retry_every_s
        if not self.down:
            self.down = True
            _say(f"warning: tracking: {self.uri} does not answer ({first_line(e)}); training goes on, the records "
                 f"are kept in {self.backlog.path} and retried every {self.retry_every_s:g} s")

    def put(self, record: dict) -> None:
        """Never blocks: a full queue (a slow store) spills to the backlog."""
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.backlog.append(record)

    def close(self) -> None:
        """Waits up to finish_wait_s in all for the queue to be sent; what is left goes to the backlog. Once."""
        if self.closed:
            return
        self.closed = True
        deadline = time.monotonic() + self.finish_wait_s
        try:
            self.queue.put(_STOP, timeout=self.finish_wait_s)  # a full queue: the sender is stuck on a request
            self.join(max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        if self.is_alive():
            self.spill()

    def spill(self) -> None:
        """What is queued, and the record being sent, to the backlog at once, without the network (the process is
        about to end). The record being sent may arrive twice: replaying is idempotent."""
        left = [self.in_flight] if self.in_flight else []
        while True:
            try:
                left.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for record in left:
            if record is not _STOP:
                self.backlog.append(record)


def set_aside(run_dir: str, run_id: str) -> str:
    """Moves a backlog of the run `run_id` into <run_dir>/mlflow_backlog_<run_id>/, where `sync` sends it to the store
    it names, so that the new run's records do not queue behind records the new store refuses; a note saying so."""
    backlog = Path(run_dir) / BACKLOG_NAME
    if not backlog.exists():
        return ""
    aside = Path(run_dir) / f"mlflow_backlog_{run_id}"
    aside.mkdir(exist_ok=True)
    backlog.rename(aside / BACKLOG_NAME)
    return f"; what that run had not received yet is kept for it: python -m dico_scale.tracking sync {aside}"


class Tracker:
    """No-op off rank 0 or when disabled, so the training loop never branches on the rank."""

    def __init__(self, cfg: Config, rank: int, resume_run_id: str | None = None, forked_from: dict | None = None):
        self.run_id, self.resumed = None, False  # resumed: logging on to the checkpoint's run (its params are there)
        self.active = cfg.tracking.enabled and rank == 0
        if not self.active:
            return
        self.uri = uri = tracking_uri(cfg)
        try:
            self.resumed = self._start_run(cfg, resume_run_id, forked_from or {})
        except Exception as e:  # noqa: BLE001 - a store MLflow refuses (an unknown scheme, a file store, ...)
            hint = FILE_STORE_HINT if urlparse(uri).scheme in ("", "file") else ""
            problem = f"tracking store '{uri}' cannot be used: {first_line(e, 160)}{hint}"
            if cfg.tracking.required:
                raise ConfigError(f"{problem} (tracking.required=false trains without it)") from None
            _say(f"warning: {problem}; training without tracking (tracking.required=false)")
            self.active = False
            return
        fail_fast()  # after the run exists: creating it may retry as MLflow likes, logging must not wait
        self.backlog = Backlog(cfg.train.output_dir)
        self.sender = Sender(self.client, uri, self.backlog, cfg.tracking.queue_size, cfg.tracking.retry_every_s,
                             cfg.tracking.finish_wait_s)
        self.sender.start()  # first sends a backlog left by an earlier segment of the run
        atexit.register(self.sender.close)  # a process that ends without finish() still sends (or keeps) its records
        if not self.resumed:
            self.log_params(flatten(cfg))
            self.log_text(to_yaml(cfg), "config.yaml")

    def _start_run(self, cfg: Config, resume_run_id: str | None, forked_from: dict) -> bool:
        """Opens the store and the run: the checkpoint's (True), or a new one (`forked_from`: its tags naming the run
        and checkpoint it branches from)."""
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        exp_id = experiment_id(self.client, cfg.tracking.experiment, self.uri)
        if resume_run_id and not self._has_run(resume_run_id):  # resumed against another store (a new cluster)
            _say(f"warning: tracking: the checkpoint's MLflow run {resume_run_id} is not in {self.uri} (another "
                 f"store?); this part of the run logs to a new run{set_aside(cfg.train.output_dir, resume_run_id)}")
            resume_run_id = None
        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            return True
        name = cfg.tracking.run_name or f"{cfg.train.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        tags = {"stage": cfg.train.stage, **forked_from}
        if cfg.tracking.parent_run_id:  # how the MLflow UI nests runs (dico_scale.compare's children)
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        self.run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        return False

    def _has_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def _put(self, op: str, **fields) -> None:
        if self.active:
            self.sender.put({"op": op, "run_id": self.run_id, "uri": self.uri, **fields})

    def log_params(self, params: dict) -> None:
        items = [(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self._put("batch", params=dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            now = int(time.time() * 1000)
            self._put("batch", metrics=[[k, float(v), now, step] for k, v in metrics.items()])

    def set_tags(self, tags: dict) -> None:
        if tags:
            self._put("batch", tags={k: str(v) for k, v in tags.items()})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put("text", text=text, file=artifact_file)

    def log_dict(self, obj, artifact_file: str) -> None:
        self._put("dict", obj=obj, file=artifact_file)

    def spill(self) -> None:
        """For a process that exits at once (Ctrl-C twice, a stop that timed out): keep what is queued on disk."""
        if self.active:
            self.sender.spill()

    def finish(self, status: str = "FINISHED") -> None:
        """Ends the run; what could not be sent stays in the backlog, with one line saying how to send it."""
        if not self.active:
            return
        self._put("end", status=status, time=int(time.time() * 1000))
        self.sender.close()
        left = len(self.backlog)
        if left:
            _say(f"warning: tracking: {left} records could not be sent to {self.uri}; they are kept in "
                 f"{self.backlog.path}: python -m dico_scale.tracking sync {self.backlog.path.parent}")


def start_tracker(cfg: Config, rank: int, resume_run_id: str | None = None, tag=None) -> Tracker:
    """A collective: every rank's Tracker. A store MLflow refuses is found on rank 0 alone, where the run opens it:
    every rank raises its one line together, instead of rank 0 leaving while the others wait for it in the next
    collective (a gloo traceback there). `tag`: the checkpoint resumed; one outside this run's checkpoints/ (another
    folder's, train.resume=<tag>) starts a branch, on a new run tagged with its origin: logging on to the origin's
    run would mix two folders' steps in one history."""
    from .checkpoint import agree, own_tag
    from .errors import AgreedConfigError

    forked_from = None
    if resume_run_id and tag is not None and not own_tag(tag, cfg.train.output_dir):
        forked_from = {"dico_scale.forked_from_run": resume_run_id, "dico_scale.forked_from_checkpoint": str(tag)}
        if rank == 0 and cfg.tracking.enabled:
            _say(f"tracking: {tag} is another folder's checkpoint: this run logs to a new MLflow run (tagged with "
                 f"the run {resume_run_id} it branches from, which is left as it is)")
        resume_run_id = None
    tracker, failure = None, ""
    try:
        tracker = Tracker(cfg, rank, resume_run_id, forked_from)
    except ConfigError as e:
        failure = str(e)
    agree(failure, AgreedConfigError)
    return tracker


def sync(run_dir: str, uri: str | None) -> int:
    """Sends a run folder's backlog; the exit code of the `sync` command."""
    from mlflow.tracking import MlflowClient

    from .exit_codes import CONFIG_ERROR, FAILED, OK

    if not Path(run_dir).is_dir():
        _say(f"tracking sync: '{run_dir}' is not a folder")
        return CONFIG_ERROR
    backlog = Backlog(run_dir)
    records = backlog.records()
    if not records:
        print(f"nothing to send: no records in {backlog.path}")
        return OK
    uri = uri or records[0].get("uri")
    if not uri:
        _say(f"tracking sync: the records in {backlog.path} name no store: pass --uri")
        return CONFIG_ERROR
    fail_fast()
    try:
        client = MlflowClient(tracking_uri=uri)  # a URI MLflow refuses fails here
        sent, _ = backlog.replay(lambda r: send(client, r))
    except Exception as e:  # noqa: BLE001 - one line; the unsent records stay
        _say(f"tracking sync: {uri}: {first_line(e)}; {len(backlog)} records left in {backlog.path}")
        return FAILED
    print(f"sent {sent} records to {uri}; {backlog.path} is cleared")
    return OK


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dico_scale.tracking",
                           description="MLflow tracking tools: send what a run could not.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sync", help="send a run folder's mlflow_backlog.jsonl (what the run could not send)")
    p.add_argument("run_dir", help="the run's train.output_dir")
    p.add_argument("--uri", help="tracking URI (default: the one the run used)")
    args = parser.parse_args(argv)
    return sync(args.run_dir, args.uri)


if __name__ == "__main__":
    from dico_scale.exit_codes import leave

    leave(main())  # without the interpreter's teardown (seconds per process)
