"""Group-relative policy optimisation for flow-matching models (Flow-GRPO, Liu et al. 2025; DanceGRPO, Xue et al. 2025).

**The SDE policy.** A rectified flow x_t = (1 − t)·x0 + t·ε (t = 1 is noise) is sampled by integrating the
ODE dx = v(x, t)·dt from t = 1 to 0: deterministic, so no log-probability. Flow-GRPO (arXiv 2505.05470)
samples with the reverse-time SDE that has the same marginals p_t for any diffusion scale σ_t:

    dx = [v − (σ_t²/2)·∇log p_t(x)]·dt + σ_t·dw̄,   ∇log p_t(x) = −(x + (1 − t)·v)/t,

the score following from ε̂ = x + (1 − t)·v (the model's noise estimate) and ∇log p_t = −ε̂/t. With
σ_t = a·sqrt(t/(1 − t)) (`a` the noise level) and an Euler–Maruyama step from t to t_next < t
(Δ = t − t_next), each step is a Gaussian policy

    x_next ~ N(μ, s² I),   μ = x − Δ·[v + σ_t²/(2t)·(x + (1 − t)·v)],   s = σ_t·sqrt(Δ).

σ_t is infinite at t = 1, so 1 − t there is taken at the schedule's next time (`t_max`), as the Flow-GRPO
reference implementation does. Log-probabilities are averaged over the non-batch dims, as DDPO's
(`ddpo.ddim_step_with_logprob`, which DDIM models use instead).

**Advantages.** G samples of one prompt form a group; the advantage of sample i is its reward normalised
within its group, A_i = (r_i − mean_group)/(std_group + eps) (population std, as the Flow-GRPO reference code). Several
rewards r_k with weights w_k combine as A = norm(Σ_k w_k·r_k) (Flow-GRPO's weighted sum), or, with
per-term normalisation, A = Σ_k w_k·norm(r_k) (DanceGRPO's multi-reward advantage), which keeps a reward of
small spread from being drowned by one of large spread.

**Objective.** The PPO clipped surrogate is DDPO's (`ddpo.ppo_loss`), plus β·KL(π_θ ‖ π_ref) per step. Both
policies are Gaussians with the same s, so the KL is closed-form: ‖μ_θ − μ_ref‖²/(2s²) (averaged over
dims, like the log-probabilities). The Flow-GRPO reference implementation divides by 2σ_t² instead of 2s²,
i.e. its KL is this one times Δ; its β = 0.04 with 10 steps (Δ ≈ 0.1) is β ≈ 0.004 here.
"""

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .ddpo import GaussianStep, guided_prediction, normalise
from .noise import expand_as
from .sampling import Denoise


def flow_sde_sigma(t: Tensor, noise_level: float, t_max: float) -> Tensor:
    """σ_t = a·sqrt(t/(1 − min(t, t_max))): Flow-GRPO's diffusion scale, finite at t = 1."""
    return noise_level * (t / (1 - t.clamp(max=t_max))).sqrt()


