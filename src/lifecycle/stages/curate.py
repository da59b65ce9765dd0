"""`stage=curate`: the data engine (lifecycle.curation): raw media -> decoded, filtered, deduplicated, annotated,
scored and recaptioned webdataset shards, a manifest and report.md. This module owns the stage's config and
start-up checks; the pipeline is `lifecycle.curation.curate`."""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from .. import CONF_DIR
from ..config import check_model_paths, check_target, is_later
from ..curation import curate
from ..errors import ConfigError
from .base import StageConfig


@dataclass
class FiltersConfig:
    min_resolution: int = 32  # px, the shorter side
    min_frames: int = 4
    max_frames: Optional[int] = None
    max_aspect: Optional[float] = 2.0  # long side / short side


@dataclass
class DedupConfig:
    threshold: float = 0.02  # near duplicates: RMS distance of embeddings; < 0: exact duplicates only
    frames: int = 4
    size: int = 16
    model: Optional[str] = None  # null: pixel thumbnails; a CLIP/SigLIP hub id or folder
    index: str = "auto"  # flat | ivf | hnsw | auto (flat up to exact_up_to clips)
    exact_up_to: int = 100000
    neighbours: int = 16
    nprobe: int = 16
    ef_search: int = 128


@dataclass
class ActorsConfig:
    """A model step's Ray actor pool: how many actors, each one's resources, clips per call."""

    actors: int = 1
    num_cpus: float = 0
    num_gpus: float = 0
    batch_size: int = 32


@dataclass
class ModelStepsConfig:
    embed: ActorsConfig = field(default_factory=ActorsConfig)
    score: ActorsConfig = field(default_factory=ActorsConfig)
    safety: ActorsConfig = field(default_factory=ActorsConfig)
    recaption: ActorsConfig = field(default_factory=ActorsConfig)


@dataclass
class RayConfig:
    address: Optional[str] = None  # null: a local Ray started by the stage; auto / ray://head:10001: a cluster
    object_store_mb: int = 512
    batch_size: int = 32
    models: ModelStepsConfig = field(default_factory=ModelStepsConfig)


@dataclass
class AnnotateConfig:
    pixel_threshold: float = 0.05
    static_fraction: float = 0.002
    pan_fraction: float = 0.5
    min_travel: float = 0.05


@dataclass
class Config(StageConfig):
    raw: Optional[str] = MISSING  # the embedded raw world's folder (input, truth and labels point into it)
    input: str = MISSING  # a folder of media files, or shards (a folder of *.tar, a glob, a brace pattern)
    out: str = MISSING  # the curated shards, manifest.jsonl, report.md; shared by every rank
    generate: Any = MISSING  # written first when `input` is missing (the embedded raw world)
    truth: Optional[str] = MISSING  # ground truth for the report (the raw world's truth.jsonl)
    unit_size: int = 256  # files per unit of work (shards: one shard per unit)
    workers: int = 2  # CPUs of the local Ray
    ray: RayConfig = field(default_factory=RayConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    aesthetic: Any = MISSING  # conf/reward names (a weighted sum), or {name: its overrides}; [] = off
    recaption: Any = MISSING  # stage/recaption=attributes (embedded) | vlm, or null
    safety: Any = None  # stage/safety=classifier, or null

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        st = cfg.stage
        if not os.path.exists(st.input) and st.generate is None and not is_later(st.input):
            raise ConfigError(f"stage.input: {st.input!r} does not exist (and stage.generate is not set)")
        if st.truth is not None and not os.path.exists(st.truth) and st.generate is None:
            raise ConfigError(f"stage.truth: no file {st.truth!r}")
        pools = [f"ray.models.{m}.{k}" for m in ("embed", "score", "safety", "recaption") for k in ("actors", "batch_size")]
        for key in ("unit_size", "workers", "dedup.frames", "dedup.size", "dedup.exact_up_to", "dedup.neighbours",
                    "dedup.nprobe", "dedup.ef_search", "ray.object_store_mb", "ray.batch_size", *pools):
            if OmegaConf.select(st, key) < 1:
                raise ConfigError(f"stage.{key}: must be >= 1, got {OmegaConf.select(st, key)}")
        if st.dedup.index not in ("auto", "flat", "ivf", "hnsw"):
            raise ConfigError(f"stage.dedup.index: one of auto, flat, ivf, hnsw; got {st.dedup.index!r}")
        if st.dedup.model is not None:
            check_model_paths("stage.dedup", st.dedup, ("model",))
        if not isinstance(st.aesthetic, ListConfig) or not all(isinstance(e, (str, DictConfig)) for e in st.aesthetic):
            raise ConfigError(f"stage.aesthetic: a list of conf/reward names or {{name: overrides}}, got {st.aesthetic}")
        for entry in (e for e in st.aesthetic if isinstance(e, DictConfig)):
            for name, more in entry.items():
                check_model_paths(f"stage.aesthetic.{name}", more or {}, ("clip", "model"))
        rewards = Path(CONF_DIR) / "reward"
        names = [n for e in st.aesthetic for n in ([e] if isinstance(e, str) else e)]
        unknown = [n for n in names if not (rewards / f"{n}.yaml").is_file()]
        if unknown:
            raise ConfigError(f"stage.aesthetic: no reward {unknown[0]!r} in conf/reward "
                              f"({sorted(p.stem for p in rewards.glob('*.yaml'))})")
        for key in ("recaption", "safety"):
            if st[key] is not None:
                check_target(f"stage.{key}", st[key])
                check_model_paths(f"stage.{key}", st[key], ("model",))


def run(cfg: DictConfig) -> dict:
    """Curate `stage.input` into `stage.out` on Ray Data (a local Ray, or the cluster at `stage.ray.address`)."""
    return curate.run(cfg)
