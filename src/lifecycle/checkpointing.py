"""Checkpoint files that are never half-written, and a clear error when the disk is full.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives in the
system temp folder; committing it is `shutil.move`, a copy when that folder is on another filesystem
(the usual case on clusters: local /tmp, shared checkpoint storage). A kill during that copy leaves a
truncated `last.ckpt`, and a full /tmp fails runs whose checkpoint disk has room. `AtomicCheckpointIO`
writes beside the final name, syncs, and renames, which POSIX makes atomic.
"""

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one at that path (if any) is intact."""


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
