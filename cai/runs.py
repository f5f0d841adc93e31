"""A run directory: every path in it, its name, its lock, the start of a stage in it, and shards. Torch-free.

```
<runs_dir>/<run>/
  .lock                         the run lock (flock; see RunLock)
  config.<stage>.yaml           the resolved config of the last start of each stage
  constitution.yaml (+ .sha256) the constitution exactly as loaded
  metrics.jsonl                 namespaced metrics of every stage (cai.store.Metrics)
  sl/  steps.jsonl chains.jsonl sft.jsonl plans/ shards/<i>-of-<n>/ checkpoints/ model/ summary.json
  rl/  steps.jsonl plans/ comparisons.jsonl checkpoints/ round-<r>/{comparisons.jsonl, label_diagnostics.json,
       pm/, policy/, ppo/<key>/} dpo/{comparisons.jsonl, policy/, summary.json} summary.json
  human/ labels.jsonl .lock     the labeling page's events (cai.label)
```
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cai.config import to_yaml
from cai.errors import CaiError
from cai.io import write_atomic
from cai.launch import is_main
from cai.paths import resolve_path
from cai.store import Metrics


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run directory (see the module docstring for the tree)."""

    root: Path

    @classmethod
    def of(cls, cfg) -> "RunPaths":
        """<runs_dir>/<run>, with runs_dir relative to the working directory."""
        return cls(run_dir_for(cfg))

    # run level
    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def config(self, stage: str) -> Path:
        return self.root / f"config.{stage}.yaml"

    # stage=sl
    @property
    def sl(self) -> Path:
        return self.root / "sl"

    @property
    def sl_steps(self) -> Path:
        return self.sl / "steps.jsonl"

    @property
    def sl_chains(self) -> Path:
        return self.sl / "chains.jsonl"

    @property
    def sl_sft(self) -> Path:
        return self.sl / "sft.jsonl"

    @property
    def sl_model(self) -> Path:
        return self.sl / "model"

    @property
    def sl_shards(self) -> Path:
        return self.sl / "shards"

    def sl_shard(self, i: int, n: int) -> Path:
        return self.sl_shards / f"{i}-of-{n}"

    # stage=rl and stage=dpo
    @property
    def rl(self) -> Path:
        return self.root / "rl"

    @property
    def rl_steps(self) -> Path:
        return self.rl / "steps.jsonl"

    @property
    def rl_plans(self) -> Path:
        return self.rl / "plans"

    @property
    def rl_checkpoints(self) -> Path:
        return self.rl / "checkpoints"

    @property
    def rl_comparisons(self) -> Path:
        """Every round's comparisons so far: what the latest PM was trained on."""
        return self.rl / "comparisons.jsonl"

    def round(self, r: int) -> Path:
        return self.rl / f"round-{r}"

    def rounds(self) -> list[Path]:
        """The round directories present, in round order."""
        found = [p for p in self.rl.glob("round-*") if p.name.split("-")[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    @property
    def dpo(self) -> Path:
        return self.rl / "dpo"

    # the labeling page
    @property
    def human(self) -> Path:
        return self.root / "human"

    @property
    def labels(self) -> Path:
        return self.human / "labels.jsonl"


def run_dir_for(cfg) -> Path:
    """<runs_dir>/<run>, with runs_dir relative to the working directory."""
    if not cfg.run or "/" in cfg.run or cfg.run.startswith("."):
        raise CaiError(f"run={cfg.run!r}: expected a plain name (letters, digits, -, _)")
    return Path(cfg.runs_dir).expanduser() / cfg.run


class RunLock:
    """An exclusive lock on a run directory (flock: the kernel drops it when the holder dies, even by SIGKILL).

    Under `accelerate launch` the main process holds it for all the processes of the run (cai.launch).
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        if not is_main():
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CaiError(f"{self.path.parent}: run is in use by pid {holder}; wait for it, or pick another run=NAME") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
                raise CaiError(f"{self.path.parent}: this file system cannot lock files (flock: {e.strerror}); put "
                               "runs_dir on a local disk") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def open_metrics(run_dir: Path, stage: str, report_to: str) -> Metrics:
    """The run's metrics log; with report_to=tensorboard also TensorBoard scalars under <run>/tensorboard/."""
    if report_to not in ("none", "tensorboard"):
        raise CaiError(f"report_to={report_to}: expected none or tensorboard")
    return Metrics(run_dir / "metrics.jsonl", stage, run_dir / "tensorboard" if report_to == "tensorboard" else None)


def snapshot_constitution(run_dir: Path, constitution) -> None:
    """Copy the constitution into the run, exactly the bytes that were loaded (checked by hash)."""
    data = resolve_path(constitution.path).read_bytes()
    if hashlib.sha256(data).hexdigest() != constitution.sha:
        raise CaiError(f"{constitution.path}: changed while the stage was starting; run it again")
    write_atomic(run_dir / "constitution.yaml", data.decode("utf-8"))
    write_atomic(run_dir / "constitution.sha256", constitution.sha + "\n")


def start_run(run_dir: Path, cfg, constitution) -> Metrics:
    """Inside the run lock: the resolved config, the constitution snapshot, and the metrics log. Launched: the
    main process writes them; the others get a metrics log that writes nothing (cai.store.Metrics)."""
    if not is_main():
        return open_metrics(run_dir, cfg.stage, "none")
    write_atomic(run_dir / f"config.{cfg.stage}.yaml", to_yaml(cfg))
    snapshot_constitution(run_dir, constitution)
    return open_metrics(run_dir, cfg.stage, cfg.report_to)


def in_shard(text: str, i: int, n: int) -> bool:
    """A prompt's shard depends on its text only, so every process agrees without talking to the others."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % n == i
