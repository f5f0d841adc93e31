"""Append-only JSONL stores and the metrics log.

A store is a JSONL file of records, each with a `key` (a hash of everything that determines it). Appends
are one `write` per batch followed by flush+fsync, so a killed process loses at most the batch in flight.
A torn last line (no newline, or not JSON) is cut off when the store is opened for writing; a bad line
anywhere else is an error naming the file and line. Restarting = read the keys present, do the rest.
A store is the only writer of its file (the run lock sees to that): when the file changed in any other way
since it was read (another writer appended records, or it was cut), appending is refused with a one-line error
rather than cutting the file back to this store's idea of its end, which would delete the other's records.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from cai.errors import CaiError
from cai.launch import is_main


class JsonlStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self._trackers: list[set] = []
        self._load()

    @contextlib.contextmanager
    def tracking(self):
        """Collect the keys looked up while the block runs (found or not): what a piece of work asked for, so its
        cost can be read from the stored records whether this process computed them or an earlier one did."""
        keys: set[str] = set()
        self._trackers.append(keys)
        try:
            yield keys
        finally:
            self._trackers.remove(keys)

    def _load(self) -> None:
        self._good_end = 0  # bytes of complete records; anything after is a torn write
        self._torn = b""  # the torn tail seen when the file was read (cut at the next append)
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        *complete, self._torn = data.split(b"\n")
        for n, line in enumerate(complete, start=1):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "key" not in rec:
                    raise ValueError("not an object with a 'key'")
            except ValueError as e:
                raise CaiError(f"{self.path}:{n}: corrupt record ({e}); expected one JSON object with a 'key' per line") from None
            self.records[rec["key"]] = rec
            self._good_end += len(line) + 1

    def __contains__(self, key: str) -> bool:
        for t in self._trackers:
            t.add(key)
        return key in self.records

    def __getitem__(self, key: str) -> dict:
        for t in self._trackers:
            t.add(key)
        return self.records[key]

    def get(self, key: str, default=None):
        return self.records.get(key, default)

    def __len__(self) -> int:
        return len(self.records)

    def append(self, records: Iterable[dict]) -> None:
        """Write a batch: one write, flush, fsync. Keys already present are skipped (never duplicated)."""
        fresh = [r for r in records if r["key"] not in self.records]
        if not fresh:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_unchanged()
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh).encode()
        with open(self.path, "ab") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        self._good_end = self._good_end + len(blob)
        self._torn = b""
        for r in fresh:
            self.records[r["key"]] = r


    def _check_unchanged(self) -> None:
        """Cut the torn tail seen on reading (a killed writer's); refuse when anything else changed the file."""
        size = self.path.stat().st_size if self.path.exists() else 0
        if size == self._good_end:
            return
        with open(self.path, "r+b") as f:
            f.seek(self._good_end)
            tail = f.read(len(self._torn) + 1)
            if self._torn and tail == self._torn:  # exactly the torn tail read at open: nobody else wrote
                f.truncate(self._good_end)
                self._torn = b""
                return
        raise CaiError(f"{self.path}: changed by another writer since it was read ({size} bytes, expected "
                       f"{self._good_end + len(self._torn)}); refusing to append (is another process using this "
                       f"run?); rerun to pick up its records")


class Metrics:
    """Namespaced metrics (`sl/train/loss`, `rl/ppo/kl`) appended to <run>/metrics.jsonl.

    With `tensorboard_dir`, numeric values are also written as TensorBoard scalars (needs the `tensorboard`
    package: `pip install -e .[tensorboard]`). Under `accelerate launch` only the main process writes.
    """

    def __init__(self, path: Path, stage: str, tensorboard_dir: Path | None = None):
        self.path = path
        self.stage = stage
        self.writer = None
        self.enabled = is_main()
        if self.enabled:
            self._repair_torn_tail()
        if tensorboard_dir is not None and self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise CaiError("report_to=tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(tensorboard_dir))

    def _repair_torn_tail(self) -> None:
        """A writer killed mid-line leaves a last line without its newline; cut it, as JsonlStore does, so the next
        record does not join it into one corrupt line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), "stage": self.stage, "step": step,
               **{(k if "/" in k else f"{self.stage}/{k}"): v for k, v in metrics.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            for k, v in rec.items():
                if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(k, v, global_step=step)
            self.writer.flush()
