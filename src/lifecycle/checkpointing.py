"""Checkpoint files that are never half-written, and a clear error when the disk is full.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives in the
system temp folder; committing it is `shutil.move`, a copy when that folder is on another filesystem
(the usual case on clusters: local /tmp, shared checkpoint storage). A kill during that copy leaves a
truncated `last.ckpt`, and a full /tmp fails runs whose checkpoint disk has room. `AtomicCheckpointIO`
writes beside the final name, syncs, and renames, which POSIX makes atomic.
"""

import errno
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME

from .errors import CheckpointWriteError

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
log = logging.getLogger(__name__)
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"  # Lightning's SLURM requeue checkpoints, in the run directory



def staging_path(path: Path) -> Path:
    """Where a checkpoint is written before it is renamed to `path`."""
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def write_errors(path: Path, staging: Path):
    """Turn an OSError while writing `path` into a CheckpointWriteError saying what is kept; drop `staging`."""
    try:
        yield
    except OSError as e:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        reason = "the disk is full" if e.errno in FULL else (e.strerror or str(e))
        kept = f"the previous checkpoint {path} is intact" if path.exists() else "no earlier checkpoint is affected"
        raise CheckpointWriteError(e.errno, f"could not write checkpoint {path}: {reason} ({e}); {kept}") from e


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to `.<name>.tmp` in the checkpoint's folder, fsync, rename over the final name."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_path(path)
        with write_errors(path, staging):
            with open(staging, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staging, path)
            fsync_dir(path.parent)

    def remove_checkpoint(self, path) -> None:
        """Also drops what a killed write of `path` left behind."""
        super().remove_checkpoint(path)
        if "://" not in str(path):
            staging_path(Path(path)).unlink(missing_ok=True)


def read_checkpoint(path: Path) -> dict:
    """A resumable checkpoint's contents (a sharded folder's: its meta.pt, without the weights), memory-mapped.
    Raises ValueError saying why a file is not one (torn, unreadable, unsafe to load, or weights only)."""
    sharded = _is_sharded_checkpoint(path)
    try:
        ckpt = torch.load(path / _METADATA_FILENAME if sharded else path, map_location="cpu", mmap=not sharded,
                          weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever a torn or foreign file raises, it cannot be resumed
        raise ValueError(f"{path}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    if not isinstance(ckpt, dict) or "loops" not in ckpt or ("optimizer_states" not in ckpt and not sharded):
        raise ValueError(f"{path}: not a full training checkpoint (weights only?)")
    return ckpt


def checkpoint_step(path: Path) -> int:
    """The optimizer step a resumable checkpoint holds (ValueError: see `read_checkpoint`)."""
    return read_checkpoint(path)["global_step"]


def checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint a run directory may hold: `checkpoints/*.ckpt` (last, step, best) and Lightning's SLURM
    requeue checkpoints `hpc_ckpt_<n>.ckpt`."""
    return [p for p in [*Path(run_dir, "checkpoints").glob("*.ckpt"), *Path(run_dir).glob(HPC_CHECKPOINTS)]
            if not p.name.startswith(".")]


def newest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """(path, step) of the run's resumable checkpoint with the highest step (the newer file among equals); None
    when the run has none. A file that cannot be resumed is skipped with a warning; when every one is such a
    file, ValueError (starting over would silently discard the run)."""
    found, bad = [], []
    for path in checkpoints(run_dir):
        try:
            found.append((checkpoint_step(path), path.stat().st_mtime, path))
        except ValueError as e:
            bad.append(str(e))
    if bad and not found:
        raise ValueError(f"no checkpoint in {run_dir} can be resumed ({'; '.join(bad)})")
    for reason in bad:
        log.warning("trainer.resume: skipping %s", reason)
    if not found:
        return None
    step, _, path = max(found, key=lambda f: f[:2])
    return path, step


def remove_hpc_checkpoints(run_dir: Path, keep: Path | None = None) -> None:
    """Drop the SLURM requeue checkpoints but `keep`: the run has resumed from a newer one, or saved one."""
    for path in Path(run_dir).glob(HPC_CHECKPOINTS):
        if path != keep:
            path.unlink(missing_ok=True)
