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
    profiler: Optional[str] = None  # simple | advanced | pytorch: Lightning's profilers


@dataclass
class ModelSchema:
    pretrained: Optional[str] = None  # hub id or local folder; wins over the component configs
    scheduler: Any = None
    denoiser: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    token_embedding_std: Optional[float] = None
    image_encoder: Any = None  # image-to-video (SVD) models, in place of text_encoder/tokenizer
    conditioning: Any = None  # SVD micro-conditioning: fps, motion_bucket_id, noise_aug_strength


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
    fused: Optional[bool] = True  # torch's fused AdamW kernel (CPU and CUDA); null: torch's default


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
class LoRASchema:
    rank: int = 8
    alpha: float = 8.0
    target_modules: Optional[list[str]] = None  # null: the attention projections
    dropout: float = 0.0


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
    lora: Optional[LoRASchema] = None  # null: full fine-tuning
    export: str = "merge"  # with LoRA: merge | adapter
    select: Any = None  # train on a curated subset: {min: {score: t}, where: {key: [values]}, keys: file}


@dataclass
class SamplingSchema:
    num_steps: int = 25
    guidance_scale: float = 3.0
    eta: float = 0.0
    grad_steps: int = 1  # K: gradients flow through the last K denoising steps
    grad_mode: str = "last"  # last | rand (K drawn from 1..grad_steps every step)


@dataclass
class MemorySchema:
    gradient_checkpointing: bool = False
    frozen_dtype: Optional[str] = None  # bf16 | fp16: frozen weights in half precision, trainable in fp32
    offload_activations: bool = False  # keep saved activations in CPU memory


@dataclass
class EvaluationSchema:
    num_steps: int = 25
    guidance_scale: float = 3.0
    seed: int = 0
    batch_size: int = 32
    oracle: bool = False  # synthetic-world prompts: also report pixel-oracle prompt fidelity
    fps: int = 8


@dataclass
class VaderStageSchema:
    name: str = "???"
    run: str = "???"
    steps: int = 100
    batch_size: int = 2
    frames: int = 8
    resolution: int = 32
    sampling: SamplingSchema = field(default_factory=SamplingSchema)
    decode_frames: Optional[int] = None  # score this many random frames (null: all)
    condition: str = "synthetic"  # image-to-video models: conditioning images, synthetic | a folder of images
    clips: int = 1  # image-to-video models: autoregressive clips per video (long horizon when > 1)
    lora: Optional[LoRASchema] = field(default_factory=LoRASchema)  # null: full fine-tuning
    memory: MemorySchema = field(default_factory=MemorySchema)
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    lr_scheduler: LRSchedulerSchema = field(default_factory=LRSchedulerSchema)
    gradient_clip: Optional[float] = 1.0
    accumulate: int = 1
    export: str = "merge"
    evaluation: EvaluationSchema = field(default_factory=EvaluationSchema)


@dataclass
class ToolStageSchema:
    name: str = "???"
    run: str = "???"


STAGE_SCHEMAS = {"pretrain": DenoiseStageSchema, "sft": DenoiseStageSchema, "vader": VaderStageSchema,
                 "synthetic": ToolStageSchema}
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
    if schema is VaderStageSchema:
        for name in ("train", "test"):
            spec = cfg.get("prompts", {}).get(name)
            if spec is None:
                raise ConfigError(f"prompts.{name}: missing (a list of prompts or a text file)")
            if isinstance(spec, str) and not os.path.isfile(spec):
                raise ConfigError(f"prompts.{name}: no prompt file {spec!r}")
        st = cfg.stage
        _choice("stage.sampling.grad_mode", st.sampling.grad_mode, ("last", "rand"))
        _choice("stage.memory.frozen_dtype", st.memory.frozen_dtype, ("bf16", "fp16"))
        if not 1 <= st.sampling.grad_steps <= st.sampling.num_steps:
            raise ConfigError(f"stage.sampling.grad_steps: must be in 1..num_steps ({st.sampling.num_steps}), "
                              f"got {st.sampling.grad_steps}")
        for k in ("steps", "batch_size", "frames", "resolution"):
            if st[k] <= 0:
                raise ConfigError(f"stage.{k}: must be positive, got {st[k]}")
        if st.decode_frames is not None and not 1 <= st.decode_frames <= st.frames:
            raise ConfigError(f"stage.decode_frames: must be in 1..frames ({st.frames}) or null, got {st.decode_frames}")
        if st.clips < 1:
            raise ConfigError(f"stage.clips: must be >= 1, got {st.clips}")
        if st.condition != "synthetic" and not os.path.isdir(os.path.expanduser(st.condition)):
            raise ConfigError(f"stage.condition: {st.condition!r} is neither 'synthetic' nor a folder of images")
    if schema in (DenoiseStageSchema, VaderStageSchema):
        _choice("stage.export", cfg.stage.export, ("merge", "adapter"))
        if cfg.stage.accumulate < 1:
            raise ConfigError(f"stage.accumulate: must be >= 1, got {cfg.stage.accumulate}")
    return cfg
