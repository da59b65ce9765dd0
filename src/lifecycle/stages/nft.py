"""`stage=nft`: DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117), online RL on the forward process.

Each epoch:
  1. draw batch_size·num_batches / group_size training prompts and sample `group_size` videos of each with the
     model's own deterministic sampler (flow models: the Euler ODE; DDPM-family models: DDIM), `sample.num_steps`
     steps and guidance `sample.guidance_scale`; no log-probabilities are needed, so any sampler would do;
  2. score them (no gradients), normalise the rewards within each group (as `stage=grpo`, several rewards
     included) and turn each advantage A into an optimality probability r = ½ + ½·clip(A/adv_clip_max, −1, 1);
  3. plan each sample's `nft.timesteps` training noise levels: K distinct steps of the sampler's schedule
     (uniform, drawn per sample), each with its own noise; x_t = alpha·x0 + sigma·noise (flow: alpha = 1 − t,
     sigma = t). At the epoch's start, before its first update, the current weights are the ones that sampled
     the rollouts, i.e. the old policy: its output at every planned (x_t, t) is computed then, once, and stored;
  4. optimizer steps over minibatches of samples, each accumulating the NFT loss (`diffusion/nft.py`) over all K
     planned levels of its samples: the implicit positive and negative policies (1 ∓ β)·p_old ± β·p_θ, with the
     adaptive weighting on the implied clean sample (`nft.adaptive`).

The network is trained on its conditional output (the paper's CFG-free objective): p_θ and p_old are taken
without guidance, whatever `sample.guidance_scale` the rollouts used. Works on flow-matching and DDPM-family
(epsilon, v_prediction, sample) models alike: the loss is written for any prediction kind. The loop, the grouped
prompts and advantages, checkpoints on epoch boundaries and exact resume are GRPO's and DDPO's: every epoch's
randomness (initial noise, noise levels and their noise, minibatch order) is a function of (seed, epoch, rank).
"""

from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler
from omegaconf import MISSING, DictConfig, OmegaConf

from ..config import check_prompts, positive
from ..diffusion.nft import nft_loss, optimality_probability
from ..diffusion.noise import add_noise, alpha_sigma
from ..diffusion.sampling import sample
from ..errors import ConfigError
from ..models import ModelBundle
from .base import AlignmentConfig
from .grpo import GRPORun, GRPOStage, check_groups


# -- config -------------------------------------------------------------------------------------
@dataclass
class SampleConfig:
    batch_size: int = MISSING  # videos per sampling batch, per device
    num_batches: int = MISSING  # sampling batches per epoch: batch_size·num_batches reward queries per device
    group_size: int = MISSING  # G: videos per prompt, whose rewards are normalised together
    same_noise_in_group: bool = MISSING  # one initial noise per group
    num_steps: int = MISSING  # sampling steps of the rollouts; their schedule holds the training noise levels
    guidance_scale: float = MISSING  # of the rollouts; 1: CFG off (training is CFG-free either way)


@dataclass
class NFTConfig:
    beta: float = MISSING  # β: how far the implicit policies step from the old one, (1 ∓ β)·p_old ± β·p_θ
    adv_clip_max: float = MISSING  # Z in r = ½ + ½·clip(A/Z, −1, 1)
    adaptive: bool = MISSING  # errors on the implied x0, divided by their mean absolute value
    timesteps: int = MISSING  # K training noise levels per sample and epoch, of the sampler's num_steps


@dataclass
class TrainConfig:
    inner_epochs: int = MISSING  # passes over an epoch's samples (at the same planned noise levels)
    batch_size: int = MISSING  # samples per minibatch
    accumulate: int = MISSING  # minibatches per optimizer step (gradients also accumulate over the K levels)


