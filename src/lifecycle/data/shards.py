"""Webdataset shards -> curriculum batches, deterministic and resumable at any batch.

A curriculum phase's `batch_size` is the global batch; each of the world's ranks gets an equal
slice of it. After a start (or resume) at batch s, batch b of a rank comes from DataLoader worker
(b - s) mod workers, since the DataLoader asks its workers in turn. Two ways to split:

- `global`: one seeded sample stream for the whole run; global batch b is the next `batch_size`
  samples of it and rank r takes the r-th slice. Every worker reads every shard but decodes only
  its own samples. The batches do not depend on the number of ranks or workers, so a run on N
  ranks sees what a one-process run with the same global batch sees, and resuming on a different
  world size continues the same stream.
- `rank`: each worker of each rank reads its own subset of the shards (whole shards when there
  are enough, else every slots-th sample; batch b reads slot b mod workers, whichever worker runs
  it). Nothing is read twice: the choice for big datasets.
  The batches depend on the world size and worker count.

`select` keeps a curated subset; `balance` ({key, classes}) draws each class of a metadata field
equally often (`balanced`: a rare class is oversampled). Both act on the undecoded stream before
batch positions are counted, so resuming and the global split stay exact.

Resuming at batch b skips the samples earlier batches used, before any decoding.
"""

import glob
import io
import itertools
import json
import logging
import os
import random
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from ..errors import DataError
from .curriculum import Curriculum
from .video_io import decode_image, decode_video

log = logging.getLogger(__name__)
WARN_FIRST = 10  # skipped samples warned about one by one; after that at 100, 1,000, ... (the count stays exact)
VIDEO_KEYS = ("npy", "mp4", "webm", "gif", "avi", "mov", "mkv")
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp")  # an image is a one-frame clip
CACHE_KEYS = {"latents": "latents.npy", "latents_std": "std.npy", "hidden": "hidden.npy", "pooled": "pooled.npy"}



def list_shards(spec: str, key: str = "data.shards") -> list[str]:
    """A folder of `*.tar`, a glob, or a brace pattern (`shard-{000000..000007}.tar`) -> shard paths."""
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif any(c in spec for c in "*?["):
        urls = sorted(glob.glob(spec))
    else:
        urls = expand_urls(spec)
    missing = [u for u in urls if "://" not in u and not os.path.exists(u)]
    if not urls or missing:
        raise FileNotFoundError(f"{key}: no shards at {spec!r}" + (f" (missing {missing[:3]})" if missing else ""))
    return urls


def _name(sample: dict, member: str = "") -> str:
    """`sample <key>[.member] of <shard>`, for messages."""
    key = f"{sample.get('__key__')}.{member}" if member else sample.get("__key__")
    return f"sample {key}" + (f" of {sample['__url__']}" if "__url__" in sample else "")


