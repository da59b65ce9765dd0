"""Flow-GRPO math: the marginal-preserving SDE step and its log-probability, group advantages, the KL term.

The SDE is checked against a toy flow whose every quantity is exact: data x0 ~ N(m, s²) per dimension, so
x_t = (1 − t)·x0 + t·ε ~ N((1 − t)·m, (1 − t)²·s² + t²) and the velocity E[ε − x0 | x_t] is linear in x_t.
(The PPO surrogate is DDPO's `ppo_loss`; its clipping is tested in test_ddpo.py.)
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from lifecycle.diffusion.ddpo import ddim_step_with_logprob
from lifecycle.diffusion.grpo import (
    flow_sample_with_logprob,
    flow_sde_step_with_logprob,
    flow_sde_times,
    gaussian_kl,
    group_advantages,
    multi_reward_advantages,
)
from lifecycle.diffusion.sampling import sample

M, S = 0.5, 0.3  # the toy data distribution N(M, S²)


def toy_moments(t: float) -> tuple[float, float]:
    """Mean and variance of x_t."""
    return (1 - t) * M, (1 - t) ** 2 * S**2 + t**2


def toy_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """E[ε − x0 | x_t = x] = (Cov(ε, x_t) − Cov(x0, x_t))·(x − μ_t)/var_t − m."""
    mu, var = toy_moments(t)
    return (t - (1 - t) * S**2) * (x - mu) / var - M


def toy_denoise(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The exact velocity as a denoiser called with the scheduler's timesteps t·1000."""
    return toy_velocity(x, float(timestep.reshape(-1)[0]) / 1000)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _scheduler(steps: int, shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s.set_timesteps(steps)
    return s


# -- the SDE step ----------------------------------------------------------------------------------
def test_log_prob_is_the_gaussian_density_of_the_sde_transition():
    """Per-sample times, by hand from the SDE: μ = x − Δ·[v + σ²/(2t)·(x + (1 − t)·v)], s = σ·sqrt(Δ),
    σ = a·sqrt(t/(1 − t)); the density from torch.distributions.Normal, averaged over dims."""
    x, v = _randn(2, 3, 2, 4, 4, seed=1), _randn(2, 3, 2, 4, 4, seed=2)
    t, t_next, a = torch.tensor([0.6, 0.25]), torch.tensor([0.5, 0.0]), 0.7
    step = flow_sde_step_with_logprob(v, x, t, t_next, a, t_max=0.9, generator=torch.Generator().manual_seed(3))
    z = _randn(2, 3, 2, 4, 4, seed=3)  # the step's own draw: same generator, same shape
    for i in range(2):
        ti, dt = t[i].item(), (t[i] - t_next[i]).item()
        sigma = a * math.sqrt(ti / (1 - ti))
        mu = x[i].double() - dt * (v[i].double() + sigma**2 / (2 * ti) * (x[i].double() + (1 - ti) * v[i].double()))
        std = sigma * math.sqrt(dt)
        torch.testing.assert_close(step.sample[i].double(), mu + std * z[i].double(), rtol=0, atol=1e-5)
        expected = torch.distributions.Normal(mu, std).log_prob(step.sample[i].double()).mean()
        assert step.log_prob[i].item() == pytest.approx(expected.item(), rel=1e-5)
    again = flow_sde_step_with_logprob(v, x, t, t_next, a, t_max=0.9, prev_sample=step.sample)
    torch.testing.assert_close(again.log_prob, step.log_prob, rtol=0, atol=1e-6)


def test_sigma_at_t_one_uses_the_next_time_and_bad_arguments_are_refused():
    s = _scheduler(10)
    t, t_next, t_max = flow_sde_times(s, 0)
    # diffusers' 10 times from 1 to 0.001, then 0
    assert (t.item(), t_next.item(), t_max) == pytest.approx((1.0, 0.889, 0.889))
    x, v = _randn(1, 8, seed=1), _randn(1, 8, seed=2)
    step = flow_sde_step_with_logprob(v, x, t, t_next, 0.7, t_max)
    assert step.std.item() == pytest.approx(0.7 * math.sqrt(1 / (1 - 0.889)) * math.sqrt(1 - 0.889))
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_step_with_logprob(v, x, t, t_next, 0.0, t_max)
    with pytest.raises(ValueError, match="t_next must be below t"):
        flow_sde_step_with_logprob(v, x, 0.5, 0.5, 0.7, t_max)


def test_the_drift_is_the_ode_step_plus_the_score_term_and_vanishes_with_the_noise():
    """From a fixed x_t the SDE does not average to the ODE's step: its mean adds the drift correction
    Δ·(σ²/2)·∇log p_t(x), which is what keeps the marginals equal. Checked with the toy's exact score
    (autograd of the Gaussian density, independent of the velocity) and against diffusers' Euler step,
    to which the SDE step reduces as the noise level goes to 0."""
    s = _scheduler(10)
    i = 4
    timestep = s.timesteps[i]
    t, t_next, t_max = flow_sde_times(s, i)
    x = _randn(1, 3, 4, 4, seed=7).requires_grad_()
    mu, var = toy_moments(t.item())
    score, = torch.autograd.grad(torch.distributions.Normal(mu, math.sqrt(var)).log_prob(x).sum(), x)
    x = x.detach()
    v = toy_velocity(x, t.item())
    ode = s.step(v, timestep, x).prev_sample  # diffusers' Euler step x + (t_next − t)·v
    dt, a = (t - t_next).item(), 0.7
    step = flow_sde_step_with_logprob(v, x, t, t_next, a, t_max)
    sigma2 = a**2 * t.item() / (1 - t.item())
    torch.testing.assert_close(step.mean, ode + dt * sigma2 / 2 * score, rtol=0, atol=1e-5)
    draws = torch.stack([flow_sde_step_with_logprob(v, x, t, t_next, a, t_max,
                                                    torch.Generator().manual_seed(k)).sample for k in range(4000)])
    # 4000 draws: the standard error of each mean is s/63; 5 standard errors
    assert (draws.mean(0) - step.mean).abs().max().item() < 5 * step.std.item() / math.sqrt(4000)
    tiny = flow_sde_step_with_logprob(v, x, t, t_next, 1e-4, t_max)
    torch.testing.assert_close(tiny.mean, ode, rtol=0, atol=1e-6)


def test_one_sde_step_from_the_marginal_lands_on_the_next_marginal_like_the_ode():
    """x_t ~ p_t (200,000 toy samples): one SDE step and one ODE step to t_next both give p_{t_next}'s mean and
    std, to within sampling error (std/450) plus the step's O(Δ²) discretisation error; tolerance 0.01."""
    t, t_next, t_max = 0.6, 0.55, 0.98
    mu, var = toy_moments(t)
    x = mu + math.sqrt(var) * _randn(200_000, seed=11)
    v = toy_velocity(x, t)
    sde = flow_sde_step_with_logprob(v[:, None], x[:, None], t, t_next, 0.7, t_max,
                                     torch.Generator().manual_seed(12)).sample[:, 0]
    ode = x + (t_next - t) * v
    mu_next, var_next = toy_moments(t_next)
    for name, y in (("sde", sde), ("ode", ode)):
        assert y.mean().item() == pytest.approx(mu_next, abs=0.01), name
        assert y.std().item() == pytest.approx(math.sqrt(var_next), abs=0.01), name


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_sde_sampler_reaches_the_data_distribution_like_the_ode(shift):
    """Whole chains on the toy flow, 60 steps from N(0, 1): the SDE sampler (a = 0.7) and diffusers' Euler ODE
    sampler both end at N(m, s²); tolerance 0.03 on mean and std (measured: at most 0.014 for the SDE, 0.019
    for the ODE with shift 3, Euler's O(1/steps) bias; 20,000 samples give a standard error of 0.002). With
    the score term's sign flipped the SDE misses by far more. The recorded log-probabilities re-evaluate."""
    steps, n = 60, 20_000
    noise = _randn(n, 1, seed=21)
    latents, log_probs, timesteps = flow_sample_with_logprob(
        toy_denoise, _scheduler(steps, shift), noise, (), None, 1.0, steps, 0.7, torch.Generator().manual_seed(22))
    assert latents.shape == (n, steps + 1, 1) and log_probs.shape == (n, steps) and len(timesteps) == steps
    sde = latents[:, -1, 0]
    ode = sample(toy_denoise, _scheduler(steps, shift), noise, (), num_steps=steps)[:, 0]
    for name, y in (("sde", sde), ("ode", ode)):
        assert y.mean().item() == pytest.approx(M, abs=0.03), name
        assert y.std().item() == pytest.approx(S, abs=0.03), name
    s = _scheduler(steps, shift)
    for i in (0, steps // 2, steps - 1):
        t, t_next, t_max = flow_sde_times(s, i)
        x = latents[:, i]
        again = flow_sde_step_with_logprob(toy_velocity(x, t.item()), x, t, t_next, 0.7, t_max,
                                           prev_sample=latents[:, i + 1])
        torch.testing.assert_close(again.log_prob, log_probs[:, i], rtol=0, atol=1e-5)


# -- advantages ------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    a = group_advantages(rewards, groups, eps=1e-4)
    std0 = math.sqrt(2 / 3)  # population std of 1, 2, 3
    expected = [-1 / (std0 + 1e-4), 0.0, 1 / (std0 + 1e-4), 0.0, 0.0, 0.0, -2 / (2 + 1e-4), 2 / (2 + 1e-4)]
    torch.testing.assert_close(a, torch.tensor(expected))
    # groups need not be contiguous: interleaving the samples permutes the advantages with them
    order = torch.tensor([6, 0, 3, 1, 7, 4, 2, 5])
    torch.testing.assert_close(group_advantages(rewards[order], groups[order]), a[order])
    with pytest.raises(ValueError, match="must both be"):
        group_advantages(rewards, groups[:3])


def test_multi_reward_advantages_weighted_sum_or_per_term_by_hand():
    """Two rewards of different spread on one group of 2 and one of 3, weights (1, 0.5)."""
    r1 = torch.tensor([0.0, 1.0, 0.0, 0.0, 3.0])  # large spread
    r2 = torch.tensor([0.2, 0.1, 0.1, 0.2, 0.3])  # small spread
    groups = torch.tensor([0, 0, 1, 1, 1])
    eps = 1e-4
    summed = multi_reward_advantages(torch.stack([r1, r2]), [1.0, 0.5], groups, per_term=False, eps=eps)
    total = [0.1, 1.05, 0.05, 0.1, 3.15]  # r1 + 0.5·r2
    g0_std = 0.475  # |1.05 − 0.1|/2
    g1_mean = 3.3 / 3
    g1_std = math.sqrt(sum((x - g1_mean) ** 2 for x in total[2:]) / 3)
    expected = [(total[0] - 0.575) / (g0_std + eps), (total[1] - 0.575) / (g0_std + eps),
                *[(x - g1_mean) / (g1_std + eps) for x in total[2:]]]
    torch.testing.assert_close(summed, torch.tensor(expected))
    per_term = multi_reward_advantages(torch.stack([r1, r2]), [1.0, 0.5], groups, per_term=True, eps=eps)
    # each reward normalised in its group first: r1 → (−1, 1), (−1/√2, −1/√2, √2); r2 → (1, −1), (−1.2247, 0, 1.2247)
    a1 = [-0.5 / (0.5 + eps), 0.5 / (0.5 + eps), *[(x - 1) / (math.sqrt(2) + eps) for x in (0.0, 0.0, 3.0)]]
    a2 = [0.05 / (0.05 + eps), -0.05 / (0.05 + eps),
          *[(x - 0.2) / (math.sqrt(0.02 / 3) + eps) for x in (0.1, 0.2, 0.3)]]
    torch.testing.assert_close(per_term, torch.tensor([x + 0.5 * y for x, y in zip(a1, a2)]))
    with pytest.raises(ValueError, match="one weight each"):
        multi_reward_advantages(torch.stack([r1, r2]), [1.0], groups)


# -- KL --------------------------------------------------------------------------------------------
def test_gaussian_kl_by_hand_and_against_torch_distributions():
    mean = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    # (μ − μ_ref)²/(2·0.25): sample 0 (0, 2) → 1; sample 1 (8, 2) → 5
    torch.testing.assert_close(gaussian_kl(mean, ref, 0.5), torch.tensor([1.0, 5.0]))
    # on two SDE steps of one transition (same x_t and σ, two velocities): the closed form is the per-dim KL
    x, v, v_ref = _randn(2, 3, 4, 4, seed=31), _randn(2, 3, 4, 4, seed=32), _randn(2, 3, 4, 4, seed=33)
    step = flow_sde_step_with_logprob(v, x, 0.7, 0.6, 0.7, 0.9)
    ref_step = flow_sde_step_with_logprob(v_ref, x, 0.7, 0.6, 0.7, 0.9)
    normal = torch.distributions.Normal
    expected = torch.distributions.kl_divergence(normal(step.mean, step.std.expand_as(x)),
                                                 normal(ref_step.mean, ref_step.std.expand_as(x))).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_kl(step.mean, ref_step.mean, step.std), expected)
    assert gaussian_kl(step.mean, step.mean, step.std).abs().max() == 0
    # DDIM models: the stochastic DDIM step's mean and σ_t, the same way
    ddim = DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=False, timestep_spacing="trailing")
    ddim.set_timesteps(4)
    t = torch.tensor([999, 499])
    step = ddim_step_with_logprob(ddim, v, t, x, 0.8)
    ref_step = ddim_step_with_logprob(ddim, v_ref, t, x, 0.8)
    expected = torch.distributions.kl_divergence(normal(step.mean, step.std.expand_as(x)),
                                                 normal(ref_step.mean, ref_step.std.expand_as(x))).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_kl(step.mean, ref_step.mean, step.std), expected)
