"""`stage=grpo`: group-relative policy optimisation (Flow-GRPO, Liu et al. 2025; DanceGRPO, Xue et al. 2025).

Each epoch:
  1. draw batch_size·num_batches / group_size training prompts and sample `group_size` videos of each (with
     `sample.same_noise_in_group`, one initial noise per group, as DanceGRPO), recording every step's latents and
     log-probability: flow-matching models with the marginal-preserving SDE (noise level `sample.noise_level`,
     `diffusion/grpo.py`), DDIM models with the stochastic DDIM step (`sample.eta`, `diffusion/ddpo.py`);
  2. score them (no gradients) and normalise the rewards within each group; with several rewards
     (`reward=[a,b]`) either the weighted sum is normalised, or each term is (`per_term_advantages`);
  3. PPO as `stage=ddpo` (the epoch's plan, random `ppo.timestep_fraction` of each trajectory's steps, clipped
     ratio), plus `kl_beta`·KL(π_θ ‖ π_ref) per transition, in closed form between the two Gaussian steps; the
     reference is the network with its LoRA adapters off, or a frozen copy of the start model (full fine-tuning).

Training samples with `sample.num_steps` (few) and `sample.guidance_scale` (1: CFG off in training), evaluation
with `evaluation.num_steps`. The loop, checkpoints on epoch boundaries and exact resume are DDPO's (DDPOStage):
every epoch's randomness is a function of (seed, epoch, rank), and groups never span ranks.
"""

import copy
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler
from omegaconf import MISSING, DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ..config import check_prompts, positive
from ..data.prompts import PromptStream
from ..diffusion.ddpo import GaussianStep, ddim_step_with_logprob, ddpo_scheduler, guided_prediction, ppo_loss, \
    sample_with_logprob
from ..diffusion.grpo import flow_sample_with_logprob, flow_sde_step_with_logprob, flow_sde_times, gaussian_kl, \
    multi_reward_advantages
from ..errors import ConfigError
from ..models import ModelBundle
from ..models.lora import has_lora
from .base import AlignmentConfig
from . import ddpo
from .ddpo import DDPORun, DDPOStage, _Repeat, concat_batches
from .dpo import adapters_disabled


# -- config -------------------------------------------------------------------------------------
@dataclass
class SampleConfig:
    batch_size: int = MISSING  # videos per sampling batch, per device
    num_batches: int = MISSING  # sampling batches per epoch: batch_size·num_batches reward queries per device
    group_size: int = MISSING  # G: videos per prompt, whose rewards are normalised together
    same_noise_in_group: bool = MISSING  # one initial noise per group (DanceGRPO)
    num_steps: int = MISSING  # sampling steps in training (evaluation: evaluation.num_steps)
    guidance_scale: float = MISSING  # in training; 1: CFG off
    noise_level: float = MISSING  # flow models: a in σ_t = a·sqrt(t/(1 − t))
    eta: float = MISSING  # DDIM models: > 0, the stochastic DDIM step


@dataclass
class PPOConfig(ddpo.PPOConfig):
    timestep_fraction: float = MISSING  # the yamls differ (Flow-GRPO: 0.99, DDPO: 1.0)


