"""`stage=ddpo`: DDPO (Black et al. 2023, DDPO_IS): reinforcement learning on the denoising chain with PPO.

Each epoch:
  1. sample batch_size·num_batches videos from the training prompts with stochastic DDIM (eta > 0)
     and classifier-free guidance, recording every step's latents and log-probability;
  2. score them with the reward (no gradients needed) and turn the rewards into per-prompt
     normalised advantages;
  3. `inner_epochs` times: shuffle the samples, pick a random `timestep_fraction` of each
     trajectory's steps, and per minibatch re-evaluate the log-probabilities of those transitions
     under the current weights, accumulating the clipped PPO gradient over the timesteps (and
     `accumulate` minibatches) into one optimizer step.

One Lightning training step is one optimizer step; an epoch is `updates_per_epoch` of them.
Checkpoints fall on epoch boundaries, so the state to resume is the weights, the optimizer, the
per-prompt reward histories and the counters; every epoch's randomness is seeded by
(seed, epoch, rank).
"""

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import lightning as L
import torch
from diffusers import DDIMScheduler
from omegaconf import MISSING, DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ..config import check_prompts, positive
from ..data.prompts import PromptStream
from ..diffusion.ddpo import (
    PerPromptStatTracker,
    ddpo_scheduler,
    normalise,
    ppo_loss,
    sample_with_logprob,
    transition_log_prob,
)
from ..distributed import shard
from ..errors import ConfigError
from ..models import ModelBundle
from ..models.memory import enable_gradient_checkpointing
from ..rewards.base import Reward
from .base import AlignmentConfig, EvaluationConfig
from .guard import LossGuard
from .optim import adamw_with_schedule, check_trainable, keep_trainable, log_step, optimizer_step, step_seed
from .runner import TrainingRun

log = logging.getLogger(__name__)


# -- config -------------------------------------------------------------------------------------
@dataclass
class SampleConfig:
    batch_size: int = 4  # videos per sampling batch, per device
    num_batches: int = 2  # sampling batches per epoch: batch_size·num_batches reward queries per device
    num_steps: int = 20
    guidance_scale: float = 3.0
    eta: float = 1.0  # > 0: stochastic DDIM, the policy whose log-probabilities PPO ratios


@dataclass
class PerPromptStatsConfig:
    buffer_size: int = 32  # rewards kept per prompt
    min_count: int = 16  # normalise by the batch until a prompt has this many


@dataclass
class PPOConfig:
    inner_epochs: int = 1
    batch_size: int = 4  # samples per minibatch
    accumulate: int = 1  # minibatches per optimizer step
    timestep_fraction: float = 1.0  # fraction of each trajectory's steps trained on
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0


