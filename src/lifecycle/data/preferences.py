"""Preference pairs as webdataset shards: writing, reading, a resumable training stream, Pick-a-Pic import.

A pair folder holds `pairs-000000.tar`, ... and a `dataset.json` manifest (`pairs`, `frames`,
`resolution`, `source`, `reward`, `shards`, plus whatever the writer records). One sample per
pair, key `%08d`: `json` {prompt, chosen_score, rejected_score, scores, source} and
`chosen.npy` / `rejected.npy`, uint8 (F, H, W, 3) (an image is F = 1).

The train/validation split is a fixed function of the sample key (:func:`held_out`), so every
stage that reads a pair folder holds out the same pairs.
"""

import base64
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, get_worker_info
from webdataset.tariterators import tarfile_samples

from ..signals import worker_signals
from .curriculum import Curriculum, Phase
from .shards import CurriculumStream, list_shards, resize_clip

log = logging.getLogger(__name__)
MANIFEST = "dataset.json"
SPLITS = ("train", "val")


def held_out(key: str, val_fraction: float) -> bool:
    """Whether pair `key` is in the validation split: a hash of the key below `val_fraction`."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def in_split(key: str, split: str | None, val_fraction: float) -> bool:
    """`split` None keeps every pair; "train" / "val" keep one side of :func:`held_out`."""
    if split is None:
        return True
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return held_out(key, val_fraction) == (split == "val")


def _npy(video: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, video)
    return buf.getvalue()


def _check_video(video, what: str) -> np.ndarray:
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0:
        raise ValueError(f"{what}: expected a uint8 (F, H, W, 3) array, got {video.dtype} {video.shape}")
    return video


def write_pairs(out_dir: str | os.PathLike, pairs: Iterable[dict], shard_size: int = 256,
                manifest: dict | None = None) -> list[str]:
    """Write `pairs` as shards plus `dataset.json` into `out_dir`, which must not exist yet; returns shard paths.

    Each pair is {prompt, chosen, rejected (uint8 (F, H, W, 3), the same shape for every pair),
    chosen_score, rejected_score, scores, source}; the scores may be missing (None). The folder
    is built beside `out_dir` and renamed into place, so `out_dir` is complete or absent.
    `manifest` entries are added to dataset.json after the last pair is written, so a generator
    may fill in counts as it goes.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; pairs are written into a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        names, count, shape, sources = [], 0, None, set()
        sink = None
        for pair in pairs:
            if count % shard_size == 0:
                if sink is not None:
                    sink.close()
                names.append(f"pairs-{len(names):06d}.tar")
                sink = wds.TarWriter(str(staging / names[-1]), mtime=0)
            chosen = _check_video(pair["chosen"], f"pair {count} chosen")
            rejected = _check_video(pair["rejected"], f"pair {count} rejected")
            shape = shape or chosen.shape
            if chosen.shape != shape or rejected.shape != shape:
                raise ValueError(f"pair {count}: chosen {chosen.shape} / rejected {rejected.shape}, expected the first "
                                 f"pair's {shape} (a pair folder holds one frame count and resolution)")
            source = pair.get("source", "sampled")
            sources.add(source)
            meta = {"prompt": str(pair["prompt"]), "source": source,
                    **{k: pair.get(k) for k in ("chosen_score", "rejected_score", "scores")}}
            sink.write({"__key__": f"{count:08d}", "json": meta, "chosen.npy": _npy(chosen),
                        "rejected.npy": _npy(rejected)})
            count += 1
        if sink is not None:
            sink.close()
        if not count:
            raise ValueError(f"{out_dir}: no pairs to write")
        frames, height, width = shape[:3]
        info = {"pairs": count, "frames": frames, "resolution": height if height == width else [height, width],
                "source": sources.pop() if len(sources) == 1 else sorted(sources), "reward": None,
                **(manifest or {}), "shards": names}
        (staging / MANIFEST).write_text(json.dumps(info, indent=2, default=str))
        staging.chmod(0o755)  # mkdtemp creates it private
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return [str(out_dir / n) for n in names]


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The `dataset.json` of a complete pair folder, else None."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def decode_pair(sample: dict) -> dict:
    """A raw webdataset sample -> {key, prompt, chosen, rejected, chosen_score, rejected_score, scores, source}."""
    key = sample.get("__key__")
    for part in ("json", "chosen.npy", "rejected.npy"):
        if part not in sample:
            raise ValueError(f"pair {key}: no {part}")
    meta = json.loads(sample["json"])
    if not meta.get("prompt"):
        raise ValueError(f"pair {key}: no prompt")
    chosen = _check_video(np.load(io.BytesIO(sample["chosen.npy"])), f"pair {key} chosen")
    rejected = _check_video(np.load(io.BytesIO(sample["rejected.npy"])), f"pair {key} rejected")
    if chosen.shape != rejected.shape:
        raise ValueError(f"pair {key}: chosen {chosen.shape} and rejected {rejected.shape} differ")
    return {"key": key, "prompt": meta["prompt"], "chosen": chosen, "rejected": rejected,
            "chosen_score": meta.get("chosen_score"), "rejected_score": meta.get("rejected_score"),
            "scores": meta.get("scores"), "source": meta.get("source")}


