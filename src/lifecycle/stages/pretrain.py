"""`stage=pretrain` (and `stage=sft`): the denoising objective over a resolution/frame-count curriculum.

Per step: encode video and caption, draw t and noise (with offset), noise the latents, predict,
convert the prediction into the loss space, Min-SNR-γ-weighted MSE, guard, clip, step.
A batch from a latent cache brings `latents` and text embeddings (`hidden`, `pooled`) instead of
`video`: the VAE and text encoder are then not run.
"""

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ThroughputMonitor
from omegaconf import MISSING, DictConfig, OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ..callbacks.ema import EMA
from ..callbacks.validation import Validation, best_checkpoint
from ..config import check_metrics, choice, positive
from ..data.curriculum import Curriculum
from ..data.datamodule import ShardDataModule
from ..data.latent_cache import check_cache, read_manifest
from ..data.oracle import ORACLE_COLUMNS
from ..diffusion import noise as nz
from ..distributed import shard
from ..errors import ConfigError
from ..metrics.quality import build_quality
from ..models import ModelBundle
from ..models.bundle import sample_posterior
from ..models.memory import enable_gradient_checkpointing
from .base import FineTuneConfig, GuardConfig, LoRAConfig
from .guard import LossGuard
from .optim import adamw_with_schedule, guarded_step, log_step, sample_seed
from .runner import TrainingRun

log = logging.getLogger(__name__)


# -- config -------------------------------------------------------------------------------------
@dataclass
class PhaseConfig:
    name: str = MISSING
    resolution: int = MISSING
    frames: int = MISSING
    batch_size: int = MISSING
    steps: int = MISSING


@dataclass
class ObjectiveConfig:
    loss_space: Optional[str] = None  # epsilon | v_prediction | sample; null = what the model predicts
    min_snr_gamma: Optional[float] = MISSING
    min_snr_floor: float = MISSING
    noise_offset: float = MISSING
    caption_dropout: float = 0.1
    flow_timesteps: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class EMAConfig:
    decay: Optional[float] = MISSING  # null disables EMA
    every: int = 1


@dataclass
class ValidationConfig:
    prompts: Any = MISSING
    num_steps: int = 25
    guidance_scale: float = 3.0
    seed: int = 0
    every_n_steps: int = MISSING
    fps: int = 8
    batch_size: int = 48
    oracle: bool = True
    metrics: bool = True  # the `metrics` group's FID, KID, CLIP score, temporal consistency and motion
    best: Optional[str] = MISSING  # keep checkpoints/best.ckpt by this logged metric, e.g. val/fid
    mode: str = "min"


@dataclass
class Config(FineTuneConfig):
    curriculum: list[PhaseConfig] = MISSING
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    lora: Optional[LoRAConfig] = MISSING  # null: full fine-tuning
    accumulate: int = 1
    train_text_encoder: bool = MISSING
    select: Any = MISSING  # null, or train on a curated subset: {min: {score: t}, where: {key: [values]}, keys: file}
    gradient_checkpointing: bool = False  # activation checkpointing per denoiser block
    compile: bool = False  # torch.compile the denoiser's forward (in place)

    @classmethod
    def resolutions(cls, stage: DictConfig) -> dict[str, int]:
        return {f"stage.curriculum[{i}].resolution": p.resolution for i, p in enumerate(stage.curriculum)}

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        st = cfg.stage
        choice("stage.objective.loss_space", st.objective.loss_space, [k for k in nz.PREDICTION_KINDS if k != "flow"])
        choice("stage.objective.flow_timesteps", st.objective.flow_timesteps, nz.FLOW_T_SCHEMES)
        for i, phase in enumerate(st.curriculum):
            positive(phase, "resolution", "frames", "batch_size", "steps", prefix=f"stage.curriculum[{i}]")
        for rule in st.select or {}:
            if rule not in ("min", "where", "keys"):
                raise ConfigError(f"stage.select.{rule}: unknown rule (min, where or keys)")
        if st.select and st.select.get("keys") and not os.path.isfile(os.path.expanduser(st.select["keys"])):
            raise ConfigError(f"stage.select.keys: no key list {st.select['keys']!r}")
        val = st.validation
        if val.every_n_steps < 0:
            raise ConfigError(f"stage.validation.every_n_steps: must be >= 0 (0: only at the end), got {val.every_n_steps}")
        choice("stage.validation.mode", val.mode, ("min", "max"))
        if val.metrics:
            check_metrics(cfg)
        if val.best:
            choice("stage.validation.best", val.best, [f"val/{k}" for k in validation_scores(cfg)])
        if st.accumulate < 1:
            raise ConfigError(f"stage.accumulate: must be >= 1, got {st.accumulate}")
        cls.check_latent_cache(cfg)

    @staticmethod
    def check_latent_cache(cfg: DictConfig) -> None:
        """A latent cache as data.shards fixes frames, resolution and the caption embeddings."""
        cache = read_manifest(cfg.data.shards)
        if cache is None:
            return
        if cfg.stage.train_text_encoder:
            raise ConfigError("stage.train_text_encoder: data.shards is a latent cache, which holds fixed caption "
                              "embeddings; set it false")
        for i, phase in enumerate(cfg.stage.curriculum):
            if (phase.frames, phase.resolution) != (cache["frames"], cache["resolution"]):
                raise ConfigError(f"stage.curriculum[{i}]: {phase.frames} frames at {phase.resolution} px, but the "
                                  f"latent cache holds {cache['frames']} frames at {cache['resolution']} px")


