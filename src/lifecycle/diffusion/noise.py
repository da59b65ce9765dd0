"""Noising processes, prediction targets and loss weights for diffusion and flow matching.

Tensors are (B, C, ...) with any number of trailing dims: images (B, C, H, W) and
videos (B, C, F, H, W). Per-sample scalars are (B,) and broadcast with ``expand_as``.

Discrete-time (DDPM-family) processes: x_t = alpha_t·x0 + sigma_t·eps with
alpha_t = sqrt(alphas_cumprod[t]) and sigma_t = sqrt(1 - alphas_cumprod[t]).
Flow matching (rectified flow): x_t = (1 - t)·x0 + t·eps, t in [0, 1].

Prediction kinds (diffusers names): "epsilon" (eps), "v_prediction" (alpha·eps - sigma·x0),
"sample" (x0) and "flow" (velocity eps - x0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PREDICTION_KINDS = ("epsilon", "v_prediction", "sample", "flow")
FLOW_T_SCHEMES = ("uniform", "logit_normal")


def _check_kind(kind: str) -> None:
    if kind not in PREDICTION_KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTION_KINDS}")


def expand_as(v: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a per-sample value v of shape (B,) against x of shape (B, ...) as a (B, 1, ..., 1) view.

    Python floats and 0-dim tensors are returned as 0-dim tensors (broadcast over everything).
    The result has x's dtype and device.
    """
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def alpha_sigma(alphas_cumprod: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """Signal and noise scales at integer timesteps: alpha = sqrt(ᾱ_t), sigma = sqrt(1 - ᾱ_t), both (B,)."""
    ac = alphas_cumprod.to(timesteps.device)[timesteps.long()]
    return ac.sqrt(), (1.0 - ac).sqrt()


def add_noise(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x_t = alpha·x0 + sigma·noise."""
    return expand_as(alpha, x0) * x0 + expand_as(sigma, x0) * noise


def flow_interpolate(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """Rectified-flow path x_t = (1 - t)·x0 + t·noise."""
    t = expand_as(t, x0)
    return (1.0 - t) * x0 + t * noise


def target(
    kind: str,
    x0: Tensor,
    noise: Tensor,
    alpha: Tensor | None = None,
    sigma: Tensor | None = None,
) -> Tensor:
    """Regression target for a prediction kind.

    epsilon: noise; v_prediction: alpha·noise - sigma·x0 (needs alpha, sigma);
    sample: x0; flow: noise - x0.
    """
    _check_kind(kind)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if kind == "flow":
        return noise - x0
    if alpha is None or sigma is None:
        raise ValueError("v_prediction target needs alpha and sigma")
    return expand_as(alpha, x0) * noise - expand_as(sigma, x0) * x0


def to_x0_eps(kind: str, pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Convert a model output of any kind at x_t = alpha·x0 + sigma·eps into (x0_hat, eps_hat).

    epsilon:      x0 = (x_t - sigma·eps) / alpha
    v_prediction: x0 = alpha·x_t - sigma·v,  eps = sigma·x_t + alpha·v   (needs alpha² + sigma² = 1)
    sample:       eps = (x_t - alpha·x0) / sigma
    flow (u = eps - x0): x0 = (x_t - sigma·u) / (alpha + sigma), eps = (x_t + alpha·u) / (alpha + sigma);
                  for the flow path alpha = 1 - t, sigma = t, so alpha + sigma = 1.
    """
    _check_kind(kind)
    a, s = expand_as(alpha, x_t), expand_as(sigma, x_t)
    if kind == "epsilon":
        return (x_t - s * pred) / a, pred
    if kind == "sample":
        return pred, (x_t - a * pred) / s
    if kind == "v_prediction":
        return a * x_t - s * pred, s * x_t + a * pred
    total = a + s
    return (x_t - s * pred) / total, (x_t + a * pred) / total


def convert_prediction(
    pred: Tensor, from_kind: str, to_kind: str, x_t: Tensor, alpha: Tensor, sigma: Tensor
) -> Tensor:
    """Re-express a prediction of ``from_kind`` as ``to_kind``: target(to_kind, *to_x0_eps(from_kind, ...))."""
    _check_kind(to_kind)
    if from_kind == to_kind:
        return pred
    x0_hat, eps_hat = to_x0_eps(from_kind, pred, x_t, alpha, sigma)
    return target(to_kind, x0_hat, eps_hat, alpha, sigma)


def snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """Signal-to-noise ratio SNR = alpha² / sigma²."""
    return alpha**2 / sigma**2


def min_snr_weight(snr: Tensor, gamma: float | None, kind: str, floor: float = 0.0) -> Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023) for an MSE computed in ``kind`` space.

    With the x0-space weight w = max(min(SNR, γ), floor), and MSE_eps = SNR·MSE_x0,
    MSE_v = (SNR + 1)·MSE_x0:
        epsilon:      w / SNR          (floor=0: min(SNR, γ) / SNR)
        v_prediction: w / (SNR + 1)    (floor=0: min(SNR, γ) / (SNR + 1))
        sample:       w                (floor=0: min(SNR, γ))
    ``floor`` raises the weight of very noisy steps. gamma None or inf gives weight 1 (plain MSE).
    For epsilon, SNR must be > 0.
    """
    if kind not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown kind {kind!r} for min_snr_weight; expected epsilon, v_prediction or sample")
    if gamma is None or math.isinf(gamma):
        return torch.ones_like(snr)
    w = snr.clamp(max=gamma).clamp(min=floor)
    if kind == "epsilon":
        return w / snr
    if kind == "v_prediction":
        return w / (snr + 1.0)
    return w


def offset_noise(noise: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Noise offset (Guttenberg 2023): noise + strength·N(0, 1) of shape (B, C, 1, ..., 1).

    One constant per sample and channel, broadcast over all spatial/temporal dims.
    strength 0 returns ``noise`` unchanged.
    """
    if strength == 0:
        return noise
    shape = (*noise.shape[:2], *([1] * (noise.ndim - 2)))
    offset = torch.randn(shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + strength * offset


def per_sample(draw, generators: list[torch.Generator]) -> Tensor:
    """torch.cat of draw(g) over one generator per sample: each sample's random draws come from its own stream."""
    return torch.cat([draw(g) for g in generators])


def sample_timesteps(
    batch: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform integer timesteps in [0, T), shape (batch,), int64."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device)


def sample_flow_t(
    batch: int,
    scheme: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Flow-matching times, shape (batch,).

    uniform: t ~ U(0, 1); logit_normal: t = sigmoid(n), n ~ N(mean, std²) (SD3, Esser et al. 2024).
    """
    if scheme == "uniform":
        return torch.rand((batch,), generator=generator, device=device)
    if scheme == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn((batch,), generator=generator, device=device))
    raise ValueError(f"unknown flow t scheme {scheme!r}; expected one of {FLOW_T_SCHEMES}")


def shift_flow_t(t: Tensor | float, shift: float) -> Tensor | float:
    """SD3/Wan timestep shift: t' = shift·t / (1 + (shift - 1)·t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def masked_mse_per_sample(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample squared error averaged over all non-batch dims, (B,), computed in float32.

    Without a mask: mean((pred - target)²). With a mask m broadcastable to pred:
    sum(m·(pred - target)²) / sum(m), both sums over the non-batch dims of the broadcast shape.
    """
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.reshape(err.shape[0], -1).mean(dim=1)
    m = mask.to(err.dtype).expand_as(err)
    return (m * err).reshape(err.shape[0], -1).sum(dim=1) / m.reshape(m.shape[0], -1).sum(dim=1)
