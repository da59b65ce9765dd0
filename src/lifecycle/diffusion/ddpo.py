"""DDPO math (Black et al. 2023): the denoising chain as a policy, its log-probabilities, and PPO.

A stochastic DDIM step (eta > 0) is a Gaussian policy x_{t-1} ~ N(μ_θ(x_t, t), σ_t² I) with

    μ = sqrt(ᾱ_prev)·x0_hat + sqrt(1 − ᾱ_prev − σ_t²)·eps_hat,
    σ_t = eta·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_prev)

(DDIM eq. 12 and 16). Log-probabilities are the Gaussian log-density averaged over the non-batch
dims, as in the DDPO reference implementation: the per-dimension mean keeps the PPO ratio on the
same scale at any resolution (it is the D-th root of the full-density ratio), which is what the
small default `clip_range` assumes.
"""

import math
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .noise import expand_as, to_x0_eps
from .sampling import Denoise, guided


class GaussianStep(NamedTuple):
    """One stochastic sampling step: the sample, its log-probability (B,), and the Gaussian's mean and std
    (std broadcastable against the sample). The mean and std give the closed-form KL to a reference policy."""

    sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def ddpo_scheduler(scheduler) -> DDIMScheduler:
    """A DDIM copy of `scheduler` whose every step is stochastic.

    `set_alpha_to_one=False` ends the chain at ᾱ_0 < 1 instead of ᾱ = 1, where σ would be 0 and
    the last step's log-probability undefined (Stable Diffusion's DDIM configuration, which the
    paper trains with).
    """
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(f"DDPO samples with stochastic DDIM; got a {type(scheduler).__name__}")
    if scheduler.config.thresholding:
        raise ValueError("DDPO: dynamic thresholding makes the DDIM step non-Gaussian; disable `thresholding`")
    return DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False)


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    t: Tensor | int,
    x_t: Tensor,
    eta: float,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
) -> GaussianStep:
    """One stochastic DDIM step: x_prev, log N(x_prev; μ, σ_t² I) averaged over non-batch dims (B,), μ and σ_t.

    `t` is a timestep or one per sample (B,); the previous timestep is t − T/num_inference_steps as in
    `DDIMScheduler.step` (call `set_timesteps` first), ᾱ_prev = `final_alpha_cumprod` past the start.
    The mean is diffusers' (clipping of x0_hat included); x_prev is drawn with `generator`, or, with
    `prev_sample` given, is that sample (PPO re-evaluating a stored transition). Computed in float32.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a log-probability (deterministic DDIM has none), got {eta}")
    cfg = scheduler.config
    x = x_t.float()
    t = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(x.shape[0])
    prev_t = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    ac = scheduler.alphas_cumprod.to(x.device, torch.float32)
    a_t = ac[t]
    a_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], torch.as_tensor(scheduler.final_alpha_cumprod).to(ac))

    x0, eps = to_x0_eps(cfg.prediction_type, model_output.float(), x, a_t.sqrt(), (1 - a_t).sqrt())
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    std, a_prev = expand_as(std, x), expand_as(a_prev, x)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    if prev_sample is None:
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_prev = mean + std * noise
    else:
        x_prev = prev_sample.detach().float()
    log_prob = -((x_prev.detach() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return GaussianStep(x_prev.to(x_t.dtype), log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std)


def guided_prediction(denoise: Denoise, x: Tensor, t: Tensor, cond: tuple[Tensor, ...],
                      uncond: tuple[Tensor, ...] | None, guidance_scale: float) -> Tensor:
    """Denoiser output at x (B, ...) and timesteps t (B,), with classifier-free guidance in one cond+uncond batch."""
    if uncond is None or guidance_scale == 1.0:
        return denoise(x, t, *cond)
    both = tuple(torch.cat([c, u]) for c, u in zip(cond, uncond, strict=True))
    pred = denoise(torch.cat([x, x]), torch.cat([t, t]), *both)
    return guided(*pred.chunk(2), guidance_scale)


def transition_log_prob(denoise: Denoise, scheduler: DDIMScheduler, x_t: Tensor, t: Tensor, x_prev: Tensor,
                        cond: tuple[Tensor, ...], uncond: tuple[Tensor, ...] | None, guidance_scale: float,
                        eta: float) -> Tensor:
    """log π_θ(x_prev | x_t, t, c) (B,) of stored transitions under the current weights (graph kept when grad is on)."""
    pred = guided_prediction(denoise, x_t, t, cond, uncond, guidance_scale)
    return ddim_step_with_logprob(scheduler, pred, t, x_t, eta, prev_sample=x_prev).log_prob


def sample_with_logprob(denoise: Denoise, scheduler: DDIMScheduler, noise: Tensor, cond: tuple[Tensor, ...],
                        uncond: tuple[Tensor, ...] | None, guidance_scale: float, num_steps: int, eta: float,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Stochastic DDIM from `noise` (B, ...), recording the trajectory.

    Returns latents (B, S + 1, ...) from x_T to the final sample, the log-probability of each step
    (B, S) and the timesteps (S,). Run it under no_grad to collect DDPO's rollouts.
    """
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    latents, log_probs = [x], []
    for t in scheduler.timesteps:
        pred = guided_prediction(denoise, x, t.expand(x.shape[0]), cond, uncond, guidance_scale)
        x, log_prob, _, _ = ddim_step_with_logprob(scheduler, pred, t, x, eta, generator=generator)
        latents.append(x)
        log_probs.append(log_prob)
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1), scheduler.timesteps


def normalise(rewards: Tensor, mean: Tensor | float, std: Tensor | float, eps: float) -> Tensor:
    """Advantages (r − mean)/(std + eps)."""
    return (rewards - mean) / (std + eps)


class PerPromptStatTracker:
    """Per-prompt reward normalisation (DDPO): a running history of each prompt's last `buffer_size` rewards.

    `update` appends the batch to the histories, then normalises each reward by its prompt's history
    mean and (population) std once the history holds `min_count` rewards, and by the whole batch's
    statistics before that.
    """

    def __init__(self, buffer_size: int, min_count: int, eps: float = 1e-6):
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.history: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        values = rewards.detach().double().cpu()
        advantages = torch.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std(correction=0)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([p == prompt for p in prompts])
            seen = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            seen.extend(values[rows].tolist())
            if len(seen) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                past = torch.tensor(list(seen), dtype=torch.float64)
                mean, std = past.mean(), past.std(correction=0)
            advantages[rows] = normalise(values[rows], mean, std, self.eps)
        return advantages.to(rewards.device, rewards.dtype)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "history": {p: list(v) for p, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.history = {p: deque(v, maxlen=self.buffer_size) for p, v in state["history"].items()}


def ppo_loss(advantages: Tensor, log_prob: Tensor, old_log_prob: Tensor, clip_range: float,
             adv_clip_max: float) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate: mean(max(−A·r, −A·clip(r, 1 − ε, 1 + ε))), r = exp(logp − logp_old), A clipped to ±adv_clip_max.

    Returns (loss, approx KL 0.5·mean((logp − logp_old)²), fraction of |r − 1| > ε); the last two detached.
    """
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    diff = (log_prob - old_log_prob).detach()
    return loss, 0.5 * (diff**2).mean(), ((ratio.detach() - 1).abs() > clip_range).float().mean()