class PairReader:
    """One pass over the pairs of a folder / glob / brace pattern / list of shards, in order.

    Corrupt samples are skipped and counted in `skipped`; `split` keeps one side of the
    train/validation split (:func:`in_split`).
    """

    def __init__(self, source, split: str | None = None, val_fraction: float = 0.0):
        self.urls = list(source) if isinstance(source, (list, tuple)) else list_shards(str(source), "pairs")
        self.split, self.val_fraction = split, val_fraction
        in_split("", split, val_fraction)  # rejects an unknown split now rather than mid-iteration
        self.skipped = 0

    def _on_error(self, exc: Exception) -> bool:
        self.skipped += 1
        log.warning("skipping corrupt pair (%d so far): %s", self.skipped, exc)
        return True

    def __iter__(self) -> Iterator[dict]:
        for sample in tarfile_samples(({"url": u} for u in self.urls), handler=self._on_error):
            if not in_split(sample.get("__key__", ""), self.split, self.val_fraction):
                continue
            try:
                yield decode_pair(sample)
            except Exception as exc:  # noqa: BLE001 - any undecodable sample is skipped, never fatal
                self._on_error(exc)


def read_pairs(source, split: str | None = None, val_fraction: float = 0.0) -> PairReader:
    """The pairs of `source` (see :class:`PairReader`; iterate it, read `.skipped` afterwards)."""
    return PairReader(source, split, val_fraction)


def collate_pairs(pairs: list[dict], frames: int, resolution: int) -> dict:
    """Pairs -> {prompts, chosen, rejected (B, frames, 3, resolution, resolution) float in [0, 1]}."""
    return {
        "prompts": [p["prompt"] for p in pairs],
        "chosen": torch.stack([resize_clip(p["chosen"], frames, resolution) for p in pairs]),
        "rejected": torch.stack([resize_clip(p["rejected"], frames, resolution) for p in pairs]),
    }


def pair_batches(source, batch_size: int, frames: int, resolution: int, split: str | None = None,
                 val_fraction: float = 0.0) -> Iterator[dict]:
    """One ordered pass over `source` in :func:`collate_pairs` batches (the last may be smaller)."""
    pairs = iter(read_pairs(source, split, val_fraction))
    while chunk := list(itertools.islice(pairs, batch_size)):
        yield collate_pairs(chunk, frames, resolution)


