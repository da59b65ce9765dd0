"""Pre-training (and SFT): the denoising objective over a resolution/frame-count curriculum.

Per step: encode video and caption, draw t and noise (with offset), noise the latents, predict,
convert the prediction into the loss space, Min-SNR-γ-weighted MSE, guard, clip, step.
A batch from a latent cache brings `latents` and text embeddings (`hidden`, `pooled`) instead of
`video`: the VAE and text encoder are then not run.
"""

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.curriculum import Curriculum
from ..diffusion import noise as nz
from ..models import ModelBundle
from .guard import LossGuard
from .optim import adamw_with_schedule, guarded_step


def denoiser_flops(bundle: ModelBundle, latent_shape: tuple[int, int, int, int], device: torch.device) -> int:
    """The denoiser's forward + backward FLOPs on one sample of `latent_shape` (C, F, h, w), counted by
    torch's FlopCounterMode.

    Not Lightning's `measure_flops`: its `backward()` would add to the gradients being accumulated;
    `autograd.grad` leaves them alone. The text encoder and VAE are not counted. A compiled denoiser
    (`stage.compile`, nn.Module.compile) is counted through its eager forward: torch.compile first
    called under a dispatch mode would leave the module eager for good.
    """
    d = bundle.denoiser
    x = torch.zeros(1, *latent_shape, device=device)
    with torch.no_grad():
        cond = bundle.encode_text([""])
    params = [p for p in d.parameters() if p.requires_grad]
    compiled, d._compiled_call_impl = d._compiled_call_impl, None
    try:
        with FlopCounterMode(display=False) as counter:
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
    ):
        super().__init__()
        self.automatic_optimization = False  # the guard decides per step whether the update is applied
        self.bundle, self.curriculum = bundle, curriculum
        self.objective, self.optim_cfg, self.sched_cfg = dict(objective), dict(optimizer), dict(lr_scheduler)
        self.gradient_clip, self.accumulate, self.seed = gradient_clip, accumulate, seed
        self.max_steps = max_steps or curriculum.total_steps
        self.guard = LossGuard(**guard)
        self.batches_seen = 0
        self.phase_flops: dict[int, int] = {}  # curriculum phase -> denoiser FLOPs per sample
        self.flops_per_batch = 0
        self._empty_text: tuple[torch.Tensor, torch.Tensor] | None = None  # "" embedding for cached batches
        bundle.denoiser.train()  # from_pretrained leaves every component in eval mode
        bundle.text_encoder.requires_grad_(train_text_encoder).train(train_text_encoder)
        if bundle.vae is not None:
            bundle.vae.requires_grad_(False).eval()
        self.train_text_encoder = train_text_encoder

    # -- objective ----------------------------------------------------------------------------
    def denoising_loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        b, obj = self.bundle, self.objective
        n = len(batch["caption"])
        keep = torch.rand(n, generator=g, device=self.device) >= obj["caption_dropout"]
        if "latents" in batch:
            x0 = batch["latents"]
            hidden, pooled = self.drop_captions(batch["hidden"], batch["pooled"], keep)
        else:
            captions = [c if k else "" for c, k in zip(batch["caption"], keep.tolist())]
            with torch.set_grad_enabled(self.train_text_encoder):
                hidden, pooled = b.encode_text(captions)
            with torch.no_grad():
                x0 = b.encode_video(batch["video"], generator=g)
        noise = nz.offset_noise(torch.randn(x0.shape, generator=g, device=self.device), obj["noise_offset"], g)
        if b.is_flow:
            t = nz.sample_flow_t(n, obj["flow_timesteps"], obj["logit_mean"], obj["logit_std"], g, self.device)
            t = nz.shift_flow_t(t, b.scheduler.config.shift)
            x_t = nz.flow_interpolate(x0, noise, t)
            pred = b.denoise(x_t, t * b.scheduler.config.num_train_timesteps, hidden, pooled)
            return nz.masked_mse_per_sample(pred, nz.target("flow", x0, noise)).mean()
        ts = nz.sample_timesteps(n, b.scheduler.config.num_train_timesteps, g, self.device)
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
    def step_generator(self) -> torch.Generator:
        """Randomness for the batch about to run, a function of (seed, batch, rank) alone: resume is exact."""
        g = torch.Generator(device=self.device)
        return g.manual_seed(self.seed * 1_000_003 + self.batches_seen * 4099 + self.global_rank)

    def training_step(self, batch: dict, batch_idx: int):
        loss = self.denoising_loss(batch, self.step_generator())
        self.batches_seen += 1
        grad_norm = guarded_step(self, loss, self.guard, self.accumulate, self.gradient_clip)
        if grad_norm is None:
            return
        phase = self.curriculum.phases[batch["phase"]]
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/loss_ema": self.guard.update(loss.item()),
                "train/grad_norm": grad_norm,
                "train/lr": self.lr_schedulers().get_last_lr()[0],
                "train/phase": float(batch["phase"]),
                "train/resolution": float(phase.resolution),
                "train/frames": float(phase.frames),
                "guard/skipped_updates": float(self.guard.rejected),
                "data/skipped_samples": float(batch["skipped"]),
            },
            on_step=True,
            prog_bar=False,
        )
        self.log("loss", loss.detach(), prog_bar=True, logger=False)

    def configure_optimizers(self):
        return adamw_with_schedule(self, self.optim_cfg, self.sched_cfg, self.max_steps)

    # -- throughput -----------------------------------------------------------------------------
    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """Keep `flops_per_batch`, which Lightning's ThroughputMonitor reads for FLOP/s and MFU, at this batch's."""
        phase = batch["phase"]
        if phase not in self.phase_flops:
            p = self.curriculum.phases[phase]
            cached = "latents" in batch
            shape = batch["latents"].shape[1:] if cached else self.bundle.latent_shape(p.frames, p.resolution)
            self.phase_flops[phase] = denoiser_flops(self.bundle, tuple(shape), self.device)
        self.flops_per_batch = self.phase_flops[phase] * len(batch["caption"])

    # -- state beyond weights and optimizer ---------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lifecycle"] = {"batches_seen": self.batches_seen, "guard": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["lifecycle"]
        self.batches_seen = state["batches_seen"]
        self.guard.load_state_dict(state["guard"])
