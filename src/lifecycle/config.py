"""Config schemas of the sections (trainer, model, data, metrics, outputs) and start-up validation: a bad key
stops the run before any compute.

Each section of the composed Hydra config is merged into a typed schema (OmegaConf structured configs), the
`stage` section into the `Config` of its stage module (lifecycle.stages.base), so wrong types and unknown keys
are reported with their full key. Files and
folders are looked up, `_target_`s (rewards, loggers, captioners) imported without being built and
their arguments matched against the signature, and stage/model/reward combinations that cannot work
refused, each as one line `key: what is wrong`.
"""

import importlib
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
from .data.latent_cache import read_manifest
from .data.prompts import load_prompts
from .data.shards import SPLITS, list_shards
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
    gif_previews: Optional[int] = 8  # an mp4 per sample; a GIF of the first n of each set too (null: all)



SECTION_SCHEMAS = {"trainer": TrainerSchema, "model": ModelSchema, "data": DataSchema, "outputs": OutputsSchema,
                   "metrics": MetricsSchema}


def _typed(section: str, schema, node) -> DictConfig:
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        key = f"{section}.{e.full_key}" if getattr(e, "full_key", None) else section
        raise ConfigError(f"{key}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None  # not the key again


def choice(key: str, value, choices) -> None:
    if value is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")


def positive(node: DictConfig, *keys: str, prefix: str = "stage") -> None:
    """Each of `keys` (dotted, inside `node`) is positive where set."""
    for key in keys:
        value = OmegaConf.select(node, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{prefix}.{key}: must be positive, got {value}")


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


def is_later(path) -> bool:
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


def one_line(e: Exception) -> str:
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


def import_path(key: str, path: str):
    """The object at dotted `path`, imported as hydra's instantiate and get_method do (without their error log)."""
    from hydra._internal.utils import _locate

    try:
        return _locate(path)
    except Exception as e:  # noqa: BLE001 - any import failure is a bad dotted path
        raise ConfigError(f"{key}: cannot import {path!r} ({one_line(e.__cause__ or e)})") from None


def check_target(key: str, node, skip=()):
    """Import `node._target_` (without calling it); check `node`'s other keys against its signature."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not isinstance(target, str):
        raise ConfigError(f"{key}._target_: missing (the dotted path of what to build)")
    obj = import_path(f"{key}._target_", target)
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


def check_model_paths(key: str, node, names=MODEL_PATH_KEYS) -> None:
    """Pretrained weights named by a path (not a hub id 'org/name') must be an existing folder."""
    for name in names:
        value = node.get(name)
        if (isinstance(value, str) and _looks_local(value) and not is_later(value)
                and not os.path.isdir(os.path.expanduser(value))):
            raise ConfigError(f"{key}.{name}: no such folder {value!r} (a hub id is 'org/name')")


def check_rewards(cfg: DictConfig, backprop: bool) -> None:
    """Every `reward.<name>`: an importable Reward whose arguments fit, a number for weight, existing weight
    files and folders; a stage that backpropagates through the reward needs every term differentiable."""
    if not cfg.get("reward"):
        raise ConfigError("reward: none selected (reward=<name> or reward=[a,b], names from conf/reward)")
    for name, entry in cfg.reward.items():
        key = f"reward.{name}"
        obj = check_target(key, entry, skip=("weight",))
        cls = obj.__self__ if inspect.ismethod(obj) else obj  # a classmethod factory: LearnedReward.from_pretrained
        if isinstance(cls, type) and not issubclass(cls, Reward):
            raise ConfigError(f"{key}._target_: {entry._target_} is not a lifecycle Reward")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{key}.weight: must be a number, got {weight!r}")
        check_model_paths(key, entry)
        if entry.get("head") is not None and not os.path.isfile(os.path.expanduser(entry.head)):
            raise ConfigError(f"{key}.head: no weights file {entry.head!r}")
        if entry.get("path") is not None and not is_later(entry.path) and not os.path.isdir(os.path.expanduser(entry.path)):
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


def check_text_to_video(cfg: DictConfig, ddim: bool) -> None:
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


def check_resolution(cfg: DictConfig, resolutions: dict[str, int]) -> None:
    """Each `{key: px}` must be a multiple of the pixels one denoiser token spans: the VAE's down-sampling
    (2 per level of an AutoencoderKL) times the denoiser's patch size (FramesAsChannelsUNet, DiT, Wan)."""
    found = _component_configs(cfg) if resolutions else None
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


def _check_literal_secrets(cfg: DictConfig) -> None:
    """A secret-named key (`*token`, `*api_key`, `*secret`, `*password`, ...: lifecycle.secrets) must get its value
    from the environment: a literal value is in the command line, which Hydra, the shell's history and wandb's run
    metadata record as typed."""
    from .secrets import secret_paths  # it imports Hydra's runtime config

    for path, raw in secret_paths(OmegaConf.to_container(cfg, resolve=False)):
        if raw and "${" not in raw:
            raise ConfigError(f"{path}: a literal secret in the config; pass it from an environment variable: "
                              f"{path}=${{oc.env:YOUR_VARIABLE}}")


def stage_config(stage: DictConfig) -> type:
    """The `Config` dataclass of the stage: the one beside the function `stage.run` names, else (a run function
    standing in for a stage's) that of `lifecycle.stages.<stage.name>`."""
    run = stage.get("run")
    if not isinstance(run, str) or "." not in run:
        raise ConfigError(f"stage.run: {run!r} is not the dotted path of a stage's run function")
    module = import_path("stage.run", run.rpartition(".")[0])
    config = getattr(module, "Config", None)
    if not isinstance(config, type) and isinstance(stage.get("name"), str):
        try:
            config = getattr(importlib.import_module(f"lifecycle.stages.{stage.name}"), "Config", None)
        except ImportError:
            config = None
    if not isinstance(config, type):
        raise ConfigError(f"stage.run: {module.__name__} has no stage Config (lifecycle.stages.base), nor is "
                          f"stage.name {stage.get('name')!r} a stage of lifecycle.stages")
    return config


def validate(cfg: DictConfig) -> DictConfig:
    """Typed, checked copy of `cfg`; raises ConfigError naming the first bad key.

    The stage's `Config` (beside its `run`) types `cfg.stage`, checks what only that stage knows
    (`Config.check`), and declares what it is (uses a reward, text-to-video only, ...: lifecycle.stages.base)
    for the checks every stage of that kind gets here.
    """
    cfg = cfg.copy()
    _check_literal_secrets(cfg)
    _check_top_level(cfg)
    for section, schema in SECTION_SCHEMAS.items():
        cfg[section] = _typed(section, schema, cfg[section])
    schema = stage_config(cfg.stage)
    cfg.stage = _typed("stage", schema, cfg.stage)
    for key in OmegaConf.missing_keys(cfg):
        raise ConfigError(f"{key}: missing value")

    pretrained = cfg.model.pretrained
    if pretrained and _looks_local(pretrained) and not is_later(pretrained) and not os.path.isdir(os.path.expanduser(pretrained)):
        raise ConfigError(f"model.pretrained: no such folder {pretrained!r}")
    if not pretrained and cfg.model.denoiser is None:
        raise ConfigError("model.denoiser: set it, or model.pretrained")
    resume = cfg.trainer.resume
    if resume not in (None, "last") and not os.path.exists(resume):
        raise ConfigError(f"trainer.resume: no checkpoint at {resume!r} (use 'last' or a .ckpt path)")
    choice("trainer.precision", cfg.trainer.precision, PRECISIONS)
    choice("trainer.profiler", cfg.trainer.profiler, PROFILERS)
    if not os.path.exists(cfg.data.shards) and cfg.data.generate is None and not is_later(cfg.data.shards):
        raise ConfigError(f"data.shards: {cfg.data.shards!r} does not exist (and data.generate is not set)")
    choice("data.split", cfg.data.split, SPLITS)
    if os.path.isdir(cfg.data.shards) and read_manifest(cfg.data.shards) is None:
        try:
            list_shards(cfg.data.shards)
        except FileNotFoundError as e:
            raise ConfigError(f"{e} (the folder holds no *.tar)") from None
    _check_ranges(cfg)
    if cfg.data.balance is not None and not (isinstance(cfg.data.balance, DictConfig) and cfg.data.balance.get("key")):
        raise ConfigError("data.balance.key: required when data.balance is set ({key: field, classes: [values]})")
    _check_outputs(cfg.outputs)
    if "guard" in cfg.stage:
        choice("stage.guard.action", cfg.stage.guard.action, ("skip", "stop"))
    if schema.exports_adapter:
        choice("stage.export", cfg.stage.export, ("merge", "adapter"))

    schema.check(cfg)

    if schema.uses_reward(cfg.stage):
        check_rewards(cfg, backprop=schema.backprop_through_reward)
    if schema.text_to_video_only(cfg.stage):
        check_text_to_video(cfg, ddim=schema.ddim_only)
    check_resolution(cfg, schema.resolutions(cfg.stage))
    if schema.exports_adapter:
        if cfg.stage.export == "adapter" and cfg.stage.lora is None:
            raise ConfigError("stage.export: 'adapter' saves a LoRA adapter, but stage.lora is null (full fine-tuning); "
                              "use merge")
        if cfg.stage.lora_formats:
            check_lora_formats(cfg)
    if schema.trains_with_lightning:  # last: importing Lightning's loggers takes seconds
        if isinstance(cfg.trainer.strategy, DictConfig):
            check_target("trainer.strategy", cfg.trainer.strategy)
        for name, entry in (cfg.get("logger") or {}).items():
            check_target(f"logger.{name}", entry)
    return cfg


def _check_outputs(out: DictConfig) -> None:
    from .outputs import MAX_MESSAGE_BYTES, METHODS, MIN_SIZE  # the outputs package imports this module

    mark = out.watermark
    if not 1 <= len(mark.message.encode()) <= MAX_MESSAGE_BYTES:
        raise ConfigError(f"outputs.watermark.message: must be 1 to {MAX_MESSAGE_BYTES} bytes (UTF-8), "
                          f"got {mark.message!r}")
    choice("outputs.watermark.method", mark.method, METHODS)
    if mark.min_size < MIN_SIZE:
        raise ConfigError(f"outputs.watermark.min_size: must be >= {MIN_SIZE} (imwatermark needs 256x256 pixels), "
                          f"got {mark.min_size}")
    if out.gif_previews is not None and out.gif_previews < 0:
        raise ConfigError(f"outputs.gif_previews: must be >= 0 (null: a GIF of every sample), got {out.gif_previews}")
    if out.filter is not None:
        check_target("outputs.filter", out.filter)
        check_model_paths("outputs.filter", out.filter, ("model",))


def check_prompts(cfg: DictConfig, *names: str) -> None:
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


def check_metrics(cfg: DictConfig) -> None:
    m = cfg.metrics
    if m.features.thumbnail <= 0:
        raise ConfigError(f"metrics.features.thumbnail: must be positive, got {m.features.thumbnail}")
    check_model_paths("metrics.features", m.features, ("model",))
    if m.clip_score:
        check_model_paths("metrics", m, ("clip_score",))
    if m.reference.n < 2:
        raise ConfigError(f"metrics.reference.n: FID needs at least 2 reference videos, got {m.reference.n}")
    if m.reference.shards is not None:
        from .data.shards import list_shards

        try:
            list_shards(m.reference.shards, "metrics.reference.shards")
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(one_line(e)) from None
    if m.kid is not None and min(m.kid.subset_size, m.kid.subsets) <= 0:
        raise ConfigError(f"metrics.kid: subset_size and subsets must be positive, got {dict(m.kid)}")


def check_lora_formats(cfg: DictConfig) -> None:
    """Each of stage.lora_formats exists and suits the denoiser (kohya: UNets; comfyui: Wan), before training."""
    from .models.lora_formats import FORMATS  # diffusers: imported only when the key is used

    formats = list(cfg.stage.lora_formats)
    for fmt in formats:
        choice("stage.lora_formats", fmt, FORMATS)
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