def decode_sample(sample: dict, caption_key: str = "caption") -> tuple[np.ndarray | dict, str, dict]:
    """A raw webdataset sample -> (uint8 video (F, H, W, 3), caption, metadata); a latent-cache sample
    (data/latent_cache.py) -> ({latents, [latents_std], hidden, pooled} arrays, caption, metadata).
    The caption is the metadata's `caption_key` (curated shards also keep `original_caption`), else `txt`."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    caption = meta.get(caption_key) or (sample["txt"].decode() if "txt" in sample and caption_key == "caption" else None)
    if not caption:
        raise ValueError(f"{_name(sample)}: no caption ({caption_key!r})")
    if CACHE_KEYS["latents"] in sample:
        return {k: np.load(io.BytesIO(sample[v])) for k, v in CACHE_KEYS.items() if v in sample}, caption, meta
    key = next((k for k in VIDEO_KEYS + IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"{_name(sample)}: no video or image ({'/'.join(VIDEO_KEYS + IMAGE_KEYS)})")
    try:
        video = (np.load(io.BytesIO(sample[key])) if key == "npy" else
                 decode_image(sample[key]) if key in IMAGE_KEYS else decode_video(sample[key]))
    except Exception as e:  # say which sample
        raise ValueError(f"{_name(sample, key)}: {e}") from e
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0:
        raise ValueError(f"{_name(sample)}: bad video shape {video.shape}")
    return as_uint8(video, _name(sample, key)), caption, meta


def as_uint8(video: np.ndarray, name: str) -> np.ndarray:
    """A decoded clip as uint8: uint8 as stored (0..255), float only within [0, 1] (times 255, rounded).

    Anything else is refused rather than guessed: a float clip stored in 0..255, or an integer one, read as the
    other range would train, silently, on near-black or saturated videos."""
    if video.dtype == np.uint8:
        return video
    if not np.issubdtype(video.dtype, np.floating):
        raise ValueError(f"{name}: video dtype {video.dtype}; expected uint8 (0..255) or float (0..1)")
    if not np.isfinite(video).all():
        raise ValueError(f"{name}: NaN or Inf in a float video")
    low, high = float(video.min()), float(video.max())
    if low < 0 or high > 1:
        raise ValueError(f"{name}: float video with values in [{low:.4g}, {high:.4g}]; a float clip must lie in "
                         "[0, 1] (store 0..255 as uint8)")
    return (video * 255).round().astype(np.uint8)


def resize_clip(video: np.ndarray, frames: int, size: int) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (frames, 3, size, size) in [0, 1]: evenly spaced frames, area/bilinear resize."""
    idx = np.linspace(0, video.shape[0] - 1, frames).round().astype(int)
    x = torch.from_numpy(video[idx]).permute(0, 3, 1, 2).float() / 255
    if x.shape[-1] != size or x.shape[-2] != size:
        down = size < min(x.shape[-2:])
        x = F.interpolate(x, size=(size, size), mode="area" if down else "bilinear", align_corners=None if down else False)
    return x.clamp(0, 1)


def balanced(samples, key, classes, rng: random.Random, buffer: int, on_error):
    """Raw samples -> a stream drawing each class (metadata field `key`) equally often.

    Each step draws a class uniformly (among `classes`, else the classes seen so far) and emits its
    oldest queued sample, reading on until there is one. A class queues at most `buffer` samples
    (the oldest dropped). Samples of a class not in `classes` are dropped unused, not counted as
    corrupt; unreadable json or a missing `key` go to `on_error` and are skipped. Raises ValueError
    when a listed class is still unseen after `buffer * 100` reads; ends when `samples` ends.
    """
    samples, queues = iter(samples), {}

    def read(done) -> bool:
        """Queues samples until `done()`; False if `samples` ends first."""
        for reads, sample in enumerate(samples, 1):
            try:
                label = json.loads(sample["json"])[key]
                if not classes or label in classes:
                    queues.setdefault(label, deque(maxlen=buffer)).append(sample)
            except Exception as exc:  # noqa: BLE001 - unreadable metadata: a corrupt sample
                on_error(exc)
            if done():
                return True
            if reads >= buffer * 100 and (missing := [c for c in classes or () if c not in queues]):
                raise ValueError(f"data.balance.classes: no sample of class {missing[0]!r} ({key!r}) "
                                 f"in {reads} samples read")
        return False

    if not classes and not read(lambda: queues):
        return
    while True:
        want = rng.choice(classes or list(queues))
        if not queues.get(want) and not read(lambda: queues.get(want)):  # noqa: B023 - called in this iteration
            return
        yield queues[want].popleft()


SPLITS = ("global", "rank")


class DecodedCache:
    """Decoded samples kept in memory, up to `max_mb` megabytes (per loader worker), keyed by shard and sample key.

    Written here because webdataset caches shard files, not decoded samples: a small dataset read many times (the
    embedded default's 3,700 clips, about 13 times in pre-training) was decoded from mp4 on every read, which kept
    a loader worker on a whole core, half of a two-core machine. Decoding is deterministic, so a cached sample is
    the sample (batches stay bit-identical). It fills until full and then stops taking samples: a dataset larger
    than the budget gains nothing from evictions.
    """

    def __init__(self, max_mb: float):
        self.room, self.items = int(max_mb * 2**20), {}

    @staticmethod
    def _nbytes(item) -> int:
        data = item[0]
        return sum(a.nbytes for a in data.values()) if isinstance(data, dict) else data.nbytes

    def get(self, key):
        return self.items.get(key)

    def put(self, key, item) -> None:
        size = self._nbytes(item)
        if size <= self.room:
            self.room -= size
            self.items[key] = item


