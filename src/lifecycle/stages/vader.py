"""`stage=vader`: align a video diffusion model by backpropagating reward gradients (VADER, Algorithm 1).

Per step: draw noise, run the bundle's sampler (DDIM, or flow-matching Euler) with classifier-free
guidance, keeping gradients only through the last K denoising steps; decode a random subset of the
frames; score them with a differentiable reward; take a gradient step on −reward for the trainable
(LoRA) weights.

Image-to-video bundles (SVD) sample each prompt from a conditioning image (`condition`). With
`clips` > 1 the video is long-horizon as in the VADER paper's autoregressive SVD: clip k+1 is
conditioned on clip k's last frame. The first clips − 1 clips are rolled out without gradients
and only the final clip goes through the truncated-gradient sampler, so the graph kept for the
backward pass does not grow with the horizon; the reward scores the concatenated clips·F
frames, so it sees the clip boundary (and is ascended across it through the final clip).
"""

import logging
import os
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import lightning as L
import torch
from diffusers import AutoencoderKL
from omegaconf import MISSING, DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ..config import check_prompts, choice, positive
from ..data.conditioning import conditioning
from ..data.prompts import PromptStream
from ..diffusion.sampling import sample
from ..distributed import shard
from ..errors import ConfigError
from ..models import ModelBundle
from ..models.memory import enable_gradient_checkpointing, freeze_to_dtype, offload_activations
from ..rewards.base import Reward
from .base import AlignmentConfig, EvaluationConfig
from .guard import LossGuard
from .optim import adamw_with_schedule, check_trainable, guarded_step, keep_trainable, log_step, step_seed
from .runner import TrainingRun

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# -- config -------------------------------------------------------------------------------------
@dataclass
class SamplingConfig:
    num_steps: int = MISSING
    guidance_scale: float = 3.0
    eta: float = 0.0
    grad_steps: int = 1  # K: gradients flow through the last K denoising steps
    grad_mode: str = "last"  # last | rand (K drawn from 1..grad_steps every step)


@dataclass
class MemoryConfig:
    gradient_checkpointing: bool = False
    frozen_dtype: Optional[str] = None  # bf16 | fp16: frozen weights in half precision, trainable in fp32
    offload_activations: bool = False  # keep saved activations in CPU memory


@dataclass
class Config(AlignmentConfig):
    steps: int = MISSING
    batch_size: int = MISSING
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    decode_frames: Optional[int] = None  # score this many random frames (null: all)
    condition: str = "synthetic"  # image-to-video models: conditioning images, synthetic | a folder of images
    clips: int = 1  # image-to-video models: autoregressive clips per video (long horizon when > 1)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    accumulate: int = 1
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    backprop_through_reward: ClassVar[bool] = True

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        check_prompts(cfg, "train", "test")
        st = cfg.stage
        choice("stage.sampling.grad_mode", st.sampling.grad_mode, ("last", "rand"))
        choice("stage.memory.frozen_dtype", st.memory.frozen_dtype, ("bf16", "fp16"))
        if not 1 <= st.sampling.grad_steps <= st.sampling.num_steps:
            raise ConfigError(f"stage.sampling.grad_steps: must be in 1..num_steps ({st.sampling.num_steps}), "
                              f"got {st.sampling.grad_steps}")
        positive(st, "steps", "batch_size")
        super().check(cfg)
        if st.decode_frames is not None and not 1 <= st.decode_frames <= st.frames:
            raise ConfigError(f"stage.decode_frames: must be in 1..frames ({st.frames}) or null, got {st.decode_frames}")
        if st.clips < 1:
            raise ConfigError(f"stage.clips: must be >= 1, got {st.clips}")
        if st.condition != "synthetic" and not os.path.isdir(os.path.expanduser(st.condition)):
            raise ConfigError(f"stage.condition: {st.condition!r} is neither 'synthetic' nor a folder of images")
        if st.accumulate < 1:
            raise ConfigError(f"stage.accumulate: must be >= 1, got {st.accumulate}")


# -- the LightningModule ------------------------------------------------------------------------

GRAD_MODES = ("last", "rand")


def truncation_steps(mode: str, k: int, generator: torch.Generator) -> int:
    """How many final sampling steps carry gradients: K ('last'), or uniform in 1..K per step ('rand')."""
    if mode == "last":
        return k
    if mode == "rand":
        return int(torch.randint(1, k + 1, (1,), generator=generator))
    raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {mode!r}")


def frame_subset(frames: int, count: int | None, generator: torch.Generator) -> torch.Tensor | None:
    """Sorted indices of `count` random frames, or None for all of them."""
    if not count or count >= frames:
        return None
    return torch.randperm(frames, generator=generator)[:count].sort().values


