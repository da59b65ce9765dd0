"""`stage=rwr`: reward-weighted regression, the smallest alignment stage (and the extension guide's example).

Per step: sample `batch_size` videos of the training prompts from the current model (no gradients), score them
with `reward`, and fit the model to its own samples, each sample's denoising loss weighted by

    w_i = B · softmax(r / temperature)_i        (mean 1: the better samples above it)

(reward-weighted regression, Peng et al. 2019; for text-to-image models, Lee et al. 2023): the model moves
towards its better samples. Needs no differentiable reward and no likelihoods; any denoiser the bundle drives.
"""

from dataclasses import dataclass

import lightning as L
import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ..config import positive
from ..data.prompts import PromptStream
from ..diffusion import noise as nz
from ..models import ModelBundle
from .base import AlignmentConfig
from .guard import LossGuard
from .optim import adamw_with_schedule, check_trainable, guarded_step, keep_trainable, log_step, step_seed
from .runner import TrainingRun


@dataclass
class Config(AlignmentConfig):
    steps: int = MISSING
    batch_size: int = MISSING  # videos sampled, scored and fitted per step
    temperature: float = MISSING  # of the softmax over a batch's rewards: small, only the best samples count
    num_steps: int = MISSING  # sampling steps of the rollouts
    guidance_scale: float = MISSING

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        super().check(cfg)
        positive(cfg.stage, "steps", "batch_size", "temperature", "num_steps")


def reward_weights(rewards: torch.Tensor, temperature: float) -> torch.Tensor:
    """w = B · softmax(r / temperature) over the batch: mean 1, the better samples above it."""
    return len(rewards) * torch.softmax(rewards / temperature, dim=0)


def denoising_errors(bundle: ModelBundle, x0: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """Each sample's denoising MSE at a random noise level, in the model's own prediction space, (B,)."""
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    if bundle.is_flow:
        t = nz.sample_flow_t(len(x0), "uniform", generator=generator).to(x0.device)
        pred = bundle.denoise(nz.flow_interpolate(x0, noise, t), t * bundle.scheduler.config.num_train_timesteps,
                              hidden, pooled)
        return nz.masked_mse_per_sample(pred, nz.target("flow", x0, noise))
    ts = nz.sample_timesteps(len(x0), bundle.scheduler.config.num_train_timesteps, generator).to(x0.device)
    alpha, sigma = nz.alpha_sigma(bundle.scheduler.alphas_cumprod, ts)
    pred = bundle.denoise(nz.add_noise(x0, noise, alpha, sigma), ts, hidden, pooled)
    return nz.masked_mse_per_sample(pred, nz.target(bundle.prediction_type, x0, noise, alpha, sigma))


class RWRStage(L.LightningModule):
    def __init__(self, bundle: ModelBundle, reward, prompts: list[str], stage: DictConfig, seed: int):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self.bundle, self.reward, self.prompts, self.s, self.seed = bundle, reward, list(prompts), stage, seed
        self.guard, self.batches_seen = LossGuard(**OmegaConf.to_container(stage.guard)), 0
        bundle.denoiser.train()
        for frozen in (bundle.text_encoder, bundle.vae, reward):
            if frozen is not None:
                frozen.requires_grad_(False).eval()

    def training_step(self, batch: dict, batch_idx: int):
        prompts, s, b = batch["prompts"], self.s, self.bundle
        g = torch.Generator().manual_seed(step_seed(self.seed, self.batches_seen, self.global_rank))
        with torch.no_grad():
            videos = b.generate(prompts, s.frames, s.resolution, s.num_steps, s.guidance_scale,
                                seed=int(torch.randint(2**31, (1,), generator=g)), batch_size=len(prompts))
            rewards = self.reward(videos, prompts)
            x0 = b.encode_video(videos)
            hidden, pooled = b.encode_text(prompts)
        weights = reward_weights(rewards, s.temperature)
        loss = (weights * denoising_errors(b, x0, hidden, pooled, g)).mean()
        self.batches_seen += 1
        grad_norm, mean_loss = guarded_step(self, loss, self.guard, 1, s.gradient_clip)
        if grad_norm is None:
            return
        self.guard.update(mean_loss.item())
        log_step(self, {"train/loss": mean_loss, "train/reward": rewards.mean(), "train/grad_norm": grad_norm,
                        "train/lr": self.lr_schedulers().get_last_lr()[0],
                        "guard/skipped_updates": float(self.guard.rejected)}, "reward", rewards.mean())

    @property
    def reward_queries(self) -> int:
        """Videos scored so far, all ranks (the reward curve's x axis)."""
        return self.batches_seen * self.s.batch_size * self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        stream = PromptStream(self.prompts, self.s.batch_size, seed=self.seed, start_batch=self.batches_seen,
                              rank=self.global_rank, world_size=self.trainer.world_size)
        return DataLoader(stream, batch_size=None)

    def configure_optimizers(self):
        return adamw_with_schedule(self, OmegaConf.to_container(self.s.optimizer),
                                   OmegaConf.to_container(self.s.lr_scheduler), self.trainer.max_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_trainable(self, checkpoint)
        checkpoint["lifecycle"] = {"batches_seen": self.batches_seen, "guard": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_trainable(self, checkpoint)
        self.batches_seen = checkpoint["lifecycle"]["batches_seen"]
        self.guard.load_state_dict(checkpoint["lifecycle"]["guard"])


class RWRRun(TrainingRun):
    """Seed, bundle, evaluation before and after, fit, export and table: the shared sequence."""

    config, method = Config, "RWR"

    def module(self, bundle: ModelBundle) -> RWRStage:
        return RWRStage(bundle, self.reward, self.prompt_sets["train"], self.stage, self.cfg.seed)


def run(cfg: DictConfig) -> dict:
    return RWRRun(cfg)()