class PairStream(CurriculumStream):
    """Endless training batches {prompts, chosen, rejected, skipped} of the train split, from `start_batch` on.

    The shard reading, seeded shuffling and worker/rank slots are CurriculumStream's (one phase
    of fixed frames, resolution and batch size), so batch b depends on (seed, b) alone and a
    resumed run sees exactly the batches an uninterrupted one would; each rank reads its own slots.
    """

    def __init__(self, urls, batch_size: int, frames: int, resolution: int, seed: int = 0, start_batch: int = 0,
                 shuffle_buffer: int = 256, rank: int = 0, world_size: int = 1, val_fraction: float = 0.0):
        phase = Phase("pairs", resolution=resolution, frames=frames, batch_size=batch_size, steps=1)
        super().__init__(urls, Curriculum([phase]), seed=seed, start_batch=start_batch, shuffle_buffer=shuffle_buffer,
                         rank=rank, world_size=world_size, select=self._train_split)
        self.batch_size, self.frames, self.resolution = batch_size, frames, resolution
        self.val_fraction = val_fraction

    def _train_split(self, sample: dict) -> bool:
        return not held_out(sample["__key__"], self.val_fraction)

    def _decoded(self, raw):
        for sample in raw:
            try:
                yield decode_pair(sample)
            except Exception as exc:  # noqa: BLE001 - any undecodable sample is skipped, never fatal
                self._on_error(exc)

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots, slot = workers * self.world_size, self.rank * workers + worker
        # batches b = slot, slot + slots, ... come from this slot; skip the samples of those before start_batch
        used = len(range(slot, self.start_batch, slots)) * self.batch_size
        pairs = self._decoded(itertools.islice(self._selected(self._raw(slot, slots)), used, None))
        while True:
            batch = collate_pairs(list(itertools.islice(pairs, self.batch_size)), self.frames, self.resolution)
            yield {**batch, "skipped": self.skipped}


class PairDataModule(L.LightningDataModule):
    """Training batches of a pair folder for a module that counts `batches_seen` (resume is exact)."""

    def __init__(self, pairs: str, batch_size: int, frames: int, resolution: int, seed: int = 0,
                 val_fraction: float = 0.0, num_workers: int = 0, shuffle_buffer: int = 256):
        super().__init__()
        self.pairs, self.batch_size, self.frames, self.resolution = pairs, batch_size, frames, resolution
        self.seed, self.val_fraction = seed, val_fraction
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer

    def setup(self, stage: str) -> None:
        self.urls = list_shards(self.pairs, "pairs")

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        stream = PairStream(self.urls, self.batch_size, self.frames, self.resolution, seed=self.seed,
                            start_batch=trainer.lightning_module.batches_seen, shuffle_buffer=self.shuffle_buffer,
                            rank=trainer.global_rank, world_size=trainer.world_size, val_fraction=self.val_fraction)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                          worker_init_fn=worker_signals)


# -- Pick-a-Pic ------------------------------------------------------------------------------------

def _image(value, base: Path, resolution: int) -> np.ndarray:
    """An image given as a file path (absolute or relative to `base`) or base64 bytes -> uint8 (1, R, R, 3).

    Resized to cover R x R and centre-cropped (PIL: these are data inputs, no gradients needed).
    """
    if not isinstance(value, str):
        raise ValueError(f"image: expected a path or base64 string, got {type(value).__name__}")
    path = Path(value) if os.path.isabs(value) else base / value
    data = path.read_bytes() if path.is_file() else base64.b64decode(value, validate=True)
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.fit(img.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)[None]


def load_pickapic(path: str | os.PathLike, resolution: int, stats: dict | None = None) -> Iterator[dict]:
    """Pairs from a JSON-lines file laid out like Pick-a-Pic v2 (one row per comparison).

    Row: `caption`, `jpg_0` / `jpg_1` (an image path, absolute or relative to the file's folder,
    or the image bytes base64-encoded) and `label_0` / `label_1` (1 for the preferred image;
    0.5 / 0.5 is a tie). Ties are dropped and counted in `stats["ties"]`, unreadable rows in
    `stats["corrupt"]`. Images become 1-frame videos of `resolution` x `resolution`.
    Parquet is not read (that needs pyarrow): export the parquet to JSON lines first.
    """
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: Pick-a-Pic import reads JSON lines (.jsonl)")
    stats = stats if stats is not None else {}
    stats.setdefault("ties", 0)
    stats.setdefault("corrupt", 0)
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                labels = float(row["label_0"]), float(row["label_1"])
                if labels[0] == labels[1]:
                    stats["ties"] += 1
                    continue
                winner = 0 if labels[0] > labels[1] else 1
                images = [_image(row[f"jpg_{i}"], path.parent, resolution) for i in (0, 1)]
                caption = str(row["caption"])
            except Exception as exc:  # noqa: BLE001 - a bad row is skipped and counted, never fatal
                stats["corrupt"] += 1
                log.warning("%s:%d: skipping unreadable row: %s", path, number, exc)
                continue
            yield {"prompt": caption, "chosen": images[winner], "rejected": images[1 - winner],
                   "chosen_score": None, "rejected_score": None, "scores": None, "source": "pickapic"}
