"""A latent cache: a dataset's clips encoded once by the VAE, its captions once by the text encoder.

`python -m lifecycle stage=latent_cache model.pretrained=<bundle> data.shards=<videos> stage.out=<folder>`
writes webdataset shards of the same samples, each holding `latents.npy` (the posterior mean, in
normalized latent units), `std.npy` (its std; absent in pixel space), `hidden.npy` and `pooled.npy`
(the caption's embeddings) and the source's `json` metadata, plus `cache.json` describing them.
Pre-training and SFT read such a folder as `data.shards`: each step then draws its latents from
the stored posterior (as encoding would, with the same per-sample generators) and runs neither the
VAE nor the text encoder. The cache fixes frames, resolution and the encoders, so every curriculum
phase must match it and the text encoder cannot train.
"""

import json
import logging
from pathlib import Path

from webdataset.tariterators import tarfile_samples

from ..errors import ConfigError
from .shards import decode_sample, resize_clip

log = logging.getLogger(__name__)
MANIFEST = "cache.json"


def read_manifest(shards: str) -> dict | None:
    """The cache description of a `data.shards` folder, or None when it holds videos."""
    path = Path(shards) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def check_cache(manifest: dict, bundle, phases, train_text_encoder: bool) -> None:
    """A cache fits a run whose every phase has its frames, resolution and latent shape, and a frozen text encoder."""
    if train_text_encoder:
        raise ConfigError("stage.train_text_encoder: the latent cache holds fixed caption embeddings; set it false")
    for i, p in enumerate(phases):
        if (p.frames, p.resolution) != (manifest["frames"], manifest["resolution"]):
            raise ConfigError(f"stage.curriculum[{i}]: {p.frames} frames at {p.resolution} px, but the latent cache "
                              f"holds {manifest['frames']} frames at {manifest['resolution']} px")
    shape = list(bundle.latent_shape(manifest["frames"], manifest["resolution"]))
    if shape != manifest["latent_shape"]:
        raise ConfigError(f"data.shards: cached latents are {manifest['latent_shape']}, this model's are {shape} "
                          f"(cache written for {manifest['model']})")


def read_clips(urls: list[str], frames: int, resolution: int, stats: dict, caption_key: str = "caption"):
    """(key, clip (frames, 3, R, R), caption, metadata) of every readable sample, in shard order."""
    def skip(exc):
        stats["skipped"] += 1
        log.warning("skipping corrupt sample: %s", exc)
        return True

    for sample in tarfile_samples(({"url": u} for u in urls), handler=skip):
        try:
            video, caption, meta = decode_sample(sample, caption_key)
        except Exception as exc:  # noqa: BLE001 - any undecodable sample is skipped and counted
            skip(exc)
            continue
        yield sample["__key__"], resize_clip(video, frames, resolution), caption, {**meta, "caption": caption}
