"""`stage=dpo`: Diffusion-DPO (Wallace et al. 2024): fine-tune on preference pairs against a frozen reference.

Per step: encode the prompts and both videos of each pair; draw one timestep and one noise per
pair, shared by its chosen and rejected video; noise both; denoising MSE of the model and of the
reference on both; the DPO loss on the four MSEs (`diffusion.dpo`); guard, clip, step.

With LoRA the reference is the same network with its adapters switched off, so it costs no
memory; with full fine-tuning (`lora: null`) it is a frozen copy of the denoiser, one more set
of denoiser weights in memory (no gradients or optimizer state for it).
"""

import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import lightning as L
import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..config import choice, is_later, positive
from ..data.preferences import PairDataModule, read_manifest
from ..diffusion import noise as nz
from ..diffusion.dpo import DPOTerms, dpo_loss
from ..distributed import shard
from ..errors import ConfigError
from ..models import ModelBundle
from ..models.lora import has_lora
from .base import AlignmentConfig
from .guard import LossGuard
from .optim import adamw_with_schedule, check_trainable, guarded_step, keep_trainable, log_step, step_seed
from .runner import TrainingRun

log = logging.getLogger(__name__)


# -- config -------------------------------------------------------------------------------------
@dataclass
class TimestepsConfig:
    flow: str = "logit_normal"  # flow models: uniform | logit_normal (DDPM-family models: uniform t)
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class Config(AlignmentConfig):
    pairs: str = MISSING  # folder of preference-pair shards
    steps: int = MISSING
    batch_size: int = MISSING  # pairs per step
    shuffle_buffer: int = 256
    num_workers: int = 0
    beta: float = MISSING
    timesteps: TimestepsConfig = field(default_factory=TimestepsConfig)
    accumulate: int = 1

    @classmethod
    def uses_reward(cls, stage: DictConfig) -> bool:
        """Only for the before/after table (stage.evaluation) and the reward curve."""
        return stage.evaluation is not None or stage.curve.every_n_steps > 0

    @classmethod
    def text_to_video_only(cls, stage: DictConfig) -> bool:
        return True

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        st = cfg.stage
        pairs = os.path.expanduser(st.pairs)
        if not is_later(pairs) and (not os.path.isdir(pairs) or not any(f.endswith(".tar") for f in os.listdir(pairs))):
            raise ConfigError(f"stage.pairs: no pair shards (*.tar) in {st.pairs!r}")
        positive(st, "steps", "batch_size", "beta", "accumulate")
        super().check(cfg)
        choice("stage.timesteps.flow", st.timesteps.flow, nz.FLOW_T_SCHEMES)


