"""Config schemas and start-up validation: a bad key stops the run before any compute.

Each section of the composed Hydra config is merged into a typed schema (OmegaConf
structured configs), so wrong types and unknown keys are reported with their full key. Files and
folders are looked up, `_target_`s (rewards, loggers, captioners) imported without being built and
their arguments matched against the signature, and stage/model/reward combinations that cannot work
refused, each as one line `key: what is wrong`.
"""

import inspect
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import CONF_DIR
from .data.prompts import load_prompts
from .data.shards import SPLITS, list_shards
from .diffusion.noise import FLOW_T_SCHEMES, PREDICTION_KINDS
from .errors import ConfigError
from .rewards.base import Reward




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
    throughput_window: int = 20  # batches per samples/s, FLOP/s and MFU reading (pre-training and SFT)
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
    trust_remote_code: bool = False  # let `pretrained` run its own code (classes outside diffusers/transformers)
    token: Optional[str] = None  # hub token for a gated `pretrained`: +model.token=${oc.env:MY_TOKEN} (never a literal)


@dataclass
class DataSchema:
    shards: str = "???"
    split: str = "global"  # global | rank: how ranks share the stream (data/shards.py)
    num_workers: int = 1
    shuffle_buffer: int = 256
    generate: Any = None
    caption_key: str = "caption"  # the metadata field trained on (curated shards also keep original_caption)
    decoded_cache_mb: float = 1024  # decoded samples kept in memory per loader worker (0: decode every read)
    max_bad_in_a_row: int = 1000  # stop (DataError) when this many reads in a row fail
    max_bad_share: float = 0.5  # ... or when more than this share of the reads fail (from the 100th read)
    balance: Any = None  # {key: metadata field, classes: null | [values]}: each class equally often (data/shards.py)


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
    max_skips_in_a_row: int = 20  # skip: stop once this many updates in a row were skipped


@dataclass
class EMASchema:
    decay: Optional[float] = 0.999  # null disables EMA
    every: int = 1


@dataclass
class ValidationSchema:
    prompts: Any = "???"
    num_steps: int = 25
    guidance_scale: float = 3.0
    seed: int = 0
    every_n_steps: int = 0
    fps: int = 8
    batch_size: int = 32
    oracle: bool = True
    metrics: bool = True  # the `metrics` group's FID, KID, CLIP score, temporal consistency and motion
    best: Optional[str] = None  # keep checkpoints/best.ckpt by this logged metric, e.g. val/fid
    mode: str = "min"


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
    validation: ValidationSchema = field(default_factory=ValidationSchema)
    gradient_clip: Optional[float] = 1.0
    accumulate: int = 1
    train_text_encoder: bool = False
    lora: Optional[LoRASchema] = None  # null: full fine-tuning
    export: str = "merge"  # with LoRA: merge | adapter
    lora_formats: list[str] = field(default_factory=list)  # kohya | comfyui: the LoRA also in these layouts
    select: Any = None  # train on a curated subset: {min: {score: t}, where: {key: [values]}, keys: file}
    gradient_checkpointing: bool = False  # activation checkpointing per denoiser block
    compile: bool = False  # torch.compile the denoiser's forward (in place)


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
class CurveSchema:
    every_n_steps: int = 0  # > 0: reward on prompts.train every n optimizer steps -> <run_dir>/curve.jsonl
    num_steps: int = 10
    guidance_scale: float = 3.0
    seed: int = 0
    batch_size: int = 48


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
    lora_formats: list[str] = field(default_factory=list)  # kohya | comfyui: the LoRA also in these layouts
    evaluation: EvaluationSchema = field(default_factory=EvaluationSchema)
    curve: CurveSchema = field(default_factory=CurveSchema)


@dataclass
class DPOTimestepsSchema:
    flow: str = "logit_normal"  # flow models: uniform | logit_normal (DDPM-family models: uniform t)
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class DPOStageSchema:
    name: str = "???"
    run: str = "???"
    pairs: str = "???"  # folder of preference-pair shards
    steps: int = 100
    batch_size: int = 4  # pairs per step
    frames: int = 8
    resolution: int = 32
    shuffle_buffer: int = 256
    num_workers: int = 0
    beta: float = 1000.0
    timesteps: DPOTimestepsSchema = field(default_factory=DPOTimestepsSchema)
    lora: Optional[LoRASchema] = field(default_factory=LoRASchema)  # null: full fine-tuning, frozen-copy reference
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    lr_scheduler: LRSchedulerSchema = field(default_factory=LRSchedulerSchema)
    gradient_clip: Optional[float] = 1.0
    accumulate: int = 1
    guard: GuardSchema = field(default_factory=GuardSchema)
    export: str = "merge"
    lora_formats: list[str] = field(default_factory=list)  # kohya | comfyui: the LoRA also in these layouts
    evaluation: Optional[EvaluationSchema] = field(default_factory=EvaluationSchema)  # null: no before/after table
    curve: CurveSchema = field(default_factory=CurveSchema)


@dataclass
class DDPOSampleSchema:
    batch_size: int = 4  # videos per sampling batch, per device
    num_batches: int = 2  # sampling batches per epoch: batch_size·num_batches reward queries per device
    num_steps: int = 20
    guidance_scale: float = 3.0
    eta: float = 1.0  # > 0: stochastic DDIM, the policy whose log-probabilities PPO ratios


@dataclass
class PerPromptStatsSchema:
    buffer_size: int = 32  # rewards kept per prompt
    min_count: int = 16  # normalise by the batch until a prompt has this many


