"""ModelBundle: denoiser + VAE + text or image encoder + noise schedule, saved as one folder.

The folder follows the diffusers pipeline layout (`model_index.json` plus one subfolder per
component), so a hub id such as a ModelScope or Wan repository and a bundle exported by a
stage load through the same `from_pretrained`.
"""

import importlib
import json
import os
import zipfile
from itertools import chain
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
    UNet3DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoTokenizer

from ..diffusion.sampling import sample
from .folded_unet import FramesAsChannelsUNet
from .image_to_video import ImageConditioning, ImageToVideoMixin, denoise_spatio_temporal
from .lora import ADAPTER_SUFFIX, adapter_folder, load_adapter, save_denoiser
from .text import encode_prompts

DENOISER_FOLDERS = ("unet", "transformer")
COMPONENTS = (*DENOISER_FOLDERS, "vae", "text_encoder", "image_encoder", "scheduler", "tokenizer")
FRAMEWISE_VAES = (AutoencoderKL, AutoencoderKLTemporalDecoder)  # 2D encoders: frames are encoded one by one
LINEAGE_FILE = "lineage.json"
TRUSTED_LIBRARIES = ("diffusers", "transformers", "lifecycle")  # model_index.json classes importable without trust
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
ALIGNMENT = 64  # bytes: what torch's CPU allocator gives, and what MKL needs for reproducible results


def realign(module: nn.Module) -> None:
    """Give every CPU weight of `module` that lies off a 64-byte boundary an aligned copy.

    diffusers and transformers load safetensors weights as views into the file's buffer, at whatever byte offset
    the file stores them (often only 4-byte aligned). MKL, torch's CPU BLAS, sums in a different order for
    unaligned operands (its reproducibility guarantee requires 64-byte alignment), so a model reloaded from its
    own export gave outputs that differed from the saved model's in the last bits. Aligned copies make a reload
    compute bit-identically.
    """
    for tensor in chain(module.parameters(), module.buffers()):
        if tensor.device.type == "cpu" and tensor.data_ptr() % ALIGNMENT:
            tensor.data = tensor.data.clone()


def _library_of(obj) -> str:
    top = type(obj).__module__.split(".")[0]
    return top if hasattr(importlib.import_module(top), type(obj).__name__) else type(obj).__module__


def component_class(index_path: str, name: str, library: str, class_name: str, trust_remote_code: bool = False):
    """The class model_index.json names for component `name`; importing a module runs its code, so only the
    TRUSTED_LIBRARIES are imported unless `trust_remote_code`."""
    if library.split(".")[0] not in TRUSTED_LIBRARIES and not trust_remote_code:
        raise ValueError(f"{index_path}: model_index.json loads {name} with {library}.{class_name}; only "
                         f"{', '.join(TRUSTED_LIBRARIES)} classes load unless model.trust_remote_code is true "
                         f"(importing {library!r} runs its code)")
    return getattr(importlib.import_module(library), class_name)


def check_pickles(folder: Path) -> None:
    """Vet a component folder's pickled weights (.bin/.pt/...) when it has no safetensors, which would be preferred.

    They are loaded as `torch.load(weights_only=True)` loads them (tensors and plain containers only, to the
    meta device), so a pickle that would run code is refused here, whatever loader the library uses next.
    """
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    for path in sorted(f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES):
        try:
            torch.load(path, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:  # noqa: BLE001 - UnpicklingError, or whatever a malformed file raises
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            reason = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")), lines[0])
            raise ValueError(f"{path}: refused to load pickled weights that torch.load(weights_only=True) rejects "
                             f"({reason.split('. Please')[0]}); use safetensors weights") from None


def training_scheduler(scheduler):
    """The training noise schedule for any loaded scheduler: flow matching, EDM sigmas or DDPM betas."""
    cfg = scheduler.config
    if isinstance(scheduler, EulerDiscreteScheduler) and cfg.get("timestep_type") == "continuous":
        # SVD-style: the denoiser is conditioned on 0.25·log σ, which no DDPM timestep expresses.
        return scheduler
    if type(scheduler).__name__.startswith("FlowMatch") or cfg.get("prediction_type") == "flow_prediction":
        shift = cfg.get("shift", cfg.get("flow_shift", 1.0))
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=shift)
    return scheduler if isinstance(scheduler, DDPMScheduler) else DDPMScheduler.from_config(cfg)


