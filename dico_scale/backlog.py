"""What the tracker could not send: one JSON record a line in <output_dir>/mlflow_backlog.jsonl, replayed to MLflow
while the run lives (tracking.py's sender) or afterwards (`python -m dico_scale.tracking sync RUN_DIR`).

A record is what one tracker call asked for, with its run id, store URI and the original metric steps and times:
{"op": "batch"|"text"|"dict"|"end", "run_id", "uri", ...}. Replaying is idempotent (MLflow keeps one copy of a
metric with the same key, step, time and value; a param logged again with its value is accepted), so a record sent
twice (a crash between the send and the clearing) does no harm.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

NAME = "mlflow_backlog.jsonl"


class Backlog:
    """Appends and replays under one lock: the training thread spills here when the queue is full, the sender when
    the server does not answer."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / NAME
        self.lost = 0  # records that could not even be written here (disk full, folder gone)
        self._lock = threading.RLock()  # reentrant: a signal handler may spill while the main thread appends
        self._end_line()

    def _end_line(self) -> None:
        """A line cut short by a crash would swallow the next record appended to it: end it (it is skipped)."""
        try:
            with open(self.path, "rb+") as f:
                if f.seek(0, os.SEEK_END) == 0:
                    return
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        except OSError:
            pass

    def append(self, record: dict) -> None:
        """Never raises: a tracker must not stop the run, so a record that cannot be written is counted and lost."""
        try:
            with self._lock, open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except (OSError, TypeError, ValueError) as e:
            self.lost += 1
            if self.lost == 1:
                print(f"dico_scale: warning: tracking: cannot keep a record in {self.path} ({e}); records are lost",
                      file=sys.stderr, flush=True)

    def records(self) -> list[dict]:
        """The pending records in order; a line cut short by a crash mid-write is dropped."""
        with self._lock:
            return _read(self.path)

    def __len__(self) -> int:
        return len(self.records())

    def drop_first(self, n: int) -> None:
        """Removes the first n records (sent), keeping anything appended meanwhile; the file goes when empty."""
        with self._lock:
            rest = _read(self.path)[n:]
            if not rest:
                self.path.unlink(missing_ok=True)
                return
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rest))
            os.replace(tmp, self.path)

    def replay(self, send) -> tuple[int, int]:
        """send(record) for each pending record in order until one fails (it raises); the sent ones are removed.
        (sent, left); the failure, if any, is re-raised after the clearing."""
        records, sent = self.records(), 0
        try:
            for record in records:
                send(record)
                sent += 1
        finally:
            if sent:
                self.drop_first(sent)
        return sent, len(records) - sent


def _read(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
