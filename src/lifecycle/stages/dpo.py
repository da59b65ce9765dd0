"""Diffusion-DPO (Wallace et al. 2024): fine-tune on preference pairs against a frozen reference.

Per step: encode the prompts and both videos of each pair; draw one timestep and one noise per
pair, shared by its chosen and rejected video; noise both; denoising MSE of the model and of the
reference on both; the DPO loss on the four MSEs (`diffusion.dpo`); guard, clip, step.

With LoRA the reference is the same network with its adapters switched off, so it costs no
memory; with full fine-tuning (`lora: null`) it is a frozen copy of the denoiser, one more set
of denoiser weights in memory (no gradients or optimizer state for it).
"""

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..callbacks.reward_curve import reward_curve
from ..errors import ConfigError
from ..data.preferences import PairDataModule, read_manifest
from ..data.prompts import load_prompts
from ..diffusion import noise as nz
from ..distributed import shard
from ..diffusion.dpo import DPOTerms, dpo_loss
from ..metrics.reward_table import evaluate, write_table
from ..models import ModelBundle, build_bundle
from ..models.lora import has_lora
from ..rewards.base import build_reward
from ..train import (build_trainer, export_trained, for_evaluation, lineage, make_trainable, resume_checkpoint,
                     save_last, trainable_bundle)
from .guard import LossGuard
from .optim import adamw_with_schedule, check_trainable, guarded_step, keep_trainable, log_step

log = logging.getLogger(__name__)


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
        return g.manual_seed(self.seed * 1_000_003 + self.batches_seen * 4099 + self.global_rank)

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
def run(cfg: DictConfig) -> dict:
    """`stage=dpo`: Diffusion-DPO of `model.pretrained` on the pairs in `stage.pairs`; evaluated before and after."""
    run_dir = Path(cfg.run_dir)
    L.seed_everything(cfg.seed, workers=True)
    s = cfg.stage
    bundle = build_bundle(cfg.model)
    if bundle.image_encoder is not None:
        raise ConfigError("model: Diffusion-DPO here trains text-to-video models (this one is image-to-video)")
    if bundle.fixed_frames is not None and s.frames != bundle.fixed_frames:
        raise ConfigError(f"stage.frames: {type(bundle.denoiser).__name__} takes exactly {bundle.fixed_frames} "
                          f"frame(s), got {s.frames}")
    rows = {}
    if s.evaluation is not None or s.curve.every_n_steps:
        reward = build_reward(cfg.reward)
        prompt_sets = {name: load_prompts(cfg.prompts[name], f"prompts.{name}")
                       for name in ("train", "test") if s.evaluation is not None or name == "train"}
    if s.evaluation is not None:
        settings = {**OmegaConf.to_container(s.evaluation), "frames": s.frames, "resolution": s.resolution}
        for_evaluation(cfg, bundle, reward)
        rows["before"] = evaluate(bundle, reward, prompt_sets, run_dir / "samples", "before", settings,
                                  write=rank_zero_only.rank == 0)

    make_trainable(bundle, s.lora)  # merges an adapter parent first: the reference is the parent as exported
    module = DPOStage(
        bundle, beta=s.beta, timesteps=OmegaConf.to_container(s.timesteps), optimizer=OmegaConf.to_container(s.optimizer),
        lr_scheduler=OmegaConf.to_container(s.lr_scheduler), guard=OmegaConf.to_container(s.guard),
        gradient_clip=s.gradient_clip, accumulate=s.accumulate, max_steps=s.steps, seed=cfg.seed,
    )
    pairs = PairDataModule(s.pairs, s.batch_size, s.frames, s.resolution, seed=cfg.seed, num_workers=s.num_workers,
                           shuffle_buffer=s.shuffle_buffer)
    curve = []
    if s.curve.every_n_steps:  # the curve starts where the pairs left off: their queries and seconds count too
        offset = {k: (read_manifest(s.pairs) or {}).get(k, 0) for k in ("reward_queries", "seconds")}
        curve = reward_curve(s.curve, bundle, reward, prompt_sets["train"], run_dir,
                             {"frames": s.frames, "resolution": s.resolution}, offset)
    trainer = build_trainer(cfg, run_dir, curve, s.steps)
    start = time.time()
    trainer.fit(module, datamodule=pairs, ckpt_path=resume_checkpoint(cfg, run_dir, trainer), weights_only=True)
    save_last(trainer, run_dir)
    result = {"steps": trainer.global_step, "fit_seconds": round(time.time() - start, 1)}

    if s.evaluation is not None:
        for_evaluation(cfg, bundle, reward, trainer=trainer)
        rows["after"] = evaluate(bundle, reward, prompt_sets, run_dir / "samples", "after", settings,
                                 write=trainer.is_global_zero)
        result.update({f"{tag}/{name}/reward": r[name]["reward"] for tag, r in rows.items() for name in r})
    if trainer.is_global_zero and rows:
        log.info("reward before/after Diffusion-DPO:\n%s", write_table(rows, run_dir / "report", "Diffusion-DPO"))
    export_trained(trainer, bundle, lambda: trainable_bundle(cfg.model, s.lora), run_dir / "export",
                   lineage(cfg, run_dir, trainer.global_step, s.pairs), lora=s.export, lora_formats=s.lora_formats)
    return result
