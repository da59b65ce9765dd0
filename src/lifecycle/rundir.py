"""One owner per run directory, and no silent overwrite of a finished run.

Two runs started on one directory both trained, then both crashed in the CSV logger, and re-running a
finished directory without `trainer.resume` silently replaced its export, metrics and `last.ckpt` (leaving
`last-v1.ckpt` and stale step checkpoints beside them). `claim` runs before any work:

- `<run_dir>/.lock` is held with `fcntl.flock` for the life of the process (the kernel releases it when the
  process dies, SIGKILL included) and names its holder (pid and host) for the message a second run gets. A lock
  file left by a killed run is not held: the next run takes it over with a warning naming the old holder.
- a directory holding a run (`export/`, `checkpoints/last.ckpt`, `done.json`) is only continued
  (`trainer.resume=last`) or, with `overwrite=true`, replaced: its checkpoints, requeue checkpoints and done
  marker are removed first; metrics rows are dropped when training starts from step 0, and the export is
  swapped for the new one only once that is complete (`swap_in`).
"""

import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from .checkpointing import HPC_CHECKPOINTS
from .errors import ConfigError

log = logging.getLogger(__name__)
LOCK = ".lock"
RUN_MARKERS = ("export", "checkpoints/last.ckpt", "done.json")  # what a started or finished run leaves


class RunDirLock:
    """An exclusive `fcntl.flock` on `<run_dir>/.lock`, held until `release` (or the process ends)."""

    def __init__(self, run_dir: Path):
        path = Path(run_dir) / LOCK
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ConfigError(f"run_dir: {run_dir} is in use by a running run ({holder}); wait for it to end, "
                              f"or choose another hydra.run.dir") from None
        self.file.seek(0)
        if previous := self.file.read().strip():  # written by a run that did not end cleanly
            log.warning("run_dir: taking over %s from %s, which is no longer running", path, previous)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        """Empty the lock file (a clean end) and unlock it."""
        if not self.file.closed:
            self.file.truncate(0)
            self.file.close()


def recover_export(path: Path) -> None:
    """Put back the old export a kill between `swap_in`'s two renames left aside."""
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        old.rename(path)
        log.warning("%s: restored the previous export (a replacement was interrupted)", path)


def swap_in(staging: Path, path: Path) -> None:
    """Replace the folder `path` by the complete folder `staging`, keeping the old one until the new one is in:
    rename the old one aside to `.<name>.old`, rename the new one in, delete the old one. A kill between the two
    renames leaves no `path` but the old folder whole in `.<name>.old`, which `recover_export` puts back."""
    old = path.with_name(f".{path.name}.old")
    recover_export(path)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    staging.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def started(run_dir: Path) -> list[str]:
    """What in `run_dir` shows that a run already used it."""
    return [m for m in RUN_MARKERS if (Path(run_dir) / m).exists()]


def clear_for_overwrite(run_dir: Path) -> None:
    """What a new run must not find beside its own files: checkpoints (Lightning would add `last-v1.ckpt` and
    keep stale step checkpoints), requeue checkpoints, the done marker and the old result."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for path in [*run_dir.glob(HPC_CHECKPOINTS), run_dir / "done.json", run_dir / "result.json"]:
        path.unlink(missing_ok=True)


def claim(cfg: DictConfig) -> RunDirLock | None:
    """Own `cfg.run_dir` for this run (rank 0 of a multi-process run; the other ranks share its claim): lock it,
    put back an interrupted export replacement, and refuse to start over a run without `overwrite=true`."""
    if rank_zero_only.rank != 0:
        return None
    run_dir = Path(cfg.run_dir)
    lock = RunDirLock(run_dir)
    try:
        recover_export(run_dir / "export")
        if cfg.get("overwrite") and cfg.get("recipe"):
            raise ConfigError(f"overwrite: a recipe continues its run directory (finished stages are skipped); to "
                              f"start it over, delete {run_dir} or choose another hydra.run.dir")
        if cfg.get("overwrite") and cfg.trainer.get("resume"):
            raise ConfigError("overwrite: true starts the run over; it cannot be combined with trainer.resume")
        found = started(run_dir)
        if cfg.get("recipe") or cfg.trainer.get("resume") or not found:
            return lock
        if not cfg.get("overwrite"):
            raise ConfigError(f"run_dir: {run_dir} already holds a run ({', '.join(found)}); continue it with "
                              f"trainer.resume=last, or replace it with overwrite=true")
        log.warning("overwrite=true: replacing the run in %s (its export stays until the new one is written)", run_dir)
        clear_for_overwrite(run_dir)
        return lock
    except BaseException:
        lock.release()
        raise