@dataclass
class Config(AlignmentConfig):
    epochs: int = MISSING
    sample: SampleConfig = field(default_factory=SampleConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    kl_beta: float = MISSING  # weight of KL(π_θ ‖ π_ref) per transition; 0: no reference model
    per_term_advantages: bool = MISSING  # several rewards: Σ w_k·norm(r_k) instead of norm(Σ w_k·r_k)
    gradient_checkpointing: bool = False

    @classmethod
    def text_to_video_only(cls, stage: DictConfig) -> bool:
        return True

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        check_prompts(cfg, "train")
        st, smp, ppo = cfg.stage, cfg.stage.sample, cfg.stage.ppo
        positive(st, "epochs", "sample.batch_size", "sample.num_batches", "sample.group_size", "sample.num_steps",
                 "sample.noise_level", "sample.eta", "ppo.inner_epochs", "ppo.batch_size", "ppo.accumulate",
                 "ppo.clip_range", "ppo.adv_clip_max")
        if st.kl_beta < 0:
            raise ConfigError(f"stage.kl_beta: must be >= 0 (0: no KL penalty), got {st.kl_beta}")
        samples = check_groups(smp)
        if not 0 < ppo.timestep_fraction <= 1:
            raise ConfigError(f"stage.ppo.timestep_fraction: must be in (0, 1], got {ppo.timestep_fraction}")
        if samples % ppo.batch_size or (samples // ppo.batch_size) % ppo.accumulate:
            raise ConfigError(f"stage.ppo.batch_size: {ppo.batch_size} x accumulate {ppo.accumulate} must divide the "
                              f"{samples} samples of an epoch (sample.batch_size x sample.num_batches)")
        super().check(cfg)


def check_groups(sample: DictConfig) -> int:
    """`stage.sample`'s groups (GRPO, NFT): at least 2 samples each, dividing an epoch's samples (returned)."""
    if sample.group_size < 2:
        raise ConfigError(f"stage.sample.group_size: a group needs at least 2 samples to compare, got {sample.group_size}")
    samples = sample.batch_size * sample.num_batches
    if samples % sample.group_size:
        raise ConfigError(f"stage.sample.group_size: {sample.group_size} must divide the {samples} samples of an epoch "
                          f"(sample.batch_size x sample.num_batches)")
    return samples


# -- the LightningModule ------------------------------------------------------------------------
class GRPOStage(DDPOStage):
    """DDPO's epoch loop with grouped rollouts, group-normalised advantages and a KL penalty to the reference."""

    method = "GRPO"

    def __init__(self, bundle: ModelBundle, reward, prompts: list[str], frames: int, resolution: int, sample: dict,
                 ppo: dict, kl_beta: float, per_term_advantages: bool, optimizer: dict, lr_scheduler: dict,
                 gradient_clip: float | None = 1.0, seed: int = 0, guard: dict | None = None):
        super().__init__(bundle, reward, prompts, frames, resolution, sample, ppo, None, optimizer, lr_scheduler,
                         gradient_clip, seed, guard)
        self.group_size, self.kl_beta, self.per_term = sample["group_size"], kl_beta, per_term_advantages
        # With LoRA the reference is the adapter-free base network; otherwise a frozen copy of the start.
        self.reference = None
        if kl_beta > 0 and not has_lora(bundle.denoiser):
            start = copy.deepcopy(bundle.denoiser).requires_grad_(False).eval()
            self.reference = ModelBundle(start, None, None, bundle.scheduler)

    def policy_scheduler(self, bundle: ModelBundle):
        """Flow models: the Euler scheduler whose sigmas are the SDE's times; DDIM models: DDPO's."""
        return bundle.inference_scheduler() if bundle.is_flow else ddpo_scheduler(bundle.inference_scheduler())

    # -- 1. sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_batch(self, prompts: list[str], noise: torch.Tensor, generator: torch.Generator) -> dict:
        """Trajectories, log-probabilities, conditioning and each reward term (B, K) of one sampling batch."""
        b, s = self.bundle, self.sample_cfg
        cond, uncond = b.encode_text(prompts), b.encode_text([""] * len(prompts))
        step_generator = torch.Generator(self.device).manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        if b.is_flow:
            latents, log_probs, timesteps = flow_sample_with_logprob(
                b.denoise, self.scheduler, noise.to(self.device), cond, uncond, s["guidance_scale"], s["num_steps"],
                s["noise_level"], step_generator)
        else:
            latents, log_probs, timesteps = sample_with_logprob(
                b.denoise, self.scheduler, noise.to(self.device), cond, uncond, s["guidance_scale"], s["num_steps"],
                s["eta"], step_generator)
        video = b.decode_latents(latents[:, -1]).float()
        terms = torch.stack([r.float() for r in self.reward.components(video, prompts).values()], dim=1)
        return {"latents": latents, "log_probs": log_probs, "timesteps": timesteps.expand(len(prompts), -1),
                "cond": cond, "uncond": uncond, "rewards": terms}

    def collect(self, prompts: list[str], generator: torch.Generator) -> dict:
        """The epoch's G·P videos in `num_batches` batches; `prompts` holds each group's prompt G times in a row."""
        size, g = self.sample_cfg["batch_size"], self.group_size
        shape = self.bundle.latent_shape(self.frames, self.resolution)
        if self.sample_cfg["same_noise_in_group"]:
            noise = torch.randn((len(prompts) // g, *shape), generator=generator).repeat_interleave(g, dim=0)
        else:
            noise = torch.randn((len(prompts), *shape), generator=generator)
        self.bundle.denoiser.eval()
        batches = [self.sample_batch(prompts[i : i + size], noise[i : i + size], generator)
                   for i in range(0, len(prompts), size)]
        self.bundle.denoiser.train()
        return concat_batches(batches)

    # -- 2. advantages --------------------------------------------------------------------------
    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's group-normalised advantages, every rank's weighted rewards) from the reward terms (B, K)."""
        weights = torch.tensor(list(self.reward.weights.values()), dtype=rewards.dtype, device=rewards.device)
        groups = torch.arange(len(prompts) // self.group_size, device=rewards.device).repeat_interleave(self.group_size)
        adv = multi_reward_advantages(rewards.T, weights, groups, per_term=self.per_term)
        return adv, self.all_gather(rewards @ weights).reshape(-1)

    # -- 3. PPO with the KL penalty -------------------------------------------------------------
    def policy_step(self, denoise, x_t: torch.Tensor, timestep: torch.Tensor, index: torch.Tensor,
                    x_next: torch.Tensor, cond: tuple, uncond: tuple) -> GaussianStep:
        """The Gaussian step (B,) of `denoise` from x_t at sampling step `index` (B,), evaluated at x_next."""
        s = self.sample_cfg
        pred = guided_prediction(denoise, x_t, timestep, cond, uncond, s["guidance_scale"])
        if self.bundle.is_flow:
            t, t_next, t_max = flow_sde_times(self.scheduler, index)
            return flow_sde_step_with_logprob(pred, x_t, t, t_next, s["noise_level"], t_max, prev_sample=x_next)
        return ddim_step_with_logprob(self.scheduler, pred, timestep, x_t, s["eta"], prev_sample=x_next)

    def reference_denoise(self, x_t: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        if self.reference is not None:
            return self.reference.denoise(x_t, timestep, *cond)
        with adapters_disabled(self.bundle.denoiser):
            return self.bundle.denoise(x_t, timestep, *cond)

    def transition_terms(self, rows: torch.Tensor, col: torch.Tensor, cond: tuple, uncond: tuple) -> dict:
        """loss = PPO's clipped surrogate + kl_beta·KL(π_θ ‖ π_ref), on transitions (rows, col)."""
        r, p = self.rollout, self.ppo_cfg
        x_t, timestep, x_next = r["latents"][rows, col], r["timesteps"][rows, col], r["latents"][rows, col + 1]
        step = self.policy_step(self.bundle.denoise, x_t, timestep, col, x_next, cond, uncond)
        policy_loss, approx_kl, clipped = ppo_loss(r["advantages"][rows], step.log_prob, r["log_probs"][rows, col],
                                                   p["clip_range"], p["adv_clip_max"])
        out = {"policy_loss": policy_loss.detach(), "approx_kl": approx_kl, "clip_fraction": clipped}
        if self.kl_beta > 0:
            with torch.no_grad():
                ref = self.policy_step(self.reference_denoise, x_t, timestep, col, x_next, cond, uncond)
            kl = gaussian_kl(step.mean, ref.mean, step.std).mean()
            out["kl"] = kl.detach()
            return {"loss": policy_loss + self.kl_beta * kl, **out}
        return {"loss": policy_loss, **out}

    def train_dataloader(self) -> DataLoader:
        """Each epoch's P prompts, each G times in a row, once per optimizer step of the epoch."""
        start = self.updates // self.updates_per_epoch
        stream = PromptStream(self.prompts, self.samples_per_epoch // self.group_size, seed=self.seed,
                              start_batch=start, rank=self.global_rank, world_size=self.trainer.world_size)
        return DataLoader(_Repeat(_Groups(stream, self.group_size), self.updates_per_epoch), batch_size=None)


class _Groups(torch.utils.data.IterableDataset):
    """Each prompt batch of `stream` with every prompt `size` times in a row."""

    def __init__(self, stream, size: int):
        self.stream, self.size = stream, size

    def __iter__(self):
        for item in self.stream:
            yield {"prompts": [p for p in item["prompts"] for _ in range(self.size)]}


# -- runner -------------------------------------------------------------------------------------
class GRPORun(DDPORun):
    """Evaluate `model.pretrained` on prompts.train/test, train with GRPO, evaluate again, export."""

    config = Config
    method = GRPOStage.method

    def check_bundle(self, bundle: ModelBundle) -> None:
        if bundle.image_encoder is not None:
            raise ConfigError(f"model: GRPO trains text-to-video models; this one is image-to-video "
                              f"({type(bundle.denoiser).__name__} with an image encoder)")
        if not bundle.is_flow and not isinstance(bundle.inference_scheduler(), DDIMScheduler):
            raise ConfigError(f"model: GRPO samples flow-matching models with the SDE and DDIM models with stochastic "
                              f"DDIM; this is an EDM (Euler-sampled) model ({type(bundle.scheduler).__name__})")

    def module(self, bundle: ModelBundle) -> GRPOStage:
        s = self.stage
        return GRPOStage(
            bundle, self.reward, self.prompt_sets["train"], frames=s.frames, resolution=s.resolution,
            sample=OmegaConf.to_container(s.sample), ppo=OmegaConf.to_container(s.ppo), kl_beta=s.kl_beta,
            per_term_advantages=s.per_term_advantages, optimizer=OmegaConf.to_container(s.optimizer),
            lr_scheduler=OmegaConf.to_container(s.lr_scheduler), gradient_clip=s.gradient_clip, seed=self.cfg.seed,
            guard=OmegaConf.to_container(s.guard),
        )


def run(cfg: DictConfig) -> dict:
    """`stage=grpo`: evaluate `model.pretrained` on prompts.train/test, train with GRPO, evaluate again, export."""
    return GRPORun(cfg)()