def flow_sde_step_with_logprob(
    velocity: Tensor,
    x_t: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    noise_level: float,
    t_max: float,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
) -> GaussianStep:
    """One Euler–Maruyama step of the marginal-preserving SDE from t to t_next < t (times in [0, 1], scalars or (B,)).

    `velocity` is the model's v = ε − x0 at (x_t, t). x_next is drawn with `generator`, or, with `prev_sample`
    given, is that sample (re-evaluating a stored transition). log_prob is log N(x_next; μ, s² I) averaged over
    the non-batch dims (B,). Computed in float32; the sample is returned in x_t's dtype.
    """
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 for a log-probability (the ODE has none), got {noise_level}")
    x, v = x_t.float(), velocity.float()
    t = expand_as(torch.as_tensor(t, dtype=torch.float32, device=x.device), x)
    dt = t - expand_as(torch.as_tensor(t_next, dtype=torch.float32, device=x.device), x)
    if bool((dt <= 0).any()):
        raise ValueError("flow SDE step: t_next must be below t (sampling runs from noise at t = 1 to data at 0)")
    sigma = flow_sde_sigma(t, noise_level, t_max)
    mean = x - dt * (v + sigma**2 / (2 * t) * (x + (1 - t) * v))
    std = sigma * dt.sqrt()
    if prev_sample is None:
        x_next = mean + std * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    else:
        x_next = prev_sample.detach().float()
    log_prob = -((x_next.detach() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return GaussianStep(x_next.to(x_t.dtype), log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std)


def flow_sde_times(scheduler: FlowMatchEulerDiscreteScheduler, index: Tensor | int) -> tuple[Tensor, Tensor, float]:
    """(t, t_next, t_max) of sampling step `index` (an int or (B,)) of a scheduler after `set_timesteps`.

    t = sigmas[index], t_next = sigmas[index + 1] (the last step ends at 0), t_max = sigmas[1].
    """
    sigmas = scheduler.sigmas.float()
    index = torch.as_tensor(index, device=sigmas.device).long()
    return sigmas[index], sigmas[index + 1], float(sigmas[min(1, len(sigmas) - 1)])


def flow_sample_with_logprob(denoise: Denoise, scheduler: FlowMatchEulerDiscreteScheduler, noise: Tensor,
                             cond: tuple[Tensor, ...], uncond: tuple[Tensor, ...] | None, guidance_scale: float,
                             num_steps: int, noise_level: float,
                             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The SDE sampler from `noise` (B, ...) at t = 1, recording the trajectory.

    The denoiser sees the scheduler's timesteps (t·num_train_timesteps). Returns latents (B, S + 1, ...) from
    the noise to the final sample, each step's log-probability (B, S) and the timesteps (S,), as
    `ddpo.sample_with_logprob` does for DDIM. Run it under no_grad to collect rollouts.
    """
    scheduler.set_timesteps(num_steps, device=noise.device)
    x, latents, log_probs = noise, [noise], []
    for i, timestep in enumerate(scheduler.timesteps):
        velocity = guided_prediction(denoise, x, timestep.expand(x.shape[0]), cond, uncond, guidance_scale)
        t, t_next, t_max = flow_sde_times(scheduler, i)
        x, log_prob, _, _ = flow_sde_step_with_logprob(velocity, x, t, t_next, noise_level, t_max, generator)
        latents.append(x)
        log_probs.append(log_prob)
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1), scheduler.timesteps


def group_advantages(rewards: Tensor, groups: Tensor, eps: float = 1e-4) -> Tensor:
    """A_i = (r_i − mean_g)/(std_g + eps) over the samples of i's group g (population std); (B,) in, (B,) out.

    `groups` holds one integer label per sample (e.g. the prompt's index). A group whose rewards are all equal
    gets advantage 0: it carries no preference.
    """
    if rewards.shape != groups.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} must both be (B,)")
    values = rewards.double()
    advantages = torch.empty_like(values)
    for g in groups.unique():
        rows = groups == g
        group = values[rows]
        advantages[rows] = normalise(group, group.mean(), group.std(correction=0), eps)
    return advantages.to(rewards.dtype)


def multi_reward_advantages(rewards: Tensor, weights: Tensor | list[float], groups: Tensor,
                            per_term: bool = False, eps: float = 1e-4) -> Tensor:
    """Advantages from K rewards (K, B) with weights (K,).

    per_term False: group_advantages(Σ_k w_k·r_k) (Flow-GRPO); True: Σ_k w_k·group_advantages(r_k) (DanceGRPO).
    """
    weights = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    if rewards.ndim != 2 or weights.shape != rewards.shape[:1]:
        raise ValueError(f"rewards must be (K, B) with one weight each; got {tuple(rewards.shape)} "
                         f"and {tuple(weights.shape)} weights")
    if per_term:
        return sum(w * group_advantages(r, groups, eps) for w, r in zip(weights, rewards, strict=True))
    return group_advantages((weights[:, None] * rewards).sum(dim=0), groups, eps)


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float) -> Tensor:
    """KL(N(mean, s² I) ‖ N(ref_mean, s² I)) per dimension, (μ − μ_ref)²/(2s²), averaged over non-batch dims (B,)."""
    kl = (mean.float() - ref_mean.float()) ** 2 / (2 * torch.as_tensor(std, dtype=torch.float32) ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