@dataclass
class PPOSchema:
    inner_epochs: int = 1
    batch_size: int = 4  # samples per minibatch
    accumulate: int = 1  # minibatches per optimizer step
    timestep_fraction: float = 1.0  # fraction of each trajectory's steps trained on
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0


@dataclass
class DDPOStageSchema:
    name: str = "???"
    run: str = "???"
    epochs: int = 50
    frames: int = 8
    resolution: int = 32
    sample: DDPOSampleSchema = field(default_factory=DDPOSampleSchema)
    per_prompt_stats: Optional[PerPromptStatsSchema] = field(default_factory=PerPromptStatsSchema)  # null: batch
    ppo: PPOSchema = field(default_factory=PPOSchema)
    lora: Optional[LoRASchema] = field(default_factory=LoRASchema)  # null: full fine-tuning
    gradient_checkpointing: bool = False
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    lr_scheduler: LRSchedulerSchema = field(default_factory=LRSchedulerSchema)
    gradient_clip: Optional[float] = 1.0
    export: str = "merge"
    lora_formats: list[str] = field(default_factory=list)  # kohya | comfyui: the LoRA also in these layouts
    evaluation: EvaluationSchema = field(default_factory=EvaluationSchema)
    curve: CurveSchema = field(default_factory=CurveSchema)


@dataclass
class PreferencesStageSchema:
    name: str = "???"
    run: str = "???"
    source: str = "sampled"  # sampled | pickapic
    path: Optional[str] = None  # pickapic: the JSON-lines file
    out: str = "???"
    candidates: int = 4
    repeats: int = 1
    strategy: str = "best_worst"  # best_worst | all
    min_margin: float = 0.05
    frames: int = 8
    resolution: int = 32
    num_steps: int = 25
    guidance_scale: float = 3.0
    batch_size: int = 16
    annotator: Optional[str] = None  # dotted path of a (videos, prompts) -> scores function, in place of `reward`
    shard_size: int = 256


@dataclass
class ConvScorerSchema:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    text_buckets: int = 4096
    text_dim: int = 32
    hidden: int = 64


@dataclass
class ClipScorerSchema:
    backbone: str = "openai/clip-vit-large-patch14"
    tokenizer: Optional[str] = None
    hidden: int = 256
    lora: Optional[LoRASchema] = None  # null: train the head only


@dataclass
class RewardModelStageSchema:
    name: str = "???"
    run: str = "???"
    pairs: str = "???"
    architecture: str = "conv"  # conv | clip
    conv: ConvScorerSchema = field(default_factory=ConvScorerSchema)
    clip: ClipScorerSchema = field(default_factory=ClipScorerSchema)
    steps: int = 300
    batch_size: int = 16
    frames: Optional[int] = None  # null: the pairs' own
    resolution: Optional[int] = None
    val_fraction: float = 0.2
    eval_batch_size: int = 64
    num_workers: int = 1
    shuffle_buffer: int = 256
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    lr_scheduler: LRSchedulerSchema = field(default_factory=LRSchedulerSchema)
    gradient_clip: Optional[float] = 1.0


@dataclass
class LatentCacheStageSchema:
    name: str = "???"
    run: str = "???"
    out: str = "???"  # the cache folder, then data.shards of pre-training / SFT
    frames: int = 8
    resolution: int = 32
    batch_size: int = 32  # clips encoded at once
    samples_per_shard: int = 1000
    dtype: str = "float32"  # float32 | float16: how latents and embeddings are stored


@dataclass
class CurateFiltersSchema:
    min_resolution: int = 32  # px, the shorter side
    min_frames: int = 4
    max_frames: Optional[int] = None
    max_aspect: Optional[float] = 2.0  # long side / short side


@dataclass
class DedupSchema:
    threshold: float = 0.02  # near duplicates: RMS distance of thumbnail embeddings; < 0: exact duplicates only
    frames: int = 4
    size: int = 16


@dataclass
class AnnotateSchema:
    pixel_threshold: float = 0.05
    static_fraction: float = 0.002
    pan_fraction: float = 0.5
    min_travel: float = 0.05


@dataclass
class CurateStageSchema:
    name: str = "???"
    run: str = "???"
    raw: Optional[str] = None  # the embedded raw world's folder (input, truth and labels point into it)
    input: str = "???"  # a folder of media files, or shards (a folder of *.tar, a glob, a brace pattern)
    out: str = "???"  # the curated shards, manifest.jsonl, report.md; shared by every rank
    generate: Any = None  # written first when `input` is missing (the embedded raw world)
    truth: Optional[str] = None  # ground truth for the report (the raw world's truth.jsonl)
    unit_size: int = 256  # files per unit of work (shards: one shard per unit)
    workers: int = 2  # processes per rank
    filters: CurateFiltersSchema = field(default_factory=CurateFiltersSchema)
    dedup: DedupSchema = field(default_factory=DedupSchema)
    annotate: AnnotateSchema = field(default_factory=AnnotateSchema)
    aesthetic: list[str] = field(default_factory=lambda: ["vivid"])  # conf/reward names
    recaption: Any = None  # stage/recaption=attributes (embedded) | vlm, or null
    safety: Any = None  # stage/safety=classifier, or null
    wait_timeout: float = 86400.0  # seconds a rank waits for the others


@dataclass
class ToolStageSchema:
    name: str = "???"
    run: str = "???"


@dataclass
class ReportSchema:
    grid_prompts: int = 8  # prompts per set in the sample grids
    curves: list[str] = field(default_factory=list)  # metrics.csv columns plotted over training steps


