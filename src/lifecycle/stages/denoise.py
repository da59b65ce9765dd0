"""Pre-training (and SFT): the denoising objective over a resolution/frame-count curriculum.

Per step: encode video and caption, draw t and noise (with offset), noise the latents, predict,
convert the prediction into the loss space, Min-SNR-γ-weighted MSE, guard, clip, step.
A batch from a latent cache brings `latents` and text embeddings (`hidden`, `pooled`) instead of
`video`: the VAE and text encoder are then not run.
"""

import lightning as L
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ..data.curriculum import Curriculum
from ..distributed import shard
from ..diffusion import noise as nz
from ..models import ModelBundle
from ..models.bundle import sample_posterior
from .guard import LossGuard
from .optim import adamw_with_schedule, guarded_step, log_step


def denoiser_flops(bundle: ModelBundle, latent_shape: tuple[int, int, int, int]) -> int:
    """The denoiser's forward + backward FLOPs on one sample of `latent_shape` (C, F, h, w), counted by
    torch's FlopCounterMode on fake tensors: nothing is computed, whatever the model's size.

    Not Lightning's `measure_flops`: its `backward()` would add to the gradients being accumulated;
    `autograd.grad` leaves them alone. The text encoder and VAE are not counted. A compiled denoiser
    (`stage.compile`, nn.Module.compile) is counted through its eager forward: torch.compile first
    called under a dispatch mode would leave the module eager for good.
    """
    d = bundle.denoiser
    device = next(d.parameters()).device  # where the weights are (a module's `.device` may not know yet)
    with torch.no_grad():
        cond = bundle.encode_text([""])
    params = [p for p in d.parameters() if p.requires_grad]
    compiled, d._compiled_call_impl = d._compiled_call_impl, None
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
            x = torch.zeros(1, *latent_shape, device=device)
            out = bundle.denoise(x, torch.full((1,), 500, device=device), *cond)
            torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    finally:
        d._compiled_call_impl = compiled
    return counter.get_total_flops()