def validation_scores(cfg: DictConfig) -> list[str]:
    """The scores `stage.validation` logs as val/<name> (lifecycle.callbacks.validation)."""
    val, m = cfg.stage.validation, cfg.metrics
    scores = list(ORACLE_COLUMNS) if val.oracle else []
    if val.metrics:
        scores += ["temporal_consistency", "motion", *(["fid"] if m.fid else []), *(["kid"] if m.kid else []),
                   *(["clip_score"] if m.clip_score else [])]
    return scores


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
        return [torch.Generator(device=self.device).manual_seed(sample_seed(self.seed, self.batches_seen, i))
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


# -- runner -------------------------------------------------------------------------------------
class PretrainRun(TrainingRun):
    """Train the denoiser over the curriculum with validation; export the EMA bundle."""

    config = Config

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.curriculum = Curriculum(OmegaConf.to_container(cfg.stage.curriculum, resolve=True))
        self.validation = self.best = self.ema = None

    def sampling(self, bundle: ModelBundle) -> dict:
        return {}  # validation samples at the last phase's frames and resolution (`callbacks`)

    def prepare(self, bundle: ModelBundle) -> None:
        s = self.stage
        need = bundle.fixed_frames
        for i, phase in enumerate(self.curriculum.phases):
            if need is not None and phase.frames != need:
                raise ConfigError(f"stage.curriculum[{i}].frames: {type(bundle.denoiser).__name__} takes exactly "
                                  f"{need} frame(s), got {phase.frames} (vary resolution and batch size instead)")
        if (cache := read_manifest(self.cfg.data.shards)) is not None:
            check_cache(cache, bundle, self.curriculum.phases, s.train_text_encoder)
        if s.gradient_checkpointing:
            enable_gradient_checkpointing(bundle.denoiser)
        if s.compile:  # nn.Module.compile keeps the module's class and state-dict keys: dispatch and export unchanged
            bundle.denoiser.compile()

    def max_steps(self, module=None) -> int:
        return self.cfg.trainer.max_steps or self.curriculum.total_steps

    def module(self, bundle: ModelBundle) -> DenoiseStage:
        s = self.stage
        return DenoiseStage(
            bundle, self.curriculum,
            objective=OmegaConf.to_container(s.objective), optimizer=OmegaConf.to_container(s.optimizer),
            lr_scheduler=OmegaConf.to_container(s.lr_scheduler), guard=OmegaConf.to_container(s.guard),
            gradient_clip=s.gradient_clip, accumulate=s.accumulate, train_text_encoder=s.train_text_encoder,
            max_steps=self.max_steps(), seed=self.cfg.seed,
        )

    def datamodule(self, module: DenoiseStage) -> ShardDataModule:
        cfg, s = self.cfg, self.stage
        return ShardDataModule(
            cfg.data.shards, self.curriculum, seed=cfg.seed, num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer, accumulate=s.accumulate, generate=cfg.data.generate,
            select=OmegaConf.to_container(s.select) if s.select else None, split=cfg.data.split,
            balance=OmegaConf.to_container(cfg.data.balance) if cfg.data.balance else None,
            caption_key=cfg.data.caption_key, decoded_cache_mb=cfg.data.decoded_cache_mb,
            max_bad_in_a_row=cfg.data.max_bad_in_a_row, max_bad_share=cfg.data.max_bad_share,
        )

    def callbacks(self, module: DenoiseStage) -> list:
        cfg, s, run_dir = self.cfg, self.stage, self.run_dir
        last, val = self.curriculum.phases[-1], s.validation
        self.validation = Validation(
            run_dir / "samples", prompts=instantiate(val.prompts), frames=last.frames, resolution=last.resolution,
            quality=build_quality(cfg.metrics, last.frames, last.resolution) if val.metrics else None,
            **{k: v for k, v in OmegaConf.to_container(val).items() if k not in ("prompts", "metrics", "best", "mode")},
        )
        if val.best and val.every_n_steps:
            self.best = best_checkpoint(run_dir, val.best, val.mode, val.every_n_steps)
        if val.best and not val.every_n_steps:
            log.info("stage.validation.best: no best checkpoint, validation runs only at the end (every_n_steps=0)")
        self.ema = EMA(decay=s.ema.decay, every=s.ema.every) if s.ema.decay else None
        # samples/s, FLOP/s and MFU (where Lightning knows the device's peak) from the module's flops_per_batch
        throughput = ThroughputMonitor(batch_size_fn=lambda batch: len(batch["caption"]),
                                       window_size=cfg.trainer.throughput_window)
        return [c for c in (self.ema, self.validation, throughput, self.best) if c is not None]

    def result(self, module: DenoiseStage, trainer) -> dict:
        result = dict(self.validation.results.get("final", {}))
        if self.best is not None and self.best.best_model_path:
            result["best"] = {"path": self.best.best_model_path,
                              self.stage.validation.best: self.best.best_model_score.item()}
        return result

    def exporting(self, module: DenoiseStage, bundle: ModelBundle):
        return self.ema.swapped(module) if self.ema else nullcontext()

    def lineage_data(self):
        return self.cfg.data.shards


def run(cfg: DictConfig) -> dict:
    """`stage=pretrain` and `stage=sft`: train the denoiser over the curriculum with validation, export the EMA
    bundle."""
    return PretrainRun(cfg)()
