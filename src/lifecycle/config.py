"""Config schemas and start-up validation: a bad key stops the run before any compute.

Each section of the composed Hydra config is merged into a typed schema (OmegaConf
structured configs), so wrong types and unknown keys are reported with their full key.
"""

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .diffusion.noise import FLOW_T_SCHEMES, PREDICTION_KINDS


class ConfigError(ValueError):
    """A configuration problem, reported as `key: what is wrong`."""


@dataclass
class TrainerSchema:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: str = "32-true"
    max_steps: Optional[int] = None  # None: the stage's curriculum total
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 200
    resume: Optional[str] = None  # null | last | a checkpoint path
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class ModelSchema:
    pretrained: Optional[str] = None  # hub id or local folder; wins over the component configs
    scheduler: Any = None
    denoiser: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    token_embedding_std: Optional[float] = None


@dataclass
class DataSchema:
    shards: str = "???"
    num_workers: int = 1
    shuffle_buffer: int = 256
    generate: Any = None


@dataclass
class PhaseSchema:
    name: str = "???"
    resolution: int = "???"
    frames: int = "???"
    batch_size: int = "???"
    steps: int = "???"


@dataclass
class ObjectiveSchema:
    loss_space: Optional[str] = None  # epsilon | v_prediction | sample; null = what the model predicts
    min_snr_gamma: Optional[float] = 5.0
    min_snr_floor: float = 0.0
    noise_offset: float = 0.0
    caption_dropout: float = 0.1
    flow_timesteps: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class OptimizerSchema:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8


@dataclass
class LRSchedulerSchema:
    name: str = "cosine"  # any diffusers.optimization scheduler name
    warmup_steps: int = 0


@dataclass
class GuardSchema:
    action: str = "skip"  # skip | stop
    spike_factor: float = 10.0
    ema_beta: float = 0.98
    warmup: int = 20


@dataclass
class EMASchema:
    decay: Optional[float] = 0.999  # null disables EMA
    every: int = 1


@dataclass
class SamplesSchema:
    prompts: Any = "???"
    num_steps: int = 25
    guidance_scale: float = 3.0
    seed: int = 0
    every_n_steps: int = 0
    fps: int = 8
    batch_size: int = 32
    oracle: bool = True


@dataclass
class DenoiseStageSchema:
    name: str = "???"
    run: str = "???"
    curriculum: list[PhaseSchema] = "???"
    objective: ObjectiveSchema = field(default_factory=ObjectiveSchema)
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    lr_scheduler: LRSchedulerSchema = field(default_factory=LRSchedulerSchema)
    guard: GuardSchema = field(default_factory=GuardSchema)
    ema: EMASchema = field(default_factory=EMASchema)
    samples: SamplesSchema = field(default_factory=SamplesSchema)
    gradient_clip: Optional[float] = 1.0
    accumulate: int = 1
    train_text_encoder: bool = False


@dataclass
class ToolStageSchema:
    name: str = "???"
    run: str = "???"


STAGE_SCHEMAS = {"pretrain": DenoiseStageSchema, "synthetic": ToolStageSchema}
SECTION_SCHEMAS = {"trainer": TrainerSchema, "model": ModelSchema, "data": DataSchema}


def _typed(section: str, schema, node) -> DictConfig:
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        key = f"{section}.{e.full_key}" if getattr(e, "full_key", None) else section
        raise ConfigError(f"{key}: {e.msg if hasattr(e, 'msg') else e}") from None


def _choice(key: str, value, choices) -> None:
    if value is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(path) or path.count("/") != 1


def validate(cfg: DictConfig) -> DictConfig:
    """Typed, checked copy of `cfg`; raises ConfigError naming the first bad key."""
    cfg = cfg.copy()
    for section, schema in SECTION_SCHEMAS.items():
        cfg[section] = _typed(section, schema, cfg[section])
    schema = STAGE_SCHEMAS.get(cfg.stage.get("name"))
    if schema is None:
        raise ConfigError(f"stage.name: {cfg.stage.get('name')!r} is not one of {list(STAGE_SCHEMAS)}")
    cfg.stage = _typed("stage", schema, cfg.stage)
    for key in OmegaConf.missing_keys(cfg):
        raise ConfigError(f"{key}: missing value")

    pretrained = cfg.model.pretrained
    if pretrained and _looks_local(pretrained) and not os.path.isdir(os.path.expanduser(pretrained)):
        raise ConfigError(f"model.pretrained: no such folder {pretrained!r}")
    if not pretrained and cfg.model.denoiser is None:
        raise ConfigError("model.denoiser: set it, or model.pretrained")
    resume = cfg.trainer.resume
    if resume not in (None, "last") and not os.path.isfile(resume):
        raise ConfigError(f"trainer.resume: no checkpoint at {resume!r} (use 'last' or a .ckpt path)")
    if not os.path.exists(cfg.data.shards) and cfg.data.generate is None:
        raise ConfigError(f"data.shards: {cfg.data.shards!r} does not exist (and data.generate is not set)")

    if schema is DenoiseStageSchema:
        obj = cfg.stage.objective
        _choice("stage.objective.loss_space", obj.loss_space, [k for k in PREDICTION_KINDS if k != "flow"])
        _choice("stage.objective.flow_timesteps", obj.flow_timesteps, FLOW_T_SCHEMES)
        _choice("stage.guard.action", cfg.stage.guard.action, ("skip", "stop"))
        for i, phase in enumerate(cfg.stage.curriculum):
            for k in ("resolution", "frames", "batch_size", "steps"):
                if phase[k] <= 0:
                    raise ConfigError(f"stage.curriculum[{i}].{k}: must be positive, got {phase[k]}")
        if cfg.stage.accumulate < 1:
            raise ConfigError(f"stage.accumulate: must be >= 1, got {cfg.stage.accumulate}")
    return cfg