class VaderStage(L.LightningModule):
    def __init__(
        self,
        bundle: ModelBundle,
        reward: Reward,
        prompts: list[str],
        frames: int,
        resolution: int,
        sampling: dict,
        optimizer: dict,
        lr_scheduler: dict,
        guard: dict | None = None,
        batch_size: int = 2,
        decode_frames: int | None = None,
        gradient_clip: float | None = 1.0,
        accumulate: int = 1,
        offload: bool = False,
        autocast_dtype: torch.dtype | None = None,
        seed: int = 0,
        condition: Callable[[list[str]], torch.Tensor] | None = None,
        clips: int = 1,
    ):
        super().__init__()
        if not reward.differentiable:
            raise ValueError("VADER needs a reward that is differentiable w.r.t. pixels")
        if bundle.image_encoder is not None and condition is None:
            raise ValueError("an image-to-video bundle needs `condition` (prompts -> conditioning images)")
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self.bundle, self.reward, self.prompts = bundle, reward, list(prompts)
        self.frames, self.resolution, self.batch_size = frames, resolution, batch_size
        self.sampling, self.optim_cfg, self.sched_cfg = dict(sampling), dict(optimizer), dict(lr_scheduler)
        self.decode_frames, self.gradient_clip, self.accumulate = decode_frames, gradient_clip, accumulate
        self.offload, self.autocast_dtype, self.seed = offload, autocast_dtype, seed
        self.condition, self.clips = condition, clips
        self.guard = LossGuard(**(guard or {"spike_factor": None}))
        self.batches_seen = 0
        bundle.denoiser.train()  # from_pretrained leaves every component in eval mode
        for frozen in (bundle.text_encoder, bundle.image_encoder, bundle.vae, reward):
            if frozen is not None:
                frozen.requires_grad_(False).eval()

    # -- Algorithm 1 ----------------------------------------------------------------------------
    def generate(self, prompts: list[str], generator: torch.Generator, grad_steps: int) -> torch.Tensor:
        """Latents sampled from fresh noise; only the last `grad_steps` denoising steps keep a graph."""
        b, s = self.bundle, self.sampling
        shape = (len(prompts), *b.latent_shape(self.frames, self.resolution))
        noise = torch.randn(shape, generator=generator).to(self.device)
        with torch.no_grad():
            cond, uncond = b.encode_text(prompts), b.encode_text([""] * len(prompts))
        eta_generator = torch.Generator(self.device).manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        return sample(b.denoise, b.inference_scheduler(), noise, cond, uncond, s["guidance_scale"], s["num_steps"],
                      s["eta"], eta_generator, grad_steps=grad_steps)

    def decode(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Video (B, F', C, H, W) of a random subset of `decode_frames` frames (all when unset).

        Frame-wise decoders (pixel space, image VAEs) decode only the chosen latent frames, which is
        the memory saving; temporal VAEs mix frames, so they decode all and the subset is taken after.
        """
        index = frame_subset(latents.shape[2], self.decode_frames, generator)
        if index is None:
            return self.bundle.decode_latents(latents)
        vae = self.bundle.vae
        if vae is None or isinstance(vae, AutoencoderKL):
            return self.bundle.decode_latents(latents[:, :, index.to(latents.device)])
        return self.bundle.decode_latents(latents)[:, index.to(latents.device)]

    def rollout(self, prompts: list[str], generator: torch.Generator, grad_steps: int) -> torch.Tensor:
        """Image-to-video: `clips` autoregressive clips from the prompts' conditioning images, (B, F', C, H, W).

        Clips before the last are sampled without gradients; the last keeps a graph through its
        last `grad_steps` steps. F' = clips·F frames, or a random `decode_frames` of them when set.
        """
        b, s = self.bundle, self.sampling
        images = self.condition(prompts).to(self.device)
        shape = (len(prompts), *b.latent_shape(self.frames, self.resolution))
        clips = []
        for k in range(self.clips):
            final = k == self.clips - 1
            noise = torch.randn(shape, generator=generator).to(self.device)
            with torch.set_grad_enabled(final and torch.is_grad_enabled()):
                clips.append(b.sample_clip(images, noise, s["num_steps"], s["guidance_scale"], generator,
                                           eta=s["eta"], grad_steps=grad_steps))
            images = clips[-1][:, -1]
        video = torch.cat(clips, dim=1)
        index = frame_subset(video.shape[1], self.decode_frames, generator)
        return video if index is None else video[:, index.to(video.device)]

    def training_step(self, batch: dict, batch_idx: int):
        prompts = batch["prompts"]
        g = self.step_generator()
        k = truncation_steps(self.sampling["grad_mode"], self.sampling["grad_steps"], g)
        with ExitStack() as stack:
            if self.offload:
                stack.enter_context(offload_activations())
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
            if self.bundle.image_encoder is None:
                video = self.decode(self.generate(prompts, g, k), g)
            else:
                video = self.rollout(prompts, g, k)
            scores = self.reward(video.float(), prompts)
        self.batches_seen += 1
        grad_norm, mean_loss = guarded_step(self, -scores.mean(), self.guard, self.accumulate, self.gradient_clip)
        if grad_norm is None:
            return
        self.guard.update(mean_loss.item())
        log_step(self, {"train/reward": scores.detach().mean(), "train/reward_std": scores.detach().std(correction=0),
                        "train/grad_norm": grad_norm, "train/lr": self.lr_schedulers().get_last_lr()[0],
                        "train/grad_steps": float(k), "guard/skipped_updates": float(self.guard.rejected)},
                 "reward", scores.detach().mean())

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def reward_queries(self) -> int:
        """Videos scored so far, all ranks."""
        return self.batches_seen * self.batch_size * self.trainer.world_size

    def step_generator(self) -> torch.Generator:
        """Noise, frame subset and truncation for this batch depend on (seed, batch, rank) alone: resume is exact."""
        return torch.Generator().manual_seed(step_seed(self.seed, self.batches_seen, self.global_rank))

    def train_dataloader(self) -> DataLoader:
        stream = PromptStream(self.prompts, self.batch_size, seed=self.seed, start_batch=self.batches_seen,
                              rank=self.global_rank, world_size=self.trainer.world_size)
        return DataLoader(stream, batch_size=None)

    def configure_model(self) -> None:
        """`trainer=fsdp`: shard the denoiser (the frozen text encoder, VAE and reward stay whole on every rank)."""
        shard(self, [self.bundle.denoiser])

    def configure_optimizers(self):
        return adamw_with_schedule(self, self.optim_cfg, self.sched_cfg, self.trainer.max_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen weights (base model, encoders, reward backbones) are rebuilt from their sources on
        # resume; a checkpoint carries only what training changes.
        keep_trainable(self, checkpoint)
        checkpoint["lifecycle"] = {"batches_seen": self.batches_seen, "guard": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_trainable(self, checkpoint)
        self.batches_seen = checkpoint["lifecycle"]["batches_seen"]
        if "guard" in checkpoint["lifecycle"]:  # checkpoints written before VADER had a guard lack it
            self.guard.load_state_dict(checkpoint["lifecycle"]["guard"])


# -- runner -------------------------------------------------------------------------------------
class VaderRun(TrainingRun):
    """VADER on `model.pretrained` (usually the previous stage's export) with `reward`, over `prompts.train`.

    Image-to-video bundles sample from `stage.condition` images, in training and evaluation alike.
    """

    config = Config
    method = "VADER"

    def sampling(self, bundle: ModelBundle) -> dict:
        s = self.stage
        self.images = None if bundle.image_encoder is None else conditioning(s.condition, s.resolution, self.cfg.seed)
        if self.images is None and s.clips > 1:
            raise ConfigError(f"stage.clips: long-horizon rollout ({s.clips} clips) needs an image-to-video model")
        return {"frames": s.frames, "resolution": s.resolution, "images": self.images, "clips": s.clips}

    def prepare(self, bundle: ModelBundle) -> None:
        if self.stage.memory.gradient_checkpointing:
            enable_gradient_checkpointing(bundle.denoiser)
        self.dtype = DTYPES.get(self.stage.memory.frozen_dtype)
        if self.dtype is not None:
            for part in (bundle.denoiser, bundle.text_encoder, bundle.image_encoder, bundle.vae, self.reward):
                if part is not None:
                    freeze_to_dtype(part, self.dtype)

    def module(self, bundle: ModelBundle) -> VaderStage:
        s = self.stage
        return VaderStage(
            bundle, self.reward, self.prompt_sets["train"], frames=s.frames, resolution=s.resolution,
            sampling=OmegaConf.to_container(s.sampling), optimizer=OmegaConf.to_container(s.optimizer),
            lr_scheduler=OmegaConf.to_container(s.lr_scheduler), guard=OmegaConf.to_container(s.guard),
            batch_size=s.batch_size, decode_frames=s.decode_frames, gradient_clip=s.gradient_clip,
            accumulate=s.accumulate, offload=s.memory.offload_activations, autocast_dtype=self.dtype,
            seed=self.cfg.seed, condition=self.images, clips=s.clips,
        )

    def evaluating(self, trainer: L.Trainer):
        return torch.autocast(trainer.strategy.root_device.type, dtype=self.dtype, enabled=self.dtype is not None)

    @contextmanager
    def exporting(self, module, bundle: ModelBundle):
        if self.dtype is not None:  # frozen weights were stored in half precision for training; export in fp32
            bundle.float()
        yield


def run(cfg: DictConfig) -> dict:
    """`stage=vader`: evaluate, align with reward gradients, evaluate again, export."""
    return VaderRun(cfg)()
