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

import io
import itertools
import json
import logging
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from hydra.utils import instantiate
from tqdm import tqdm
from webdataset.tariterators import tarfile_samples

from ..errors import ConfigError
from ..models import build_bundle
from .shards import CACHE_KEYS, decode_sample, list_shards, resize_clip

log = logging.getLogger(__name__)
MANIFEST = "cache.json"
DTYPES = {"float32": np.float32, "float16": np.float16}


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


def _clips(urls: list[str], frames: int, resolution: int, stats: dict, caption_key: str = "caption"):
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


@torch.no_grad()
def write(cfg) -> dict:
    """`stage=latent_cache`: encode `data.shards` at `stage.frames` x `stage.resolution` into `stage.out`."""
    s, out = cfg.stage, Path(cfg.stage.out)
    if read_manifest(cfg.data.shards) is not None:
        raise ConfigError(f"data.shards: {cfg.data.shards} is already a latent cache; point it at the videos")
    if (done := read_manifest(out)) is not None:
        log.info("latent cache %s exists (%d clips): nothing to do", out, done["samples"])
        return {k: done[k] for k in ("samples", "skipped")}
    if out.exists():
        raise ConfigError(f"stage.out: {out} exists and is not a latent cache (no {MANIFEST}); choose a new folder")
    if cfg.data.generate is not None and not Path(cfg.data.shards).exists():  # the embedded default's videos
        instantiate(cfg.data.generate)
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    L.seed_everything(cfg.seed)  # a bundle built from configs gets the weights training will build
    bundle = build_bundle(cfg.model).to(device).eval()
    if bundle.text_encoder is None:
        raise ConfigError("model: the latent cache is for text-to-video models (this one has no text encoder)")
    staging = out.with_name(f".{out.name}.tmp")  # renamed to `out` once complete: a crash leaves no half cache
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dtype, stats = DTYPES[s.dtype], {"samples": 0, "skipped": 0}
    clips = _clips(list_shards(cfg.data.shards), s.frames, s.resolution, stats, cfg.data.caption_key)
    with wds.ShardWriter(str(staging / "shard-%06d.tar"), maxcount=s.samples_per_shard, verbose=0) as sink, \
            tqdm(desc="latent cache", unit="clip") as progress:
        while batch := list(itertools.islice(clips, s.batch_size)):
            keys, videos, captions, metas = zip(*batch)
            mean, std = bundle.encode_posterior(torch.stack(videos).to(device))
            hidden, pooled = bundle.encode_text(list(captions))
            for i, key in enumerate(keys):
                arrays = [mean[i], None if bundle.vae is None else std[i], hidden[i], pooled[i]]
                record = {"__key__": key, "json": json.dumps(metas[i]).encode()}
                for name, a in zip(CACHE_KEYS.values(), arrays):
                    if a is not None:
                        buffer = io.BytesIO()
                        np.save(buffer, a.float().cpu().numpy().astype(dtype))
                        record[name] = buffer.getvalue()
                sink.write(record)
            stats["samples"] += len(keys)
            progress.update(len(keys))
    if not stats["samples"]:
        raise ValueError(f"data.shards: no readable clip in {cfg.data.shards} ({stats['skipped']} corrupt)")
    manifest = {"frames": s.frames, "resolution": s.resolution,
                "latent_shape": list(bundle.latent_shape(s.frames, s.resolution)),
                "text_shape": list(hidden.shape[1:]), "dtype": s.dtype,
                "model": cfg.model.get("pretrained") or "model config", "source": cfg.data.shards, **stats}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    staging.rename(out)
    log.info("latent cache %s: %d clips (%d corrupt skipped)", out, stats["samples"], stats["skipped"])
    return stats
