"""Input media: list a folder of files or a set of shards as units of work, read and decode each item.

A folder holds video files (mp4, webm, gif, mov, avi, mkv) and images (png, jpg, jpeg, webp, bmp), in any
sub-folder; an item's original caption is its sidecar `.txt` (or a sidecar `.json`'s `caption`), else the
file name (also for an empty sidecar). Shards are webdataset tars whose samples hold one of those media
keys (or `npy` frames) and a `json` caption or `txt`. Units are fixed by the sorted input alone, so every rank and
every re-run agrees.
"""

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from webdataset.tariterators import tarfile_samples

from ..data.shards import list_shards
from ..data.video_io import decode_image

VIDEO_EXTS = ("mp4", "webm", "gif", "mov", "avi", "mkv")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")


@dataclass(frozen=True)
class Unit:
    """One unit of work: a list of files, or one shard."""

    index: int
    files: tuple[str, ...] = ()
    shard: str | None = None


@dataclass
class Item:
    """One input clip: where it came from, its bytes and media type, and its original caption."""

    source: str
    ext: str
    data: bytes
    caption: str


def list_units(spec: str, unit_size: int) -> list[Unit]:
    """A folder -> units of `unit_size` files; a shard spec (folder of tars, glob, brace pattern) -> a unit per shard."""
    path = Path(spec)
    if path.is_dir() and not any(path.glob("*.tar")):
        exts = {f".{e}" for e in (*VIDEO_EXTS, *IMAGE_EXTS)}
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix.lower() in exts and p.is_file())
        if not files:
            raise FileNotFoundError(f"stage.input: no media files ({', '.join(sorted(exts))}) under {spec!r}")
        return [Unit(i, tuple(files[s:s + unit_size])) for i, s in enumerate(range(0, len(files), unit_size))]
    return [Unit(i, shard=url) for i, url in enumerate(list_shards(spec, key="stage.input"))]


def _sidecar_caption(path: Path) -> str:
    txt, meta = path.with_suffix(".txt"), path.with_suffix(".json")
    text = (txt.read_text() if txt.is_file() else
            str(json.loads(meta.read_text()).get("caption", "")) if meta.is_file() else "")
    return text.strip() or path.name


def read_unit(unit: Unit, root: str):
    """The unit's items, in order. A shard sample without media yields an item with empty bytes (it fails
    decoding and is counted, like any corrupt file)."""
    if unit.shard is None:
        for name in unit.files:
            path = Path(root) / name
            yield Item(name, path.suffix.lower().lstrip("."), path.read_bytes(), _sidecar_caption(path))
        return
    for sample in tarfile_samples([{"url": unit.shard}]):
        ext = next((k for k in ("npy", *VIDEO_EXTS, *IMAGE_EXTS) if k in sample), "")
        meta = json.loads(sample["json"]) if "json" in sample else {}
        text = meta.get("caption") or (sample["txt"].decode() if "txt" in sample else "")
        yield Item(f"{os.path.basename(unit.shard)}:{sample['__key__']}", ext, sample.get(ext, b""), text)


def decode(data: bytes, ext: str) -> np.ndarray:
    """Decode and validate media bytes -> uint8 (F, H, W, 3); an image is one frame.

    Raises ValueError for empty, unreadable or truncated input (a video that decodes fewer frames than its
    container declares).
    """
    if not data:
        raise ValueError("empty file")
    if ext == "npy":
        video = np.load(io.BytesIO(data))
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or not video.size:
            raise ValueError(f"npy frames must be uint8 (F, H, W, 3), got {video.dtype} {video.shape}")
        return video
    if ext in IMAGE_EXTS:
        return decode_image(data)
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            declared = container.streams.video[0].frames
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.error.FFmpegError as error:
        raise ValueError(f"unreadable video: {error}") from error
    if not frames:
        raise ValueError("no frames")
    if declared and len(frames) < declared:
        raise ValueError(f"truncated: {len(frames)} of {declared} frames decode")
    if ext == "gif" and not data.rstrip(b"\0").endswith(b";"):  # GIF has no frame count, but a trailer byte
        raise ValueError(f"truncated: no GIF trailer ({len(frames)} frames decode)")
    return np.stack(frames)
