"""`stage=curate`: the data engine (lifecycle.curation): raw media -> decoded, filtered, deduplicated, annotated,
scored and recaptioned webdataset shards, a manifest and report.md. This module owns the stage's config and
start-up checks; the pipeline is `lifecycle.curation.curate`."""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

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
    threshold: float = 0.02  # near duplicates: RMS distance of thumbnail embeddings; < 0: exact duplicates only
    frames: int = 4
    size: int = 16


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
    workers: int = 2  # processes per rank
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    aesthetic: list[str] = MISSING  # conf/reward names, a weighted sum; [] = off
    recaption: Any = MISSING  # stage/recaption=attributes (embedded) | vlm, or null
    safety: Any = None  # stage/safety=classifier, or null
    wait_timeout: float = 86400.0  # seconds a rank waits for the others

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        st = cfg.stage
        if not os.path.exists(st.input) and st.generate is None and not is_later(st.input):
            raise ConfigError(f"stage.input: {st.input!r} does not exist (and stage.generate is not set)")
        if st.truth is not None and not os.path.exists(st.truth) and st.generate is None:
            raise ConfigError(f"stage.truth: no file {st.truth!r}")
        for key in ("unit_size", "workers", "dedup.frames", "dedup.size"):
            if OmegaConf.select(st, key) < 1:
                raise ConfigError(f"stage.{key}: must be >= 1, got {OmegaConf.select(st, key)}")
        rewards = Path(CONF_DIR) / "reward"
        unknown = [n for n in st.aesthetic if not (rewards / f"{n}.yaml").is_file()]
        if unknown:
            raise ConfigError(f"stage.aesthetic: no reward {unknown[0]!r} in conf/reward "
                              f"({sorted(p.stem for p in rewards.glob('*.yaml'))})")
        for key in ("recaption", "safety"):
            if st[key] is not None:
                check_target(f"stage.{key}", st[key])
                check_model_paths(f"stage.{key}", st[key], ("model",))


def run(cfg: DictConfig) -> dict:
    """Curate `stage.input` into `stage.out` (every rank of a multi-rank job shares the work)."""
    return curate.run(cfg)