# -- the reference model ------------------------------------------------------------------------
@contextmanager
def adapters_disabled(denoiser: nn.Module) -> Iterator[nn.Module]:
    """Within the block every peft adapter of `denoiser` is off: the network computes its base weights.

    peft's `BaseTunerLayer.enable_adapters` is what `PeftModel.disable_adapter` and diffusers'
    `disable_adapters` use; on leaving, the adapters are on (and trainable) again.
    """
    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield denoiser
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class DPOStage(L.LightningModule):
    """Diffusion-DPO on batches {prompts, chosen, rejected} (data.preferences.PairStream); the bundle's
    trainable weights (LoRA or the whole denoiser) are the policy, the start model the reference."""

    def __init__(
        self,
        bundle: ModelBundle,
        beta: float,
        timesteps: dict,
        optimizer: dict,
        lr_scheduler: dict,
        guard: dict,
        gradient_clip: float | None = 1.0,
        accumulate: int = 1,
        max_steps: int = 100,
        seed: int = 0,
    ):
        super().__init__()
        self.automatic_optimization = False  # the guard decides per step whether the update is applied
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self.bundle, self.beta, self.timesteps = bundle, beta, dict(timesteps)
        self.optim_cfg, self.sched_cfg = dict(optimizer), dict(lr_scheduler)
        self.gradient_clip, self.accumulate, self.max_steps, self.seed = gradient_clip, accumulate, max_steps, seed
        self.guard = LossGuard(**guard)
        self.batches_seen = 0
        bundle.denoiser.train()  # from_pretrained leaves every component in eval mode
        for frozen in (bundle.text_encoder, bundle.vae):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        # With LoRA the reference is the adapter-free base network; otherwise a frozen copy of the start.
        self.reference = None
        if not has_lora(bundle.denoiser):
            start = copy.deepcopy(bundle.denoiser).requires_grad_(False).eval()
            self.reference = ModelBundle(start, None, None, bundle.scheduler)

    # -- the Diffusion-DPO objective ----------------------------------------------------------
    def noised(self, x0_w: torch.Tensor, x0_l: torch.Tensor,
               g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both videos of each pair noised with one shared timestep and noise.

        Returns (x_t, timestep, target) for the stacked batch [chosen; rejected] of 2B samples; the
        target is the model's own prediction kind (the velocity for flow matching).
        """
        b, n = self.bundle, len(x0_w)
        noise = torch.randn(x0_w.shape, generator=g, device=self.device).repeat(2, *[1] * (x0_w.ndim - 1))
        x0 = torch.cat([x0_w, x0_l])
        if b.is_flow:
            ts = self.timesteps
            t = nz.sample_flow_t(n, ts["flow"], ts["logit_mean"], ts["logit_std"], g, self.device)
            t = nz.shift_flow_t(t, b.scheduler.config.shift).repeat(2)
            timestep = t * b.scheduler.config.num_train_timesteps
            return nz.flow_interpolate(x0, noise, t), timestep, nz.target("flow", x0, noise)
        t = nz.sample_timesteps(n, b.scheduler.config.num_train_timesteps, g, self.device).repeat(2)
        alpha, sigma = nz.alpha_sigma(b.scheduler.alphas_cumprod, t)
        return nz.add_noise(x0, noise, alpha, sigma), t, nz.target(b.prediction_type, x0, noise, alpha, sigma)

    def reference_denoise(self, x_t: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """The frozen reference's prediction (no graph)."""
        with torch.no_grad():
            if self.reference is not None:
                return self.reference.denoise(x_t, timestep, *cond)
            with adapters_disabled(self.bundle.denoiser):
                return self.bundle.denoise(x_t, timestep, *cond)

    def dpo_terms(self, batch: dict, g: torch.Generator) -> DPOTerms:
        b = self.bundle
        with torch.no_grad():
            hidden, pooled = (c.repeat(2, *[1] * (c.ndim - 1)) for c in b.encode_text(batch["prompts"]))
            x0_w = b.encode_video(batch["chosen"].to(self.device), generator=g)
            x0_l = b.encode_video(batch["rejected"].to(self.device), generator=g)
        x_t, timestep, target = self.noised(x0_w, x0_l, g)
        mse = nz.masked_mse_per_sample(b.denoise(x_t, timestep, hidden, pooled), target)
        ref_mse = nz.masked_mse_per_sample(self.reference_denoise(x_t, timestep, hidden, pooled), target)
        return dpo_loss(*mse.chunk(2), *ref_mse.chunk(2), self.beta)

    # -- loop ---------------------------------------------------------------------------------
    def step_generator(self) -> torch.Generator:
        """Randomness for the batch about to run, a function of (seed, batch, rank) alone: resume is exact."""
        g = torch.Generator(device=self.device)
        return g.manual_seed(step_seed(self.seed, self.batches_seen, self.global_rank))

    def training_step(self, batch: dict, batch_idx: int):
        terms = self.dpo_terms(batch, self.step_generator())
        loss = terms.loss
        self.batches_seen += 1
        grad_norm, mean_loss = guarded_step(self, loss, self.guard, self.accumulate, self.gradient_clip)
        if grad_norm is None:
            return
        loss_ema = self.guard.update(mean_loss.item())
        log_step(self, {
            "train/loss": mean_loss,
            "train/loss_ema": loss_ema,
            "train/implicit_accuracy": terms.accuracy,
            "train/reward_margin": terms.margin,
            "train/reward_chosen": terms.reward_chosen,
            "train/reward_rejected": terms.reward_rejected,
            "train/grad_norm": grad_norm,
            "train/lr": self.lr_schedulers().get_last_lr()[0],
            "guard/skipped_updates": float(self.guard.rejected),
            "data/skipped_pairs": float(batch["skipped"]),
        }, "loss", mean_loss)

    def configure_model(self) -> None:
        """`trainer=fsdp`: shard the denoiser, and the frozen reference copy (full fine-tuning) like it."""
        shard(self, [self.bundle.denoiser, *([self.reference.denoiser] if self.reference is not None else [])])

    def configure_optimizers(self):
        return adamw_with_schedule(self, self.optim_cfg, self.sched_cfg, self.max_steps)

    # -- state beyond the trainable weights and optimizer -------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The base model and the reference are rebuilt from model.pretrained on resume.
        keep_trainable(self, checkpoint)
        checkpoint["lifecycle"] = {"batches_seen": self.batches_seen, "guard": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_trainable(self, checkpoint)
        state = checkpoint["lifecycle"]
        self.batches_seen = state["batches_seen"]
        self.guard.load_state_dict(state["guard"])


# -- runner -------------------------------------------------------------------------------------
class DPORun(TrainingRun):
    """Diffusion-DPO of `model.pretrained` on the pairs in `stage.pairs`; evaluated before and after."""

    config = Config
    method = "Diffusion-DPO"

    def check_bundle(self, bundle: ModelBundle) -> None:
        s = self.stage
        if bundle.image_encoder is not None:
            raise ConfigError("model: Diffusion-DPO here trains text-to-video models (this one is image-to-video)")
        if bundle.fixed_frames is not None and s.frames != bundle.fixed_frames:
            raise ConfigError(f"stage.frames: {type(bundle.denoiser).__name__} takes exactly {bundle.fixed_frames} "
                              f"frame(s), got {s.frames}")

    def module(self, bundle: ModelBundle) -> DPOStage:
        # the trainable weights are chosen after an adapter parent is merged: the reference is the parent as exported
        s = self.stage
        return DPOStage(
            bundle, beta=s.beta, timesteps=OmegaConf.to_container(s.timesteps),
            optimizer=OmegaConf.to_container(s.optimizer), lr_scheduler=OmegaConf.to_container(s.lr_scheduler),
            guard=OmegaConf.to_container(s.guard), gradient_clip=s.gradient_clip, accumulate=s.accumulate,
            max_steps=s.steps, seed=self.cfg.seed,
        )

    def datamodule(self, module: DPOStage) -> PairDataModule:
        s = self.stage
        return PairDataModule(s.pairs, s.batch_size, s.frames, s.resolution, seed=self.cfg.seed,
                              num_workers=s.num_workers, shuffle_buffer=s.shuffle_buffer)

    def curve_offset(self) -> dict:
        """The curve starts where the pairs left off: their reward queries and seconds count too."""
        return {k: (read_manifest(self.stage.pairs) or {}).get(k, 0) for k in ("reward_queries", "seconds")}

    def lineage_data(self):
        return self.stage.pairs


def run(cfg: DictConfig) -> dict:
    """`stage=dpo`: Diffusion-DPO of `model.pretrained` on the pairs in `stage.pairs`; evaluated before and after."""
    return DPORun(cfg)()