@dataclass
class EvalStageSchema:
    name: str = "???"
    run: str = "???"
    models: list[str] = field(default_factory=list)  # export folders, or run directories holding export/
    frames: int = 8
    resolution: int = 32
    evaluation: EvaluationSchema = field(default_factory=EvaluationSchema)
    condition: str = "synthetic"  # image-to-video models: conditioning images (as VADER's stage.condition)
    metrics: bool = True  # the `metrics` group's FID, KID, CLIP score, temporal consistency and motion
    report: ReportSchema = field(default_factory=ReportSchema)


@dataclass
class FeaturesSchema:
    model: Optional[str] = None  # a transformers vision model, hub id or folder; null: thumbnails
    thumbnail: int = 8
    trust_remote_code: bool = False


@dataclass
class ReferenceSchema:
    shards: Optional[str] = None  # webdataset shards; null: clips drawn from the synthetic world
    n: int = 256
    seed: int = 1


@dataclass
class KIDSchema:
    subset_size: int = 100
    subsets: int = 50


@dataclass
class MetricsSchema:
    features: FeaturesSchema = field(default_factory=FeaturesSchema)
    reference: ReferenceSchema = field(default_factory=ReferenceSchema)
    fid: bool = True
    kid: Optional[KIDSchema] = field(default_factory=KIDSchema)
    clip_score: Optional[str] = None  # a CLIP hub id or folder; null: off
    batch_size: int = 256


@dataclass
class WatermarkSchema:
    enabled: bool = True
    message: str = "lcyc"  # 1 to 4 bytes (UTF-8) hidden in every exported frame
    method: str = "dwtDctSvd"  # imwatermark's method (the one that survives mp4 and gif)
    min_size: int = 256  # px: frames are upscaled (nearest) to this short side at least; imwatermark needs 256x256


@dataclass
class OutputsSchema:
    filter: Any = None  # outputs/filter=classifier (lifecycle.curation.safety.SafetyFilter), or null
    watermark: WatermarkSchema = field(default_factory=WatermarkSchema)
    provenance: bool = True  # provenance.json beside exported samples, and a copy in each file


STAGE_SCHEMAS = {"pretrain": DenoiseStageSchema, "sft": DenoiseStageSchema, "vader": VaderStageSchema,
                 "synthetic": ToolStageSchema, "latent_cache": LatentCacheStageSchema, "dpo": DPOStageSchema,
                 "ddpo": DDPOStageSchema, "preferences": PreferencesStageSchema, "reward_model": RewardModelStageSchema,
                 "eval": EvalStageSchema, "curate": CurateStageSchema}
SECTION_SCHEMAS = {"trainer": TrainerSchema, "model": ModelSchema, "data": DataSchema, "outputs": OutputsSchema,
                   "metrics": MetricsSchema}
TRAINER_STAGES = (DenoiseStageSchema, VaderStageSchema, DPOStageSchema, DDPOStageSchema, RewardModelStageSchema)