class DenoiseStage(L.LightningModule):
    def __init__(
        self,
        bundle: ModelBundle,
        curriculum: Curriculum,
        objective: dict,
        optimizer: dict,
        lr_scheduler: dict,
        guard: dict,
        gradient_clip: float | None = 1.0,
        accumulate: int = 1,
        train_text_encoder: bool = False,
        max_steps: int | None = None,
        seed: int = 0,
        latent_shapes: list[tuple[int, int, int, int]] | None = None,
    ):
        """`latent_shapes`: each phase's (C, F, h, w), where batches bring latents of another shape than the
        bundle's VAE makes of the phase's clips."""
        super().__init__()
        self.automatic_optimization = False  # the guard decides per step whether the update is applied
        self.bundle, self.curriculum = bundle, curriculum
        self.objective, self.optim_cfg, self.sched_cfg = dict(objective), dict(optimizer), dict(lr_scheduler)
        self.gradient_clip, self.accumulate, self.seed = gradient_clip, accumulate, seed
        self.max_steps = max_steps or curriculum.total_steps
        self.guard = LossGuard(**guard)
        self.batches_seen = 0
        self.latent_shapes = [tuple(x) for x in latent_shapes] if latent_shapes else [
            bundle.latent_shape(p.frames, p.resolution) for p in curriculum.phases]
        self.phase_flops: list[int] = []  # per curriculum phase: denoiser FLOPs per sample
        self.flops_per_batch = 0
        self._empty_text: tuple[torch.Tensor, torch.Tensor] | None = None  # "" embedding for cached batches
        bundle.denoiser.train()  # from_pretrained leaves every component in eval mode
        bundle.text_encoder.requires_grad_(train_text_encoder).train(train_text_encoder)
        if bundle.vae is not None:
            bundle.vae.requires_grad_(False).eval()
        self.train_text_encoder = train_text_encoder

    # -- objective ----------------------------------------------------------------------------
    def denoising_loss(self, batch: dict, gens: list[torch.Generator]) -> torch.Tensor:
        """The batch's mean loss; `gens` holds one generator per sample (its caption dropout, VAE sample,
        noise and timestep)."""
        b, obj, dev = self.bundle, self.objective, self.device
        keep = nz.per_sample(lambda g: torch.rand(1, generator=g, device=dev), gens) >= obj["caption_dropout"]
        if "latents" in batch:  # a latent cache: a draw from the stored posterior, as encoding would make
            x0 = batch["latents"]
            if "latents_std" in batch:
                x0 = sample_posterior(x0, batch["latents_std"], gens)
            hidden, pooled = self.drop_captions(batch["hidden"], batch["pooled"], keep)
        else:
            captions = [c if k else "" for c, k in zip(batch["caption"], keep.tolist())]
            with torch.set_grad_enabled(self.train_text_encoder):
                hidden, pooled = b.encode_text(captions)
            with torch.no_grad():
                x0 = b.encode_video(batch["video"], generator=gens)
        noise = nz.per_sample(lambda g: nz.offset_noise(
            torch.randn(1, *x0.shape[1:], generator=g, device=dev), obj["noise_offset"], g), gens)
        if b.is_flow:
            t = nz.per_sample(lambda g: nz.sample_flow_t(
                1, obj["flow_timesteps"], obj["logit_mean"], obj["logit_std"], g, dev), gens)
            t = nz.shift_flow_t(t, b.scheduler.config.shift)
            x_t = nz.flow_interpolate(x0, noise, t)
            pred = b.denoise(x_t, t * b.scheduler.config.num_train_timesteps, hidden, pooled)
            return nz.masked_mse_per_sample(pred, nz.target("flow", x0, noise)).mean()
        ts = nz.per_sample(lambda g: nz.sample_timesteps(1, b.scheduler.config.num_train_timesteps, g, dev), gens)
        alpha, sigma = nz.alpha_sigma(b.scheduler.alphas_cumprod, ts)
        x_t = nz.add_noise(x0, noise, alpha, sigma)
        kind = obj["loss_space"] or b.prediction_type
        pred = nz.convert_prediction(b.denoise(x_t, ts, hidden, pooled), b.prediction_type, kind, x_t, alpha, sigma)
        mse = nz.masked_mse_per_sample(pred, nz.target(kind, x0, noise, alpha, sigma))
        weight = nz.min_snr_weight(nz.snr(alpha, sigma), obj["min_snr_gamma"], kind, obj["min_snr_floor"])
        return (weight * mse).mean()

    def drop_captions(self, hidden: torch.Tensor, pooled: torch.Tensor, keep: torch.Tensor):
        """Cached text embeddings with the dropped rows replaced by the empty caption's (encoded once)."""
        if bool(keep.all()):
            return hidden, pooled
        if self._empty_text is None:
            with torch.no_grad():
                self._empty_text = self.bundle.encode_text([""])
        eh, ep = self._empty_text
        return (torch.where(keep.view(-1, 1, 1), hidden, eh.to(hidden.dtype)),
                torch.where(keep.view(-1, 1), pooled, ep.to(pooled.dtype)))

    # -- loop ---------------------------------------------------------------------------------
    def sample_generators(self, n: int) -> list[torch.Generator]:
        """One generator per sample of this rank's slice of the global batch, seeded by (seed, batch, position
        in the global batch) alone: the draws do not depend on how many ranks share the batch, and resume is exact."""
        first = self.global_rank * n
        return [torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + self.batches_seen) * 1_000_003 + i)
                for i in range(first, first + n)]

    def training_step(self, batch: dict, batch_idx: int):
        loss = self.denoising_loss(batch, self.sample_generators(len(batch["caption"])))
        self.batches_seen += 1
        grad_norm, mean_loss = guarded_step(self, loss, self.guard, self.accumulate, self.gradient_clip)
        if grad_norm is None:
            return
        phase = self.curriculum.phases[batch["phase"]]
        loss_ema = self.guard.update(mean_loss.item())
        log_step(self, {
            "train/loss": mean_loss,
            "train/loss_ema": loss_ema,
            "train/grad_norm": grad_norm,
            "train/lr": self.lr_schedulers().get_last_lr()[0],
            "train/phase": float(batch["phase"]),
            "train/resolution": float(phase.resolution),
            "train/frames": float(phase.frames),
            "guard/skipped_updates": float(self.guard.rejected),
            "data/skipped_samples": float(batch["skipped"]),
        }, "loss", mean_loss)

    def configure_optimizers(self):
        return adamw_with_schedule(self, self.optim_cfg, self.sched_cfg, self.max_steps)

    # -- strategy and throughput ----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Count each phase's denoiser FLOPs per sample (before `configure_model` shards the denoiser)."""
        self.phase_flops = [denoiser_flops(self.bundle, shape) for shape in self.latent_shapes]

    def configure_model(self) -> None:
        """`trainer=fsdp`: shard what trains (the denoiser, and the text encoder when it trains)."""
        shard(self, [self.bundle.denoiser, *([self.bundle.text_encoder] if self.train_text_encoder else [])])

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """Keep `flops_per_batch`, which Lightning's ThroughputMonitor reads for FLOP/s and MFU, at this batch's."""
        phase = batch["phase"]
        if "latents" in batch and tuple(batch["latents"].shape[1:]) != self.latent_shapes[phase]:
            raise ValueError(f"data: cached latents of shape {tuple(batch['latents'].shape[1:])} in curriculum phase "
                             f"{phase}, which expects {self.latent_shapes[phase]}")
        self.flops_per_batch = self.phase_flops[phase] * len(batch["caption"])

    # -- state beyond weights and optimizer ---------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lifecycle"] = {"batches_seen": self.batches_seen, "guard": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["lifecycle"]
        self.batches_seen = state["batches_seen"]
        self.guard.load_state_dict(state["guard"])