class ModelBundle(ImageToVideoMixin, nn.Module):
    """Everything a stage needs to train or sample one diffusion model.

    Videos are float (B, F, C, H, W) in [0, 1]; latents are (B, C, F, h, w) as diffusers'
    video models take them (an image model sees F = 1). `vae=None` means pixel space.
    Text-to-video bundles have a text encoder and tokenizer; image-to-video (SVD) bundles an
    `image_encoder` and `conditioning` (micro-conditioning values, see image_to_video) instead.
    """

    def __init__(self, denoiser: nn.Module, text_encoder: nn.Module | None, tokenizer, scheduler,
                 vae: nn.Module | None = None, image_encoder: nn.Module | None = None,
                 conditioning: dict | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.vae = vae
        self.tokenizer = tokenizer
        self.scheduler = training_scheduler(scheduler)
        self.conditioning = ImageConditioning(**(conditioning or {}))

    # -- properties ---------------------------------------------------------------------------
    @property
    def is_flow(self) -> bool:
        return isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler)

    @property
    def prediction_type(self) -> str:
        """What the denoiser outputs: epsilon, v_prediction, sample (x0) or flow (velocity)."""
        return "flow" if self.is_flow else self.scheduler.config.prediction_type

    @property
    def fixed_frames(self) -> int | None:
        """Frame count the architecture requires (1 for image models), None if any count works."""
        if isinstance(self.denoiser, FramesAsChannelsUNet):
            return self.denoiser.config.num_frames
        if isinstance(self.denoiser, (UNet2DConditionModel, PixArtTransformer2DModel)):
            return 1
        return None

    @property
    def denoiser_folder(self) -> str:
        return "transformer" if "Transformer" in type(self.denoiser).__name__ else "unet"

    def inference_scheduler(self):
        """A fresh sampling scheduler: Euler for flow and EDM-sigma (SVD) models, DDIM otherwise."""
        if self.is_flow or isinstance(self.scheduler, EulerDiscreteScheduler):
            return type(self.scheduler).from_config(self.scheduler.config)
        return DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")

    # -- encoders -----------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompts(self.tokenizer, self.text_encoder, prompts)

    def _latent_norm(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(shift, scale) with latents = (z - shift) * scale, per the VAE's own config."""
        cfg = self.vae.config
        if cfg.get("latents_mean") is not None:  # Wan-style per-channel statistics
            shape = (1, -1, 1, 1, 1)
            mean = torch.tensor(cfg.latents_mean).view(shape)
            return mean, 1.0 / torch.tensor(cfg.latents_std).view(shape)
        return cfg.get("shift_factor") or 0.0, cfg.get("scaling_factor", 1.0)

    def encode_video(self, video: torch.Tensor, generator: torch.Generator | list | None = None) -> torch.Tensor:
        """(B, F, C, H, W) in [0, 1] -> latents (B, C, F, h, w), a draw from the VAE posterior; `generator`:
        one, or one per sample."""
        if self.vae is None:
            return self.encode_posterior(video)[0]
        return sample_posterior(*self.encode_posterior(video), generator)

    def encode_posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F, C, H, W) in [0, 1] -> the VAE posterior's (mean, std) in normalized latent units, each
        (B, C, F, h, w); in pixel space (no VAE) the pixels in [-1, 1] and a zero std."""
        x = video.permute(0, 2, 1, 3, 4) * 2 - 1
        if self.vae is None:
            return x, torch.zeros_like(x)
        b, c, f, h, w = x.shape
        if isinstance(self.vae, FRAMEWISE_VAES):
            dist = self.vae.encode(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)).latent_dist
            mean, std = (t.reshape(b, f, *t.shape[1:]).permute(0, 2, 1, 3, 4) for t in (dist.mean, dist.std))
        else:
            dist = self.vae.encode(x).latent_dist
            mean, std = dist.mean, dist.std
        shift, scale = self._latent_norm()
        return (mean - _to(shift, mean)) * _to(scale, mean), std * _to(scale, std)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F, h, w) -> video (B, F, C, H, W) in [0, 1]."""
        if self.vae is None:
            x = latents
        else:
            shift, scale = self._latent_norm()
            z = latents / _to(scale, latents) + _to(shift, latents)
            if isinstance(self.vae, FRAMEWISE_VAES):
                b, c, f, h, w = z.shape
                # SVD's temporal decoder mixes each video's `num_frames` consecutive frames.
                kwargs = {"num_frames": f} if isinstance(self.vae, AutoencoderKLTemporalDecoder) else {}
                frames = self.vae.decode(z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), **kwargs).sample
                x = frames.reshape(b, f, *frames.shape[1:]).permute(0, 2, 1, 3, 4)
            else:
                x = self.vae.decode(z).sample
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)

    # -- denoiser -----------------------------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """One denoiser call on latents (B, C, F, h, w); the output has the same shape.

        `cond` is (hidden, pooled) text embeddings, or an ImageCondition's tensors for an SVD
        UNet. Pooled text conditions the timestep embedding where the architecture has a slot
        for it (UNet2D `class_embed_type="projection"`, UNet3D `time_cond_proj_dim`).
        """
        d = self.denoiser
        if isinstance(d, UNetSpatioTemporalConditionModel):
            return denoise_spatio_temporal(d, x_t, timestep, *cond)
        hidden, pooled = cond
        if isinstance(d, UNet2DConditionModel):
            labels = pooled if d.config.class_embed_type == "projection" else None
            return d(x_t[:, :, 0], timestep, hidden, class_labels=labels).sample.unsqueeze(2)
        if isinstance(d, PixArtTransformer2DModel):  # DiT blocks with cross-attention, one frame
            return d(x_t[:, :, 0], encoder_hidden_states=hidden, timestep=timestep, return_dict=False)[0].unsqueeze(2)
        if isinstance(d, FramesAsChannelsUNet):
            labels = pooled if d.unet.config.class_embed_type == "projection" else None
            return d(x_t, timestep, hidden, class_labels=labels).sample
        if isinstance(d, UNet3DConditionModel):
            cond = pooled if d.config.time_cond_proj_dim else None
            return d(x_t, timestep, hidden, timestep_cond=cond).sample
        return d(hidden_states=x_t, timestep=timestep, encoder_hidden_states=hidden, return_dict=False)[0]

    # -- sampling -----------------------------------------------------------------------------
    def latent_shape(self, frames: int, resolution: int | tuple[int, int]) -> tuple[int, int, int, int]:
        """(C, F, h, w) of the latents for a clip of `frames` x `resolution` pixels (an int is square)."""
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        if self.vae is None:
            return (3, frames, height, width)
        cfg = self.vae.config
        if isinstance(self.vae, FRAMEWISE_VAES):
            down = 2 ** (len(cfg.block_out_channels) - 1)
            return (cfg.latent_channels, frames, height // down, width // down)
        if cfg.get("scale_factor_temporal") and cfg.get("z_dim"):  # Wan-style causal 3D VAE (AutoencoderKLWan)
            step, down = cfg.scale_factor_temporal, cfg.scale_factor_spatial
            if (frames - 1) % step:
                raise ValueError(f"{type(self.vae).__name__} encodes clips of 1 + {step}k frames, not {frames}")
            return (cfg.z_dim, (frames - 1) // step + 1, height // down, width // down)
        raise NotImplementedError(f"latent_shape: no rule for {type(self.vae).__name__}")

    def generate(self, prompts: list[str], frames: int, resolution: int, num_steps: int = 25,
                 guidance_scale: float = 3.0, seed: int = 0, batch_size: int = 32, eta: float = 0.0) -> torch.Tensor:
        """Text-to-video sampling -> (B, F, C, H, W) in [0, 1]; prompt i always starts from noise seed `seed + i`."""
        device = next(self.denoiser.parameters()).device
        shape = self.latent_shape(frames, resolution)
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            noise = torch.stack([
                torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + i)) for i in range(len(chunk))
            ]).to(device)
            cond = self.encode_text(chunk)
            uncond = self.encode_text([""] * len(chunk))
            latents = sample(self.denoise, self.inference_scheduler(), noise, cond, uncond, guidance_scale,
                             num_steps, eta, torch.Generator(device).manual_seed(seed + start))
            out.append(self.decode_latents(latents))
        return torch.cat(out)

    # -- persistence --------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, lineage: dict | None = None, lora: str = "merge") -> Path:
        """Write the bundle as a diffusers-style folder (plus `lineage.json`) that from_pretrained reloads.

        A LoRA on the denoiser is merged into its weights (`lora="merge"`) or saved as an adapter
        folder beside the un-merged base weights (`lora="adapter"`: `unet/` + `unet_lora/`).
        """
        path = Path(path)
        parts = {self.denoiser_folder: self.denoiser, "text_encoder": self.text_encoder,
                 "image_encoder": self.image_encoder, "vae": self.vae}
        index = {"_class_name": "ModelBundle"}
        for name, module in parts.items():
            if module is not None:
                if module is self.denoiser:
                    save_denoiser(module, path / name, lora)
                else:
                    module.save_pretrained(path / name, safe_serialization=True)
                index[name] = [_library_of(module), type(module).__name__]
        if self.tokenizer is not None:  # image-to-video bundles have none
            self.tokenizer.save_pretrained(path / "tokenizer")
            index["tokenizer"] = ["transformers", "AutoTokenizer"]
        self.scheduler.save_pretrained(path / "scheduler")
        index["scheduler"] = ["diffusers", type(self.scheduler).__name__]
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        if lineage is not None:
            (path / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, default=str))
        return path

    @classmethod
    def from_pretrained(cls, path_or_id: str, torch_dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                        **kwargs) -> "ModelBundle":
        """Load from a local folder or a hub id laid out as a diffusers pipeline.

        A hub id is first resolved to a local snapshot of just the needed components (the
        cache when offline), as DiffusionPipeline.from_pretrained does; `kwargs` go to
        `snapshot_download` (revision, token, cache_dir, ...).

        Weights load from safetensors; a component with only pickled weights is vetted by `check_pickles`.
        No code from outside diffusers, transformers and lifecycle runs (classes named by model_index.json,
        a tokenizer's `auto_map`) unless `trust_remote_code`.
        """
        if not os.path.isdir(path_or_id):
            adapters = (f"{n}{ADAPTER_SUFFIX}/*" for n in DENOISER_FOLDERS)
            wanted = ["model_index.json", *(f"{n}/*" for n in COMPONENTS), *adapters]
            path_or_id = snapshot_download(path_or_id, allow_patterns=wanted, **kwargs)
        index = DiffusionPipeline.load_config(path_or_id)
        found = {}
        for name in COMPONENTS:
            spec = index.get(name)
            if not spec or spec[0] is None:
                continue
            library, class_name = spec
            if name == "tokenizer":
                found[name] = AutoTokenizer.from_pretrained(path_or_id, subfolder=name,
                                                            trust_remote_code=trust_remote_code)
                continue
            klass = component_class(path_or_id, name, library, class_name, trust_remote_code)
            extra = {} if name == "scheduler" or torch_dtype is None else {"torch_dtype": torch_dtype}
            if library.split(".")[0] == "transformers":  # an Auto* class, or custom generation code of a model:
                extra["trust_remote_code"] = trust_remote_code  # False, never None (None asks on the terminal)
            check_pickles(Path(path_or_id) / name)
            found[name] = klass.from_pretrained(path_or_id, subfolder=name, **extra)
            if name in DENOISER_FOLDERS and adapter_folder(Path(path_or_id) / name).is_dir():
                load_adapter(found[name], adapter_folder(Path(path_or_id) / name))
            if isinstance(found[name], nn.Module):
                realign(found[name])
        denoiser = next((found[n] for n in DENOISER_FOLDERS if n in found), None)
        conditioner = ("image_encoder",) if "image_encoder" in found else ("text_encoder", "tokenizer")
        missing = [n for n in (*conditioner, "scheduler") if n not in found]
        if denoiser is None or missing:
            raise ValueError(f"{path_or_id}: model_index.json lacks {missing or ['unet or transformer']}")
        return cls(denoiser, found.get("text_encoder"), found.get("tokenizer"), found["scheduler"], found.get("vae"),
                   image_encoder=found.get("image_encoder"))


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | list | None = None):
    """mean + std·ε: ε ~ N(0, I) from `generator`, or with one generator per sample, each sample's ε from its own."""
    return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


def _to(v, like: torch.Tensor):
    return v.to(like) if torch.is_tensor(v) else v