def _typed(section: str, schema, node) -> DictConfig:
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        key = f"{section}.{e.full_key}" if getattr(e, "full_key", None) else section
        raise ConfigError(f"{key}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None  # not the key again


def _choice(key: str, value, choices) -> None:
    if value is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")


_LATER: tuple[str, ...] = ()  # folders that earlier stages of a recipe have yet to write (`later`)


@contextmanager
def later(*folders) -> None:
    """Validate a recipe's later stage before its earlier ones ran: paths inside `folders` (their run
    directories) are not looked up, everything else is checked as usual."""
    global _LATER
    saved, _LATER = _LATER, tuple(os.path.abspath(f) for f in folders)
    try:
        yield
    finally:
        _LATER = saved


def _later(path) -> bool:
    """Whether `path` is inside a folder an earlier recipe stage will write (see `later`)."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    return any(path == f or path.startswith(f + os.sep) for f in _LATER)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(path) or path.count("/") != 1


PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", "64", "32", "16", "bf16")  # Lightning's
PROFILERS = ("simple", "advanced", "pytorch")
PROMPT_SETS = ("train", "test")
HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_", "_args_")
MODEL_PATH_KEYS = ("model", "clip", "tokenizer", "backbone")  # hub ids or local folders of pretrained weights


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _top_level_keys() -> set[str]:
    """The keys conf/config.yaml declares: its defaults groups and its own keys."""
    conf = OmegaConf.load(Path(CONF_DIR) / "config.yaml")
    groups = {next(iter(d)).split("@")[-1].lstrip("/").split("/")[0]  # outputs/filter -> outputs
              for d in conf.get("defaults", []) if isinstance(d, DictConfig)}
    return (groups | set(conf) | set(SECTION_SCHEMAS)) - {"defaults", "hydra"}


def _check_top_level(cfg: DictConfig) -> None:
    known = _top_level_keys()
    for key in cfg:
        if key not in known:
            raise ConfigError(f"{key}: unknown top-level key (known: {sorted(known)})")
    if type(cfg.get("seed")) is not int:
        raise ConfigError(f"seed: must be an integer, got {cfg.get('seed')!r}")
    if type(cfg.get("overwrite", False)) is not bool:
        raise ConfigError(f"overwrite: must be true or false, got {cfg.get('overwrite')!r}")
    for key in cfg.get("prompts") or {}:
        if key not in PROMPT_SETS:
            raise ConfigError(f"prompts.{key}: unknown prompt set (known: {list(PROMPT_SETS)})")


def _import(key: str, path: str):
    """The object at dotted `path`, imported as hydra's instantiate and get_method do (without their error log)."""
    from hydra._internal.utils import _locate

    try:
        return _locate(path)
    except Exception as e:  # noqa: BLE001 - any import failure is a bad dotted path
        raise ConfigError(f"{key}: cannot import {path!r} ({_one_line(e.__cause__ or e)})") from None


def _target(key: str, node, skip=()):
    """Import `node._target_` (without calling it); check `node`'s other keys against its signature."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not isinstance(target, str):
        raise ConfigError(f"{key}._target_: missing (the dotted path of what to build)")
    obj = _import(f"{key}._target_", target)
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # no signature to check against: the call will tell
        return obj
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for name in node:
            if name not in params and name not in HYDRA_KEYS and name not in skip:
                raise ConfigError(f"{key}.{name}: {target} takes no argument {name!r} (it takes {list(params)})")
    for name, p in params.items():
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in node:
            raise ConfigError(f"{key}.{name}: missing (a required argument of {target})")
    return obj


def _check_model_paths(key: str, node, names=MODEL_PATH_KEYS) -> None:
    """Pretrained weights named by a path (not a hub id 'org/name') must be an existing folder."""
    for name in names:
        value = node.get(name)
        if isinstance(value, str) and _looks_local(value) and not _later(value) and not os.path.isdir(os.path.expanduser(value)):
            raise ConfigError(f"{key}.{name}: no such folder {value!r} (a hub id is 'org/name')")


def _check_rewards(cfg: DictConfig, backprop: bool) -> None:
    """Every `reward.<name>`: an importable Reward whose arguments fit, a number for weight, existing weight
    files and folders; a stage that backpropagates through the reward needs every term differentiable."""
    if not cfg.get("reward"):
        raise ConfigError("reward: none selected (reward=<name> or reward=[a,b], names from conf/reward)")
    for name, entry in cfg.reward.items():
        key = f"reward.{name}"
        obj = _target(key, entry, skip=("weight",))
        cls = obj.__self__ if inspect.ismethod(obj) else obj  # a classmethod factory: LearnedReward.from_pretrained
        if isinstance(cls, type) and not issubclass(cls, Reward):
            raise ConfigError(f"{key}._target_: {entry._target_} is not a lifecycle Reward")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{key}.weight: must be a number, got {weight!r}")
        _check_model_paths(key, entry)
        if entry.get("head") is not None and not os.path.isfile(os.path.expanduser(entry.head)):
            raise ConfigError(f"{key}.head: no weights file {entry.head!r}")
        if entry.get("path") is not None and not _later(entry.path) and not os.path.isdir(os.path.expanduser(entry.path)):
            raise ConfigError(f"{key}.path: no such folder {entry.path!r}")
        if backprop and not getattr(cls, "differentiable", True):
            raise ConfigError(f"{key}: {entry._target_} is not differentiable; stage={cfg.stage.name} backpropagates "
                              f"through the reward (choose a differentiable reward, or stage=ddpo, which needs none)")


def _model_makeup(cfg: DictConfig) -> tuple[bool, str, dict] | None:
    """(image-to-video?, scheduler class, scheduler config) from the component configs or a local pretrained
    folder; None when that needs a download (a hub id)."""
    m = cfg.model
    if not m.pretrained:
        scheduler = OmegaConf.to_container(m.scheduler or {}, resolve=True)
        return m.image_encoder is not None, str(scheduler.get("_target_", "")).rsplit(".", 1)[-1], scheduler
    folder = Path(os.path.expanduser(m.pretrained))
    index, scheduler = folder / "model_index.json", folder / "scheduler" / "scheduler_config.json"
    if not index.is_file() or not scheduler.is_file():
        return None
    scheduler = json.loads(scheduler.read_text())
    image_encoder = (json.loads(index.read_text()).get("image_encoder") or [None])[0] is not None
    return image_encoder, scheduler.get("_class_name", ""), scheduler


def _check_text_to_video(cfg: DictConfig, ddim: bool) -> None:
    """Stages for text-to-video models only; `ddim`: and only a DDIM-sampled one (DDPO's stochastic policy)."""
    makeup = _model_makeup(cfg)
    if makeup is None:
        return
    image_to_video, scheduler, config = makeup
    if image_to_video:
        raise ConfigError(f"model: stage={cfg.stage.name} is for text-to-video models; this one is image-to-video "
                          f"(it has an image_encoder)")
    flow = scheduler.startswith("FlowMatch") or config.get("prediction_type") == "flow_prediction"
    edm = scheduler == "EulerDiscreteScheduler" and config.get("timestep_type") == "continuous"
    if ddim and (flow or edm):
        raise ConfigError(f"model: stage={cfg.stage.name} trains the stochastic DDIM chain of a text-to-video model; "
                          f"this is a {'flow-matching' if flow else 'EDM (Euler-sampled)'} model ({scheduler})")


def _component_configs(cfg: DictConfig) -> tuple[dict | None, dict | None, str] | None:
    """(denoiser config, VAE config, where they come from) from the component configs or a local pretrained
    folder (`<folder>/unet|transformer/config.json`, `<folder>/vae/config.json`); None when that needs a download."""
    m = cfg.model
    if not m.pretrained:
        return (OmegaConf.to_container(m.denoiser, resolve=True) if m.denoiser is not None else None,
                OmegaConf.to_container(m.vae, resolve=True) if m.vae is not None else None, "model")
    folder = Path(os.path.expanduser(m.pretrained))
    if not (folder / "model_index.json").is_file():
        return None

    def read(name: str) -> dict | None:
        path = folder / name / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    denoiser = read("unet") or read("transformer")
    return denoiser, read("vae"), f"model.pretrained ({m.pretrained})"


def _check_resolution(cfg: DictConfig, resolutions: dict[str, int]) -> None:
    """Each `{key: px}` must be a multiple of the pixels one denoiser token spans: the VAE's down-sampling
    (2 per level of an AutoencoderKL) times the denoiser's patch size (FramesAsChannelsUNet, DiT, Wan)."""
    found = _component_configs(cfg)
    if found is None:
        return
    denoiser, vae, where = found
    factor, why = 1, []
    levels = len((vae or {}).get("block_out_channels") or [])
    if levels > 1:
        factor *= 2 ** (levels - 1)
        why.append(f"the VAE down-samples {2 ** (levels - 1)}x")
    patch = (denoiser or {}).get("patch_size")
    if isinstance(patch, (list, tuple)):  # Wan: (frames, height, width)
        patch = max(patch[1:])
    if isinstance(patch, int) and patch > 1:
        factor *= patch
        why.append(f"the denoiser's patch_size is {patch}")
    for key, px in resolutions.items():
        if px % factor:
            raise ConfigError(f"{key}: {px} px is not a multiple of {factor} ({' and '.join(why)}, in {where})")


def _check_latent_cache(cfg: DictConfig, schema) -> None:
    """A latent cache as data.shards fixes frames, resolution and the caption embeddings; it is not a video source."""
    from .data.latent_cache import MANIFEST, read_manifest  # it imports this module

    cache = read_manifest(cfg.data.shards)
    if schema is LatentCacheStageSchema:
        if cache is not None:
            raise ConfigError(f"data.shards: {cfg.data.shards!r} is already a latent cache; point it at the videos")
        out = Path(cfg.stage.out)
        if out.exists() and not (out / MANIFEST).is_file():
            raise ConfigError(f"stage.out: {str(out)!r} exists and is not a latent cache (no {MANIFEST}); "
                              f"choose a new folder")
    if schema is DenoiseStageSchema and cache is not None:
        if cfg.stage.train_text_encoder:
            raise ConfigError("stage.train_text_encoder: data.shards is a latent cache, which holds fixed caption "
                              "embeddings; set it false")
        for i, phase in enumerate(cfg.stage.curriculum):
            if (phase.frames, phase.resolution) != (cache["frames"], cache["resolution"]):
                raise ConfigError(f"stage.curriculum[{i}]: {phase.frames} frames at {phase.resolution} px, but the "
                                  f"latent cache holds {cache['frames']} frames at {cache['resolution']} px")


def _check_literal_secrets(cfg: DictConfig) -> None:
    """A secret-named key (`*token`, `*api_key`, `*secret`, `*password`, ...: lifecycle.secrets) must get its value
    from the environment: a literal value is in the command line, which Hydra, the shell's history and wandb's run
    metadata record as typed."""
    from .secrets import secret_paths  # it imports Hydra's runtime config

    for path, raw in secret_paths(OmegaConf.to_container(cfg, resolve=False)):
        if raw and "${" not in raw:
            raise ConfigError(f"{path}: a literal secret in the config; pass it from an environment variable: "
                              f"{path}=${{oc.env:YOUR_VARIABLE}}")


def validate(cfg: DictConfig) -> DictConfig:
    """Typed, checked copy of `cfg`; raises ConfigError naming the first bad key."""
    cfg = cfg.copy()
    _check_literal_secrets(cfg)
    _check_top_level(cfg)
    for section, schema in SECTION_SCHEMAS.items():
        cfg[section] = _typed(section, schema, cfg[section])
    schema = STAGE_SCHEMAS.get(cfg.stage.get("name"))
    if schema is None:
        raise ConfigError(f"stage.name: {cfg.stage.get('name')!r} is not one of {list(STAGE_SCHEMAS)}")
    cfg.stage = _typed("stage", schema, cfg.stage)
    for key in OmegaConf.missing_keys(cfg):
        raise ConfigError(f"{key}: missing value")

    pretrained = cfg.model.pretrained
    if pretrained and _looks_local(pretrained) and not _later(pretrained) and not os.path.isdir(os.path.expanduser(pretrained)):
        raise ConfigError(f"model.pretrained: no such folder {pretrained!r}")
    if not pretrained and cfg.model.denoiser is None:
        raise ConfigError("model.denoiser: set it, or model.pretrained")
    resume = cfg.trainer.resume
    if resume not in (None, "last") and not os.path.exists(resume):
        raise ConfigError(f"trainer.resume: no checkpoint at {resume!r} (use 'last' or a .ckpt path)")
    _choice("trainer.precision", cfg.trainer.precision, PRECISIONS)
    _choice("trainer.profiler", cfg.trainer.profiler, PROFILERS)
    if not os.path.exists(cfg.data.shards) and cfg.data.generate is None and not _later(cfg.data.shards):
        raise ConfigError(f"data.shards: {cfg.data.shards!r} does not exist (and data.generate is not set)")
    _choice("data.split", cfg.data.split, SPLITS)
    from .data.latent_cache import read_manifest  # it imports this module

    if os.path.isdir(cfg.data.shards) and read_manifest(cfg.data.shards) is None:
        try:
            list_shards(cfg.data.shards)
        except FileNotFoundError as e:
            raise ConfigError(f"{e} (the folder holds no *.tar)") from None
    _check_ranges(cfg)
    if cfg.data.balance is not None and not (isinstance(cfg.data.balance, DictConfig) and cfg.data.balance.get("key")):
        raise ConfigError("data.balance.key: required when data.balance is set ({key: field, classes: [values]})")
    _check_outputs(cfg.outputs)
    if schema is LatentCacheStageSchema:
        _choice("stage.dtype", cfg.stage.dtype, ("float32", "float16"))

    if schema is DenoiseStageSchema:
        obj = cfg.stage.objective
        _choice("stage.objective.loss_space", obj.loss_space, [k for k in PREDICTION_KINDS if k != "flow"])
        _choice("stage.objective.flow_timesteps", obj.flow_timesteps, FLOW_T_SCHEMES)
        _choice("stage.guard.action", cfg.stage.guard.action, ("skip", "stop"))
        for i, phase in enumerate(cfg.stage.curriculum):
            for k in ("resolution", "frames", "batch_size", "steps"):
                if phase[k] <= 0:
                    raise ConfigError(f"stage.curriculum[{i}].{k}: must be positive, got {phase[k]}")
        select = cfg.stage.select
        for rule in select or {}:
            if rule not in ("min", "where", "keys"):
                raise ConfigError(f"stage.select.{rule}: unknown rule (min, where or keys)")
        if select and select.get("keys") and not os.path.isfile(os.path.expanduser(select["keys"])):
            raise ConfigError(f"stage.select.keys: no key list {select['keys']!r}")
        val = cfg.stage.validation
        if val.every_n_steps < 0:
            raise ConfigError(f"stage.validation.every_n_steps: must be >= 0 (0: only at the end), got {val.every_n_steps}")
        _choice("stage.validation.mode", val.mode, ("min", "max"))
        if val.metrics:
            _check_metrics(cfg)
        if val.best:
            _choice("stage.validation.best", val.best, [f"val/{k}" for k in _validation_scores(cfg)])
    if schema is VaderStageSchema:
        _check_prompts(cfg, "train", "test")
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
    if schema is DPOStageSchema:
        st = cfg.stage
        pairs = os.path.expanduser(st.pairs)
        if not _later(pairs) and (not os.path.isdir(pairs) or not any(f.endswith(".tar") for f in os.listdir(pairs))):
            raise ConfigError(f"stage.pairs: no pair shards (*.tar) in {st.pairs!r}")
        if st.evaluation is not None:
            _check_prompts(cfg, "train", "test")
        for k in ("steps", "batch_size", "frames", "resolution", "beta", "accumulate"):
            if st[k] <= 0:
                raise ConfigError(f"stage.{k}: must be positive, got {st[k]}")
        _choice("stage.timesteps.flow", st.timesteps.flow, FLOW_T_SCHEMES)
        _choice("stage.guard.action", st.guard.action, ("skip", "stop"))
        _choice("stage.export", st.export, ("merge", "adapter"))
    if "curve" in cfg.stage:
        if cfg.stage.curve.every_n_steps < 0:
            raise ConfigError(f"stage.curve.every_n_steps: must be >= 0 (0: off), got {cfg.stage.curve.every_n_steps}")
        if cfg.stage.curve.every_n_steps:
            _check_prompts(cfg, "train")
    if schema is EvalStageSchema:
        _check_eval(cfg)
    if schema is CurateStageSchema:
        _check_curate(cfg)
    if schema is DDPOStageSchema:
        _check_ddpo(cfg)
    if schema is PreferencesStageSchema:
        _check_preferences(cfg)
    if schema is RewardModelStageSchema:
        _check_reward_model(cfg)
    if _uses_reward(cfg, schema):
        _check_rewards(cfg, backprop=schema is VaderStageSchema)
    if schema in (DPOStageSchema, DDPOStageSchema, LatentCacheStageSchema) or (
            schema is PreferencesStageSchema and cfg.stage.source == "sampled"):
        _check_text_to_video(cfg, ddim=schema is DDPOStageSchema)
    if schema in (DenoiseStageSchema, LatentCacheStageSchema):
        _check_latent_cache(cfg, schema)
    if schema is DenoiseStageSchema:
        _check_resolution(cfg, {f"stage.curriculum[{i}].resolution": p.resolution
                                for i, p in enumerate(cfg.stage.curriculum)})
    if schema in (VaderStageSchema, DPOStageSchema, DDPOStageSchema, LatentCacheStageSchema) or (
            schema is PreferencesStageSchema and cfg.stage.source == "sampled"):
        _check_resolution(cfg, {"stage.resolution": cfg.stage.resolution})
    if cfg.stage.get("export") == "adapter" and cfg.stage.get("lora") is None:
        raise ConfigError("stage.export: 'adapter' saves a LoRA adapter, but stage.lora is null (full fine-tuning); "
                          "use merge")
    if cfg.stage.get("lora_formats"):
        _check_lora_formats(cfg)
    if schema in TRAINER_STAGES:  # last: importing Lightning's loggers takes seconds
        if isinstance(cfg.trainer.strategy, DictConfig):
            _target("trainer.strategy", cfg.trainer.strategy)
        for name, entry in (cfg.get("logger") or {}).items():
            _target(f"logger.{name}", entry)
    return cfg


def _uses_reward(cfg: DictConfig, schema) -> bool:
    """Whether the stage builds `cfg.reward`."""
    st = cfg.stage
    if schema is DPOStageSchema:
        return st.evaluation is not None or st.curve.every_n_steps > 0
    if schema is PreferencesStageSchema:
        return st.source == "sampled" and not st.annotator
    return schema in (VaderStageSchema, DDPOStageSchema, EvalStageSchema)


def _check_outputs(out: DictConfig) -> None:
    from .outputs import MAX_MESSAGE_BYTES, METHODS, MIN_SIZE  # the outputs package imports this module

    mark = out.watermark
    if not 1 <= len(mark.message.encode()) <= MAX_MESSAGE_BYTES:
        raise ConfigError(f"outputs.watermark.message: must be 1 to {MAX_MESSAGE_BYTES} bytes (UTF-8), "
                          f"got {mark.message!r}")
    _choice("outputs.watermark.method", mark.method, METHODS)
    if mark.min_size < MIN_SIZE:
        raise ConfigError(f"outputs.watermark.min_size: must be >= {MIN_SIZE} (imwatermark needs 256x256 pixels), "
                          f"got {mark.min_size}")
    if out.filter is not None:
        _target("outputs.filter", out.filter)
        _check_model_paths("outputs.filter", out.filter, ("model",))


def _check_curate(cfg: DictConfig) -> None:
    st = cfg.stage
    if not os.path.exists(st.input) and st.generate is None and not _later(st.input):
        raise ConfigError(f"stage.input: {st.input!r} does not exist (and stage.generate is not set)")
    if st.truth is not None and not os.path.exists(st.truth) and st.generate is None:
        raise ConfigError(f"stage.truth: no file {st.truth!r}")
    for key in ("unit_size", "workers", "dedup.frames", "dedup.size"):
        if OmegaConf.select(st, key) < 1:
            raise ConfigError(f"stage.{key}: must be >= 1, got {OmegaConf.select(st, key)}")
    names = list(st.aesthetic)
    unknown = [n for n in names if not (Path(CONF_DIR) / "reward" / f"{n}.yaml").is_file()]
    if unknown:
        raise ConfigError(f"stage.aesthetic: no reward {unknown[0]!r} in conf/reward "
                          f"({sorted(p.stem for p in (Path(CONF_DIR) / 'reward').glob('*.yaml'))})")
    for key in ("recaption", "safety"):
        if st[key] is not None:
            _target(f"stage.{key}", st[key])
            _check_model_paths(f"stage.{key}", st[key], ("model",))


def _check_prompts(cfg: DictConfig, *names: str) -> None:
    """Each prompt set a stage samples is a non-empty list, or a text file with one prompt per line."""
    for name in names:
        spec = cfg.get("prompts", {}).get(name)
        if spec is None:
            raise ConfigError(f"prompts.{name}: missing (a list of prompts or a text file)")
        try:
            load_prompts(spec, f"prompts.{name}")
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None


_ABSENT = object()
# (key, whether a value can work, what it must be): checked wherever the key exists
RANGES = (
    ("trainer.max_steps", lambda v: v is None or v >= 1, ">= 1, or null for the stage's own length"),
    ("stage.optimizer.lr", lambda v: v >= 0, ">= 0"),
    ("stage.optimizer.weight_decay", lambda v: v >= 0, ">= 0"),
    ("stage.lora.rank", lambda v: v >= 1, ">= 1"),
    ("stage.lora.alpha", lambda v: v > 0, "> 0"),
    ("stage.ema.decay", lambda v: v is None or 0 <= v < 1, "in [0, 1), or null for no EMA"),
    ("stage.gradient_clip", lambda v: v is None or v > 0, "> 0, or null for no clipping"),
    ("stage.guard.max_skips_in_a_row", lambda v: v >= 1, ">= 1"),
    ("data.decoded_cache_mb", lambda v: v >= 0, ">= 0 (0 turns the cache off)"),
    ("data.max_bad_in_a_row", lambda v: v >= 1, ">= 1"),
    ("data.max_bad_share", lambda v: 0 < v <= 1, "in (0, 1] (1: never stop for the share)"),
)


def _check_ranges(cfg: DictConfig) -> None:
    for key, works, what in RANGES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not works(value):
            raise ConfigError(f"{key}: must be {what}, got {value}")


def _check_metrics(cfg: DictConfig) -> None:
    m = cfg.metrics
    if m.features.thumbnail <= 0:
        raise ConfigError(f"metrics.features.thumbnail: must be positive, got {m.features.thumbnail}")
    _check_model_paths("metrics.features", m.features, ("model",))
    if m.clip_score:
        _check_model_paths("metrics", m, ("clip_score",))
    if m.reference.n < 2:
        raise ConfigError(f"metrics.reference.n: FID needs at least 2 reference videos, got {m.reference.n}")
    if m.reference.shards is not None:
        from .data.shards import list_shards

        try:
            list_shards(m.reference.shards, "metrics.reference.shards")
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(_one_line(e)) from None
    if m.kid is not None and min(m.kid.subset_size, m.kid.subsets) <= 0:
        raise ConfigError(f"metrics.kid: subset_size and subsets must be positive, got {dict(m.kid)}")


def _validation_scores(cfg: DictConfig) -> list[str]:
    """The scores `stage.validation` logs as val/<name> (lifecycle.callbacks.validation)."""
    from .data.oracle import ORACLE_COLUMNS

    val, m = cfg.stage.validation, cfg.metrics
    scores = list(ORACLE_COLUMNS) if val.oracle else []
    if val.metrics:
        scores += ["temporal_consistency", "motion", *(["fid"] if m.fid else []), *(["kid"] if m.kid else []),
                   *(["clip_score"] if m.clip_score else [])]
    return scores


def _check_eval(cfg: DictConfig) -> None:
    if not cfg.stage.models:
        raise ConfigError("stage.models: list the export folders (or run directories) to evaluate")
    for i, path in enumerate(cfg.stage.models):
        folder = os.path.expanduser(path)
        if not _later(folder) and not any(os.path.isfile(os.path.join(f, "model_index.json"))
                                          for f in (folder, os.path.join(folder, "export"))):
            raise ConfigError(f"stage.models[{i}]: no exported bundle in {path!r} (nor in its export/)")
    _check_prompts(cfg, "train", "test")
    if cfg.stage.condition != "synthetic" and not os.path.isdir(os.path.expanduser(cfg.stage.condition)):
        raise ConfigError(f"stage.condition: {cfg.stage.condition!r} is neither 'synthetic' nor a folder of images")
    if cfg.stage.metrics:
        _check_metrics(cfg)


def _check_ddpo(cfg: DictConfig) -> None:
    _check_prompts(cfg, "train", "test")
    st, smp, ppo = cfg.stage, cfg.stage.sample, cfg.stage.ppo
    for key, value in (("epochs", st.epochs), ("frames", st.frames), ("resolution", st.resolution),
                       ("sample.batch_size", smp.batch_size), ("sample.num_batches", smp.num_batches),
                       ("sample.num_steps", smp.num_steps), ("sample.eta", smp.eta),
                       ("ppo.inner_epochs", ppo.inner_epochs), ("ppo.batch_size", ppo.batch_size),
                       ("ppo.accumulate", ppo.accumulate), ("ppo.clip_range", ppo.clip_range),
                       ("ppo.adv_clip_max", ppo.adv_clip_max)):
        if value <= 0:
            raise ConfigError(f"stage.{key}: must be positive, got {value}")
    if not 0 < ppo.timestep_fraction <= 1:
        raise ConfigError(f"stage.ppo.timestep_fraction: must be in (0, 1], got {ppo.timestep_fraction}")
    samples = smp.batch_size * smp.num_batches
    if samples % ppo.batch_size or (samples // ppo.batch_size) % ppo.accumulate:
        raise ConfigError(f"stage.ppo.batch_size: {ppo.batch_size} x accumulate {ppo.accumulate} must divide the "
                          f"{samples} samples of an epoch (sample.batch_size x sample.num_batches)")
    stats = st.per_prompt_stats
    if stats is not None and not 1 <= stats.min_count <= stats.buffer_size:
        raise ConfigError(f"stage.per_prompt_stats.min_count: must be in 1..buffer_size ({stats.buffer_size}), "
                          f"got {stats.min_count}")
    _choice("stage.export", st.export, ("merge", "adapter"))


def _check_lora_formats(cfg: DictConfig) -> None:
    """Each of stage.lora_formats exists and suits the denoiser (kohya: UNets; comfyui: Wan), before training."""
    from .models.lora_formats import FORMATS  # diffusers: imported only when the key is used

    formats = list(cfg.stage.lora_formats)
    for fmt in formats:
        _choice("stage.lora_formats", fmt, FORMATS)
    if cfg.stage.get("lora") is None:
        raise ConfigError("stage.lora_formats: these are LoRA layouts, but stage.lora is null (full fine-tuning)")
    denoiser = (cfg.model.get("denoiser") or {}).get("_target_", "")
    index = os.path.join(os.path.expanduser(str(cfg.model.get("pretrained") or "")), "model_index.json")
    if cfg.model.get("pretrained") and os.path.isfile(index):
        spec = json.loads(Path(index).read_text())
        denoiser = " ".join(str(spec.get(part)) for part in ("unet", "transformer") if spec.get(part))
    elif cfg.model.get("pretrained"):
        return  # a hub id: checked when the export is written
    wan = "WanTransformer3DModel" in denoiser
    for fmt in formats:
        if (fmt == "comfyui") != wan:
            raise ConfigError(f"stage.lora_formats: {fmt!r} is for {'UNet' if fmt == 'kohya' else 'Wan'} denoisers, "
                              f"this model's is {denoiser.split('.')[-1] or 'unknown'} (use "
                              f"{'comfyui' if wan else 'kohya'})")


def _check_preferences(cfg: DictConfig) -> None:
    st = cfg.stage
    _choice("stage.source", st.source, ("sampled", "pickapic"))
    _choice("stage.strategy", st.strategy, ("best_worst", "all"))
    for k in ("repeats", "frames", "resolution", "num_steps", "batch_size", "shard_size"):
        if st[k] <= 0:
            raise ConfigError(f"stage.{k}: must be positive, got {st[k]}")
    if st.candidates < 2:
        raise ConfigError(f"stage.candidates: a pair needs at least 2 candidates, got {st.candidates}")
    if st.min_margin < 0:
        raise ConfigError(f"stage.min_margin: must be >= 0, got {st.min_margin}")
    if st.source == "pickapic":
        if not st.path or not os.path.isfile(os.path.expanduser(st.path)):
            raise ConfigError(f"stage.path: no Pick-a-Pic JSON-lines file {st.path!r}")
        return
    _check_prompts(cfg, "train")
    if st.annotator:
        _import("stage.annotator", st.annotator)


def _check_reward_model(cfg: DictConfig) -> None:
    st = cfg.stage
    if not _later(st.pairs) and not os.path.isfile(os.path.join(os.path.expanduser(st.pairs), "dataset.json")):
        raise ConfigError(f"stage.pairs: {st.pairs!r} is not a preference-pair folder (no dataset.json)")
    _choice("stage.architecture", st.architecture, ("conv", "clip"))
    if st.architecture == "clip":
        _check_model_paths("stage.clip", st.clip, ("backbone", "tokenizer"))
    for k in ("steps", "batch_size", "eval_batch_size", "frames", "resolution"):
        if st[k] is not None and st[k] <= 0:
            raise ConfigError(f"stage.{k}: must be positive, got {st[k]}")
    if not 0 < st.val_fraction < 1:
        raise ConfigError(f"stage.val_fraction: must be in (0, 1), got {st.val_fraction}")
