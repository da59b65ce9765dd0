"""`stage=latent_cache`: encode `data.shards` once with the model's VAE and text encoder into a latent cache
(lifecycle.data.latent_cache describes the format); pre-training and SFT then read it as `data.shards`."""

import io
import itertools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig
from tqdm import tqdm

from ..config import choice
from ..data.latent_cache import MANIFEST, read_clips, read_manifest
from ..data.shards import CACHE_KEYS, list_shards
from ..errors import ConfigError
from ..models import build_bundle
from .base import StageConfig

log = logging.getLogger(__name__)
DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class Config(StageConfig):
    out: str = MISSING  # the cache folder, then data.shards of pre-training / SFT
    frames: int = 8
    resolution: int = 32
    batch_size: int = 32  # clips encoded at once
    samples_per_shard: int = 1000
    dtype: str = "float32"  # float32 | float16: how latents and embeddings are stored

    @classmethod
    def text_to_video_only(cls, stage: DictConfig) -> bool:
        return True

    @classmethod
    def resolutions(cls, stage: DictConfig) -> dict[str, int]:
        return {"stage.resolution": stage.resolution}

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        choice("stage.dtype", cfg.stage.dtype, tuple(DTYPES))
        if read_manifest(cfg.data.shards) is not None:
            raise ConfigError(f"data.shards: {cfg.data.shards!r} is already a latent cache; point it at the videos")
        out = Path(cfg.stage.out)
        if out.exists() and not (out / MANIFEST).is_file():
            raise ConfigError(f"stage.out: {str(out)!r} exists and is not a latent cache (no {MANIFEST}); "
                              f"choose a new folder")


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
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
    clips = read_clips(list_shards(cfg.data.shards), s.frames, s.resolution, stats, cfg.data.caption_key)
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