@dataclass
class Config(AlignmentConfig):
    epochs: int = MISSING
    sample: SampleConfig = field(default_factory=SampleConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    per_term_advantages: bool = MISSING  # several rewards: Σ w_k·norm(r_k) instead of norm(Σ w_k·r_k)
    gradient_checkpointing: bool = False

    @classmethod
    def text_to_video_only(cls, stage: DictConfig) -> bool:
        return True

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        check_prompts(cfg, "train")
        st, smp, tr = cfg.stage, cfg.stage.sample, cfg.stage.train
        positive(st, "epochs", "sample.batch_size", "sample.num_batches", "sample.group_size", "sample.num_steps",
                 "nft.beta", "nft.adv_clip_max", "nft.timesteps", "train.inner_epochs", "train.batch_size",
                 "train.accumulate")
        samples = check_groups(smp)
        if st.nft.timesteps > smp.num_steps:
            raise ConfigError(f"stage.nft.timesteps: {st.nft.timesteps} noise levels per sample, but the sampler's "
                              f"schedule has only sample.num_steps = {smp.num_steps}")
        if samples % tr.batch_size or (samples // tr.batch_size) % tr.accumulate:
            raise ConfigError(f"stage.train.batch_size: {tr.batch_size} x accumulate {tr.accumulate} must divide the "
                              f"{samples} samples of an epoch (sample.batch_size x sample.num_batches)")
        super().check(cfg)


# -- the LightningModule ------------------------------------------------------------------------
class NFTStage(GRPOStage):
    """GRPO's epoch loop (grouped prompts, group-normalised advantages) with deterministic rollouts and the NFT loss
    on planned forward-process noise levels in place of PPO on the sampling chain."""

    def __init__(self, bundle: ModelBundle, reward, prompts: list[str], frames: int, resolution: int, sample: dict,
                 nft: dict, train: dict, per_term_advantages: bool, optimizer: dict, lr_scheduler: dict,
                 gradient_clip: float | None = 1.0, seed: int = 0, guard: dict | None = None):
        super().__init__(bundle, reward, prompts, frames, resolution, sample, train, 0.0, per_term_advantages,
                         optimizer, lr_scheduler, gradient_clip, seed, guard)
        self.nft = dict(nft)

    def policy_scheduler(self, bundle: ModelBundle):
        """The bundle's own deterministic sampler (Euler ODE for flow models, DDIM otherwise)."""
        return bundle.inference_scheduler()

    def noise_levels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(denoiser timesteps, alpha, sigma), each (num_steps,), of the sampler's schedule: x_t = alpha·x0 + sigma·ε."""
        self.scheduler.set_timesteps(self.sample_cfg["num_steps"], device=self.device)
        timesteps = self.scheduler.timesteps
        if self.bundle.is_flow:
            t = self.scheduler.sigmas[: len(timesteps)].float().to(self.device)
            return timesteps, 1 - t, t
        alpha, sigma = alpha_sigma(self.bundle.scheduler.alphas_cumprod, timesteps)
        return timesteps, alpha.float(), sigma.float()

    # -- 1. sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_batch(self, prompts: list[str], noise: torch.Tensor, generator: torch.Generator) -> dict:
        """Clean samples x0, conditioning and each reward term (B, K) of one sampling batch (deterministic sampler)."""
        b, s = self.bundle, self.sample_cfg
        cond, uncond = b.encode_text(prompts), b.encode_text([""] * len(prompts))
        x0 = sample(b.denoise, self.scheduler, noise.to(self.device), cond, uncond, s["guidance_scale"], s["num_steps"])
        video = b.decode_latents(x0).float()
        terms = torch.stack([r.float() for r in self.reward.components(video, prompts).values()], dim=1)
        return {"x0": x0, "cond": cond, "uncond": uncond, "rewards": terms}

    def collect(self, prompts: list[str], generator: torch.Generator) -> dict:
        """GRPO's grouped rollouts, plus each sample's K planned noise levels, their noise and the old prediction."""
        rollout = super().collect(prompts, generator)
        n, k, steps = len(prompts), self.nft["timesteps"], self.sample_cfg["num_steps"]
        levels = torch.stack([torch.randperm(steps, generator=generator)[:k] for _ in range(n)]).to(self.device)
        noise = torch.randn((n, k, *rollout["x0"].shape[1:]), generator=generator)
        timesteps, alpha, sigma = self.noise_levels()
        rollout.update(timestep=timesteps[levels], alpha=alpha[levels], sigma=sigma[levels],
                       noise=noise.to(self.device, rollout["x0"].dtype))
        rollout["old"] = self.old_predictions(rollout)
        return rollout

    @torch.no_grad()
    def old_predictions(self, rollout: dict) -> torch.Tensor:
        """The current (= sampling) weights' conditional output at every planned (x_t, t), (N, K, ...), computed in
        training mode, as the loss's forward pass is."""
        size, out = self.sample_cfg["batch_size"], []
        for i in range(0, len(rollout["x0"]), size):
            rows = slice(i, i + size)
            cond = tuple(c[rows] for c in rollout["cond"])
            out.append(torch.stack([self.bundle.denoise(self.noised(rollout, rows, j), rollout["timestep"][rows, j],
                                                        *cond) for j in range(self.nft["timesteps"])], dim=1))
        return torch.cat(out)

    @staticmethod
    def noised(rollout: dict, rows, col) -> torch.Tensor:
        """x_t = alpha·x0 + sigma·noise of samples `rows` at their planned level(s) `col`."""
        return add_noise(rollout["x0"][rows], rollout["noise"][rows, col], rollout["alpha"][rows, col],
                         rollout["sigma"][rows, col])

    # -- 3. the NFT loss ------------------------------------------------------------------------
    def plan(self, generator: torch.Generator) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per optimizer step, its minibatches as (sample indices (b,), planned-level indices (b, K)): every inner
        epoch shuffles the samples and trains each on all K of its planned levels."""
        t, n, k = self.ppo_cfg, self.samples_per_epoch, self.nft["timesteps"]
        minibatches = []
        for _ in range(t["inner_epochs"]):
            order = torch.randperm(n, generator=generator)
            minibatches += [(idx, torch.arange(k).expand(len(idx), k)) for idx in order.split(t["batch_size"])]
        return [minibatches[i : i + t["accumulate"]] for i in range(0, len(minibatches), t["accumulate"])]

    def transition_terms(self, rows: torch.Tensor, col: torch.Tensor, cond: tuple, uncond: tuple) -> dict:
        """The NFT loss of samples `rows` at their `col`-th planned noise level, against the stored old prediction."""
        r, nft = self.rollout, self.nft
        x_t, timestep = self.noised(r, rows, col), r["timestep"][rows, col]
        pred, old = self.bundle.denoise(x_t, timestep, *cond), r["old"][rows, col]
        prob = optimality_probability(r["advantages"][rows], nft["adv_clip_max"])
        terms = nft_loss(self.bundle.prediction_type, pred, old, x_t, r["alpha"][rows, col], r["sigma"][rows, col],
                         r["x0"][rows], r["noise"][rows, col], prob, nft["beta"], nft["adaptive"])
        deviation = ((pred.detach().float() - old.float()) ** 2).mean()
        return {"loss": terms.loss, "positive_error": terms.positive, "negative_error": terms.negative,
                "old_deviation": deviation}


# -- runner -------------------------------------------------------------------------------------
class NFTRun(GRPORun):
    """Evaluate `model.pretrained` on prompts.train/test, train with DiffusionNFT, evaluate again, export."""

    config = Config
    method = "NFT"

    def check_bundle(self, bundle: ModelBundle) -> None:
        if bundle.image_encoder is not None:
            raise ConfigError(f"model: NFT trains text-to-video models; this one is image-to-video "
                              f"({type(bundle.denoiser).__name__} with an image encoder)")
        if not bundle.is_flow and not isinstance(bundle.inference_scheduler(), DDIMScheduler):
            raise ConfigError(f"model: NFT noises flow-matching and DDPM-family (DDIM-sampled) models; this is an EDM "
                              f"(Euler-sampled) model ({type(bundle.scheduler).__name__})")

    def module(self, bundle: ModelBundle) -> NFTStage:
        s = self.stage
        return NFTStage(
            bundle, self.reward, self.prompt_sets["train"], frames=s.frames, resolution=s.resolution,
            sample=OmegaConf.to_container(s.sample), nft=OmegaConf.to_container(s.nft),
            train=OmegaConf.to_container(s.train), per_term_advantages=s.per_term_advantages,
            optimizer=OmegaConf.to_container(s.optimizer), lr_scheduler=OmegaConf.to_container(s.lr_scheduler),
            gradient_clip=s.gradient_clip, seed=self.cfg.seed, guard=OmegaConf.to_container(s.guard),
        )


def run(cfg: DictConfig) -> dict:
    """`stage=nft`: evaluate `model.pretrained` on prompts.train/test, train with DiffusionNFT, evaluate again, export."""
    return NFTRun(cfg)()