@dataclass
class Config(AlignmentConfig):
    epochs: int = MISSING
    sample: SampleConfig = field(default_factory=SampleConfig)
    per_prompt_stats: Optional[PerPromptStatsConfig] = field(default_factory=PerPromptStatsConfig)  # null: batch
    ppo: PPOConfig = field(default_factory=PPOConfig)
    gradient_checkpointing: bool = False
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    ddim_only: ClassVar[bool] = True

    @classmethod
    def text_to_video_only(cls, stage: DictConfig) -> bool:
        return True

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        check_prompts(cfg, "train", "test")
        st, smp, ppo = cfg.stage, cfg.stage.sample, cfg.stage.ppo
        positive(st, "epochs", "frames", "resolution", "sample.batch_size", "sample.num_batches", "sample.num_steps",
                 "sample.eta", "ppo.inner_epochs", "ppo.batch_size", "ppo.accumulate", "ppo.clip_range",
                 "ppo.adv_clip_max")
        if not 0 < ppo.timestep_fraction <= 1:
            raise ConfigError(f"stage.ppo.timestep_fraction: must be in (0, 1], got {ppo.timestep_fraction}")
        samples = smp.batch_size * smp.num_batches
        if samples % ppo.batch_size or (samples // ppo.batch_size) % ppo.accumulate:
            raise ConfigError(f"stage.ppo.batch_size: {ppo.batch_size} x accumulate {ppo.accumulate} must divide the "
                              f"{samples} samples of an epoch (sample.batch_size x sample.num_batches)")
        stats = st.per_prompt_stats
        if stats is not None and not 1 <= stats.min_count <= stats.buffer_size:
            raise ConfigError(f"stage.per_prompt_stats.min_count: must be in 1..buffer_size ({stats.buffer_size}), "
                              f"got {stats.min_count}")
        super().check(cfg)


# -- the LightningModule ------------------------------------------------------------------------


def updates_per_epoch(samples: int, ppo: dict) -> int:
    """Optimizer steps in one epoch: inner_epochs · (minibatches per pass) / accumulate."""
    return ppo["inner_epochs"] * (samples // ppo["batch_size"]) // ppo["accumulate"]


class DDPOStage(L.LightningModule):
    method = "DDPO"  # the algorithm's name in messages and the report (subclasses name theirs)

    def __init__(
        self,
        bundle: ModelBundle,
        reward: Reward,
        prompts: list[str],
        frames: int,
        resolution: int,
        sample: dict,
        ppo: dict,
        per_prompt_stats: dict | None,
        optimizer: dict,
        lr_scheduler: dict,
        gradient_clip: float | None = 1.0,
        seed: int = 0,
        guard: dict | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self.bundle, self.reward, self.prompts = bundle, reward, list(prompts)
        self.frames, self.resolution = frames, resolution
        self.sample_cfg, self.ppo_cfg = dict(sample), dict(ppo)
        self.optim_cfg, self.sched_cfg = dict(optimizer), dict(lr_scheduler)
        self.gradient_clip, self.seed = gradient_clip, seed
        self.guard = LossGuard(**(guard or {"spike_factor": None}))
        self.samples_per_epoch = sample["batch_size"] * sample["num_batches"]
        self.updates_per_epoch = updates_per_epoch(self.samples_per_epoch, ppo)
        self.tracker = PerPromptStatTracker(**per_prompt_stats) if per_prompt_stats else None
        self.scheduler = self.policy_scheduler(bundle)
        self.updates = 0  # optimizer steps taken
        self.reward_queries = 0  # videos scored, all ranks
        self.rollout: dict | None = None  # the current epoch's samples and PPO plan
        bundle.denoiser.train()  # from_pretrained leaves every component in eval mode
        for frozen in (bundle.text_encoder, bundle.vae, reward):
            if frozen is not None:
                frozen.requires_grad_(False).eval()

    def policy_scheduler(self, bundle: ModelBundle):
        """The scheduler whose stochastic steps are the policy: DDIM ending at ᾱ_0 (every step has σ > 0)."""
        return ddpo_scheduler(bundle.inference_scheduler())

    # -- 1. sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_batch(self, prompts: list[str], generator: torch.Generator) -> dict:
        """Trajectories, log-probabilities, conditioning and rewards of one sampling batch."""
        b, s = self.bundle, self.sample_cfg
        noise = torch.randn((len(prompts), *b.latent_shape(self.frames, self.resolution)), generator=generator)
        cond, uncond = b.encode_text(prompts), b.encode_text([""] * len(prompts))
        eta_generator = torch.Generator(self.device).manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        latents, log_probs, timesteps = sample_with_logprob(
            b.denoise, self.scheduler, noise.to(self.device), cond, uncond, s["guidance_scale"], s["num_steps"],
            s["eta"], eta_generator)
        video = b.decode_latents(latents[:, -1])
        return {"latents": latents, "log_probs": log_probs, "timesteps": timesteps.expand(len(prompts), -1),
                "cond": cond, "uncond": uncond, "rewards": self.reward(video.float(), prompts).float()}

    def collect(self, prompts: list[str], generator: torch.Generator) -> dict:
        """Sample the epoch's videos in `num_batches` batches (denoiser in eval mode) and concatenate them."""
        size = self.sample_cfg["batch_size"]
        self.bundle.denoiser.eval()
        batches = [self.sample_batch(prompts[i : i + size], generator) for i in range(0, len(prompts), size)]
        self.bundle.denoiser.train()
        return concat_batches(batches)

    # -- 2. advantages --------------------------------------------------------------------------
    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's advantages, every rank's rewards): statistics are over all ranks' samples."""
        index = torch.tensor([self.prompts.index(p) for p in prompts], device=self.device)
        all_rewards = self.all_gather(rewards).reshape(-1)
        all_index = self.all_gather(index).reshape(-1)
        if self.tracker is None:
            adv = normalise(all_rewards, all_rewards.mean(), all_rewards.std(correction=0), 1e-6)
        else:
            adv = self.tracker.update([self.prompts[i] for i in all_index.tolist()], all_rewards)
        n = len(prompts)
        return adv[self.global_rank * n : (self.global_rank + 1) * n], all_rewards

    # -- 3. PPO ---------------------------------------------------------------------------------
    def plan(self, generator: torch.Generator) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per optimizer step, its minibatches as (sample indices (b,), step indices (b, K)).

        Each inner epoch shuffles the samples and gives every sample its own random K =
        max(1, int(timestep_fraction · num_steps)) of the trajectory's steps.
        """
        p, n, steps = self.ppo_cfg, self.samples_per_epoch, self.sample_cfg["num_steps"]
        k = max(1, int(p["timestep_fraction"] * steps))
        minibatches = []
        for _ in range(p["inner_epochs"]):
            order = torch.randperm(n, generator=generator)
            columns = torch.stack([torch.randperm(steps, generator=generator)[:k] for _ in range(n)])
            minibatches += [(idx, columns[idx]) for idx in order.split(p["batch_size"])]
        return [minibatches[i : i + p["accumulate"]] for i in range(0, len(minibatches), p["accumulate"])]

    def transition_terms(self, rows: torch.Tensor, col: torch.Tensor, cond: tuple, uncond: tuple) -> dict:
        """The loss of transitions (rows, col) under the current weights (key `loss`, with graph) and its
        detached statistics: DDPO's clipped surrogate."""
        r, p, s = self.rollout, self.ppo_cfg, self.sample_cfg
        log_prob = transition_log_prob(
            self.bundle.denoise, self.scheduler, r["latents"][rows, col], r["timesteps"][rows, col],
            r["latents"][rows, col + 1], cond, uncond, s["guidance_scale"], s["eta"])
        loss, kl, clipped = ppo_loss(r["advantages"][rows], log_prob, r["log_probs"][rows, col],
                                     p["clip_range"], p["adv_clip_max"])
        return {"loss": loss, "approx_kl": kl, "clip_fraction": clipped}

    def ppo_update(self, minibatches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Accumulate the loss's gradient over the minibatches' chosen transitions; one optimizer step."""
        r = self.rollout
        opt, sched = self.optimizers(), self.lr_schedulers()
        terms = minibatches[0][1].shape[1] * len(minibatches)
        stats = []
        for idx, columns in minibatches:
            rows = idx.to(self.device)
            cond = tuple(c[rows] for c in r["cond"])
            uncond = tuple(c[rows] for c in r["uncond"])
            for j in range(columns.shape[1]):
                out = self.transition_terms(rows, columns[:, j].to(self.device), cond, uncond)
                self.manual_backward(out["loss"] / terms)
                stats.append({k: v.detach() for k, v in out.items()})
        grad_norm = optimizer_step(self, self.guard, self.gradient_clip)
        means = {f"train/{k}": torch.stack([s[k] for s in stats]).mean() for k in stats[0]}
        if grad_norm is None:  # rejected, gradients dropped: the update still takes its slot (no weight moves), so
            opt.step()         # epochs and checkpoints stay on their boundaries
            sched.step()
            grad_norm = torch.tensor(float("nan"))
        else:
            self.guard.update(means["train/loss"].item())
        return {**means, "train/grad_norm": grad_norm, "train/lr": sched.get_last_lr()[0],
                "guard/skipped_updates": float(self.guard.rejected)}

    # -- loop -----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        epoch, step = divmod(self.updates, self.updates_per_epoch)
        if step == 0:  # a new epoch: collect fresh on-policy samples
            g = self.epoch_generator(epoch)
            rollout = self.collect(batch["prompts"], g)
            rollout["advantages"], rollout["all_rewards"] = self.advantages(batch["prompts"], rollout["rewards"])
            rollout["plan"] = self.plan(g)
            self.rollout = rollout
            self.reward_queries += len(rollout["all_rewards"])
        metrics = self.ppo_update(self.rollout["plan"][step])
        self.updates += 1
        rewards = self.rollout["all_rewards"]
        log_step(self, {**metrics, "train/reward": rewards.mean(), "train/reward_std": rewards.std(correction=0),
                        "train/reward_queries": float(self.reward_queries), "train/epoch": float(epoch)},
                 "reward", rewards.mean())

    @property
    def at_boundary(self) -> bool:
        """Whether a checkpoint may fall here (between epochs); a judge guard's stop waits for it."""
        return self.updates % self.updates_per_epoch == 0

    def epoch_generator(self, epoch: int) -> torch.Generator:
        """Noise, sampling noise and PPO shuffles of an epoch depend on (seed, epoch, rank) alone: resume is exact."""
        return torch.Generator().manual_seed(step_seed(self.seed, epoch, self.global_rank))

    def train_dataloader(self) -> DataLoader:
        """Each epoch's prompts, once per optimizer step of the epoch (only an epoch's first step samples)."""
        start = self.updates // self.updates_per_epoch
        stream = PromptStream(self.prompts, self.samples_per_epoch, seed=self.seed, start_batch=start,
                              rank=self.global_rank, world_size=self.trainer.world_size)
        return DataLoader(_Repeat(stream, self.updates_per_epoch), batch_size=None)

    def configure_model(self) -> None:
        """`trainer=fsdp`: shard the denoiser (the frozen text encoder, VAE and reward stay whole on every rank)."""
        shard(self, [self.bundle.denoiser])

    def configure_optimizers(self):
        return adamw_with_schedule(self, self.optim_cfg, self.sched_cfg, self.trainer.max_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.updates % self.updates_per_epoch:
            raise RuntimeError(f"{self.method} checkpoints fall on epoch boundaries; got one after update {self.updates}")
        keep_trainable(self, checkpoint)
        checkpoint["lifecycle"] = {"updates": self.updates, "reward_queries": self.reward_queries,
                                   "tracker": self.tracker.state_dict() if self.tracker else None,
                                   "guard": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_trainable(self, checkpoint)
        state = checkpoint["lifecycle"]
        if state["updates"] % self.updates_per_epoch:
            raise ValueError(f"trainer.resume: the {self.method} checkpoint is {state['updates']} updates in, not on an "
                             f"epoch boundary ({self.updates_per_epoch} updates per epoch: a different stage.ppo?)")
        self.updates, self.reward_queries = state["updates"], state["reward_queries"]
        if "guard" in state:  # checkpoints written before DDPO had a guard lack it
            self.guard.load_state_dict(state["guard"])
        if self.tracker is not None and state["tracker"] is not None:
            self.tracker.load_state_dict(state["tracker"])


def concat_batches(batches: list[dict]) -> dict:
    """Sampling batches' tensors concatenated along the batch dim (the conditioning tuples element-wise)."""
    return {k: tuple(torch.cat(parts) for parts in zip(*(b[k] for b in batches))) if k in ("cond", "uncond")
            else torch.cat([b[k] for b in batches]) for k in batches[0]}


class _Repeat(torch.utils.data.IterableDataset):
    """Each item of `stream`, `times` times in a row."""

    def __init__(self, stream, times: int):
        self.stream, self.times = stream, times

    def __iter__(self):
        for item in self.stream:
            for _ in range(self.times):
                yield item


# -- runner -------------------------------------------------------------------------------------
class DDPORun(TrainingRun):
    """Evaluate `model.pretrained` on prompts.train/test, train with DDPO, evaluate again, export."""

    config = Config
    method = DDPOStage.method

    def check_bundle(self, bundle: ModelBundle) -> None:
        if bundle.image_encoder is not None or not isinstance(bundle.inference_scheduler(), DDIMScheduler):
            kind = "image-to-video" if bundle.image_encoder is not None else "flow-matching or EDM (Euler-sampled)"
            raise ConfigError(f"model: DDPO trains the stochastic DDIM chain of a text-to-video model; this is a {kind} "
                              f"model ({type(bundle.denoiser).__name__} with {type(bundle.scheduler).__name__})")

    def prepare(self, bundle: ModelBundle) -> None:
        if self.stage.gradient_checkpointing:
            enable_gradient_checkpointing(bundle.denoiser)

    def module(self, bundle: ModelBundle) -> DDPOStage:
        s = self.stage
        return DDPOStage(
            bundle, self.reward, self.prompt_sets["train"], frames=s.frames, resolution=s.resolution,
            sample=OmegaConf.to_container(s.sample), ppo=OmegaConf.to_container(s.ppo),
            per_prompt_stats=OmegaConf.to_container(s.per_prompt_stats) if s.per_prompt_stats else None,
            optimizer=OmegaConf.to_container(s.optimizer), lr_scheduler=OmegaConf.to_container(s.lr_scheduler),
            gradient_clip=s.gradient_clip, seed=self.cfg.seed, guard=OmegaConf.to_container(s.guard),
        )

    def max_steps(self, module: DDPOStage) -> int:
        return self.stage.epochs * module.updates_per_epoch

    def trainer_config(self, module: DDPOStage) -> DictConfig:
        """Checkpoints only on epoch boundaries: the interval rounded up to whole epochs."""
        per_epoch, cfg = module.updates_per_epoch, copy.deepcopy(self.cfg)
        cfg.trainer.checkpoint_every_n_steps = math.ceil(self.cfg.trainer.checkpoint_every_n_steps / per_epoch) * per_epoch
        return cfg

    def result(self, module: DDPOStage, trainer) -> dict:
        return {"epochs": module.updates // module.updates_per_epoch, "reward_queries": module.reward_queries}

    def lineage_extra(self, module: DDPOStage) -> dict:
        return {"reward_queries": module.reward_queries}


def run(cfg: DictConfig) -> dict:
    """`stage=ddpo`: evaluate `model.pretrained` on prompts.train/test, train with DDPO, evaluate again, export."""
    return DDPORun(cfg)()