class CurriculumStream(IterableDataset):
    """Yields this rank's batches {video (B, F, 3, H, W), caption, phase, skipped} for batch indices
    start_batch, start_batch+1, ...

    Batch b belongs to optimizer step b // accumulate, whose curriculum phase fixes its
    resolution, frame count and (global) batch size. Corrupt samples are skipped and counted;
    `select` (a `Selection`) keeps only a curated subset; `balance` ({key, classes}) draws each
    class equally often, queueing up to `shuffle_buffer` samples per class; decoded samples are kept in a
    `DecodedCache` of `decoded_cache_mb` megabytes (0: off). The stream stops with `DataError` when
    `max_bad_in_a_row` reads in a row fail, when more than `max_bad_share` of its reads (from the 100th) fail,
    or when a whole pass over its shards reads nothing.
    """

    def __init__(self, urls, curriculum: Curriculum, seed: int = 0, start_batch: int = 0, shuffle_buffer: int = 256,
                 accumulate: int = 1, rank: int = 0, world_size: int = 1, select=None, split: str = "global",
                 balance: dict | None = None, caption_key: str = "caption", decoded_cache_mb: float = 0,
                 max_bad_in_a_row: int = 1000, max_bad_share: float = 0.5):
        if split not in SPLITS:
            raise ValueError(f"data.split: {split!r} is not one of {list(SPLITS)}")
        self.urls, self.curriculum, self.seed, self.select = list(urls), curriculum, seed, select
        self.start_batch, self.shuffle_buffer, self.accumulate = start_batch, shuffle_buffer, accumulate
        self.rank, self.world_size, self.split, self.balance = rank, world_size, split, balance
        self.caption_key, self.cache = caption_key, DecodedCache(decoded_cache_mb)
        self.max_bad_in_a_row, self.max_bad_share = max_bad_in_a_row, max_bad_share
        self.skipped = self.reads = self.bad_in_a_row = 0

    def _on_error(self, exc: Exception) -> bool:
        """Count a failed read and go on, until reads keep failing (`DataError`). Warnings are rate-limited."""
        self.skipped += 1
        self.reads += 1
        self.bad_in_a_row += 1
        if self.skipped <= WARN_FIRST or str(self.skipped).rstrip("0") == "1":  # the first few, then powers of ten
            later = " (further ones are counted in data/skipped_samples, warned at 100, 1000, ...)" \
                if self.skipped == WARN_FIRST else ""
            log.warning("skipping corrupt sample (%d so far)%s: %s", self.skipped, later, exc)
        if self.bad_in_a_row >= self.max_bad_in_a_row:
            raise DataError(f"data.max_bad_in_a_row: the last {self.bad_in_a_row} reads of data.shards all failed "
                            f"(the last: {exc})")
        if self.reads >= 100 and self.skipped > self.max_bad_share * self.reads:
            raise DataError(f"data.max_bad_share: {self.skipped} of {self.reads} reads of data.shards failed "
                            f"(the last: {exc})")
        return True

    def _read_ok(self) -> None:
        self.reads += 1
        self.bad_in_a_row = 0

    def _raw(self, slot: int, slots: int):
        """This slot's endless, seeded stream of undecoded samples."""
        for cycle in itertools.count():
            order = list(self.urls)
            random.Random(f"{self.seed}/{cycle}").shuffle(order)
            by_shard = len(order) >= slots  # enough shards: split shards, else split samples
            urls = order[slot::slots] if by_shard else order
            stream = tarfile_samples(({"url": u} for u in urls), handler=self._on_error)
            if not by_shard:
                stream = itertools.islice(stream, slot, None, slots)
            rng = random.Random(f"{self.seed}/{cycle}/{slot}")
            read = 0
            for read, sample in enumerate(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(  # noqa: B007 - counted
                    iter(stream)), 1):
                yield sample
            if not read:  # an empty (or wholly unreadable) set of shards would otherwise be re-read forever
                raise DataError(f"data.shards: a whole pass over {len(urls)} shard(s) read no sample "
                                f"({self.skipped} failed reads so far)")

    def _samples(self, slot: int, slots: int):
        """`_raw`, curated (`select`) and class-balanced (`balance`): the stream whose positions batches count."""
        raw = self._raw(slot, slots)
        if self.select is not None:
            raw = self._selected(raw)
        if self.balance is not None:
            rng = random.Random(f"{self.seed}/balance/{slot}")
            raw = balanced(raw, self.balance["key"], self.balance.get("classes"), rng, self.shuffle_buffer,
                           self._on_error)
        return raw

    def _selected(self, raw):
        for sample in raw:
            try:
                keep = self.select(sample)
            except Exception as exc:  # noqa: BLE001 - unreadable metadata: a corrupt sample
                self._on_error(exc)
                continue
            if keep:
                yield sample

    def _decoded(self, raw):
        for sample in raw:
            key = (sample.get("__url__"), sample.get("__key__"))
            item = self.cache.get(key)
            if item is None:
                try:
                    item = decode_sample(sample, self.caption_key)
                except Exception as exc:  # noqa: BLE001 - any undecodable sample is skipped, never fatal
                    self._on_error(exc)
                    continue
                self.cache.put(key, item)
            self._read_ok()
            yield item

    def _phase(self, b: int) -> int:
        return self.curriculum.index_at(b // self.accumulate)

    def _global_size(self, b: int) -> int:
        return self.curriculum.phases[self._phase(b)].batch_size

    def _rank_size(self, b: int) -> int:
        return self._global_size(b) // self.world_size

    def _rank_batches(self, workers: int, worker: int):
        """(b, samples) for this worker's batches, read from its own slot of the shards."""
        slots, slot = workers * self.world_size, (self.start_batch + worker) % workers  # batch b: slot b mod workers
        raw = self._samples(self.rank * workers + slot, slots)
        used = sum(self._rank_size(b) for b in range(slot, self.start_batch, workers))
        samples = self._decoded(itertools.islice(raw, used, None))
        for b in itertools.count(self.start_batch + worker, workers):
            yield b, list(itertools.islice(samples, self._rank_size(b)))

    def _global_batches(self, workers: int, worker: int):
        """(b, samples) for this worker's batches: rank r's slice of global batch b of the run's one stream."""
        raw = self._samples(0, 1)
        first = self.start_batch + worker
        offset = sum(self._global_size(b) for b in range(first))  # stream position where batch `first` starts
        pos = 0
        for b in itertools.count(first, workers):
            n = self._rank_size(b)
            start = offset + self.rank * n
            for _ in itertools.islice(raw, max(start - pos, 0)):  # other ranks' and workers' samples, undecoded
                pass
            pos = max(pos, start)
            items = []
            while len(items) < n:  # a corrupt sample is replaced by the next one
                pos += 1
                items.extend(self._decoded([next(raw)]))
            yield b, items
            offset += sum(self._global_size(c) for c in range(b, b + workers))

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        split = self._global_batches if self.split == "global" else self._rank_batches
        for b, items in split(workers, worker):
            p = self.curriculum.phases[self._phase(b)]
            if isinstance(items[0][0], dict):  # a latent cache: stored tensors, already at the phase's size
                tensors = {k: torch.from_numpy(np.stack([x[k] for x, _, _ in items])).float() for k in items[0][0]}
            else:
                tensors = {"video": torch.stack([resize_clip(v, p.frames, p.resolution) for v, _, _ in items])}
            yield {**tensors, "caption": [c for _, c, _ in items], "phase": self._phase(b), "skipped": self.skipped}
