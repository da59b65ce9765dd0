import math

import pytest
import torch

from lifecycle.diffusion.noise import (
    add_noise,
    alpha_sigma,
    convert_prediction,
    expand_as,
    flow_interpolate,
    masked_mse_per_sample,
    min_snr_weight,
    offset_noise,
    sample_flow_t,
    sample_timesteps,
    shift_flow_t,
    snr,
    target,
    to_x0_eps,
)

SHAPES = [(2, 3, 4, 5), (2, 3, 2, 4, 5)]
DDPM_KINDS = ["epsilon", "v_prediction", "sample", "flow"]


def close(actual, expected, tol=1e-6):
    assert torch.allclose(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=0), (
        actual,
        expected,
    )


def scalars(values):
    """Per-sample scalars laid out as a (B, 1, 1, 1) tensor."""
    return torch.tensor(values, dtype=torch.float64).reshape(-1, 1, 1, 1)


# ---- expand_as / alpha_sigma -----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_expand_as_shape(shape):
    x = torch.zeros(shape)
    v = torch.tensor([1.0, 2.0])
    out = expand_as(v, x)
    assert out.shape == (2,) + (1,) * (len(shape) - 1)
    assert (out * x + out).shape == x.shape
    assert out[1].flatten().item() == 2.0


def test_alpha_sigma_by_hand():
    ac = torch.tensor([0.9, 0.5, 0.1])
    alpha, sigma = alpha_sigma(ac, torch.tensor([0, 2, 1]))
    close(alpha, [math.sqrt(0.9), math.sqrt(0.1), math.sqrt(0.5)])
    close(sigma, [math.sqrt(0.1), math.sqrt(0.9), math.sqrt(0.5)])
    # SNR = ac / (1 - ac): 0.9/0.1 = 9, 0.1/0.9 = 1/9, 0.5/0.5 = 1
    close(snr(alpha, sigma), [9.0, 1.0 / 9.0, 1.0], tol=1e-5)


def test_alpha_sigma_matches_diffusers_add_noise():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 2, 5, 5, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 17, 500, 999])
    ours = add_noise(x0, noise, *alpha_sigma(sched.alphas_cumprod, t))
    theirs = sched.add_noise(x0, noise, t)
    assert torch.allclose(ours, theirs, atol=1e-6)


# ---- add_noise / target / conversions --------------------------------------------------------

# alpha = [0.6, 0.8], sigma = [0.8, 0.6] (alpha² + sigma² = 1), x0 = [1, -2], noise = [0.5, 3]
ALPHA = torch.tensor([0.6, 0.8], dtype=torch.float64)
SIGMA = torch.tensor([0.8, 0.6], dtype=torch.float64)
X0 = scalars([1.0, -2.0])
NOISE = scalars([0.5, 3.0])
# x_t = alpha·x0 + sigma·noise: 0.6·1 + 0.8·0.5 = 1.0 ; 0.8·(-2) + 0.6·3 = 0.2
X_T = [1.0, 0.2]
# v = alpha·noise - sigma·x0: 0.6·0.5 - 0.8·1 = -0.5 ; 0.8·3 - 0.6·(-2) = 3.6
V = [-0.5, 3.6]


def test_add_noise_by_hand():
    close(add_noise(X0, NOISE, ALPHA, SIGMA).flatten(), X_T)


def test_targets_by_hand():
    close(target("epsilon", X0, NOISE).flatten(), [0.5, 3.0])
    close(target("sample", X0, NOISE).flatten(), [1.0, -2.0])
    close(target("flow", X0, NOISE).flatten(), [0.5 - 1.0, 3.0 + 2.0])
    close(target("v_prediction", X0, NOISE, ALPHA, SIGMA).flatten(), V)


def test_target_errors():
    with pytest.raises(ValueError, match="unknown prediction kind"):
        target("x0", X0, NOISE)
    with pytest.raises(ValueError, match="alpha and sigma"):
        target("v_prediction", X0, NOISE)


def test_to_x0_eps_by_hand():
    x_t = scalars(X_T)
    # v: x0 = alpha·x_t - sigma·v = 0.6·1 + 0.8·0.5 = 1.0 ; 0.8·0.2 - 0.6·3.6 = -2.0
    #    eps = sigma·x_t + alpha·v = 0.8·1 - 0.6·0.5 = 0.5 ; 0.6·0.2 + 0.8·3.6 = 3.0
    x0_hat, eps_hat = to_x0_eps("v_prediction", scalars(V), x_t, ALPHA, SIGMA)
    close(x0_hat.flatten(), [1.0, -2.0])
    close(eps_hat.flatten(), [0.5, 3.0])
    # epsilon: x0 = (x_t - sigma·eps) / alpha = (1 - 0.8·0.5)/0.6 = 1.0 ; (0.2 - 0.6·3)/0.8 = -2.0
    x0_hat, eps_hat = to_x0_eps("epsilon", scalars([0.5, 3.0]), x_t, ALPHA, SIGMA)
    close(x0_hat.flatten(), [1.0, -2.0])
    close(eps_hat.flatten(), [0.5, 3.0])
    # sample: eps = (x_t - alpha·x0) / sigma = (1 - 0.6)/0.8 = 0.5 ; (0.2 + 0.8·2)/0.6 = 3.0
    x0_hat, eps_hat = to_x0_eps("sample", scalars([1.0, -2.0]), x_t, ALPHA, SIGMA)
    close(x0_hat.flatten(), [1.0, -2.0])
    close(eps_hat.flatten(), [0.5, 3.0])
    # flow (u = eps - x0 = [-0.5, 5]), alpha + sigma = 1.4:
    #   x0 = (x_t - sigma·u)/1.4 = (1 + 0.4)/1.4 = 1.0 ; (0.2 - 3)/1.4 = -2.0
    #   eps = (x_t + alpha·u)/1.4 = (1 - 0.3)/1.4 = 0.5 ; (0.2 + 4)/1.4 = 3.0
    x0_hat, eps_hat = to_x0_eps("flow", scalars([-0.5, 5.0]), x_t, ALPHA, SIGMA)
    close(x0_hat.flatten(), [1.0, -2.0])
    close(eps_hat.flatten(), [0.5, 3.0])
    with pytest.raises(ValueError, match="unknown prediction kind"):
        to_x0_eps("velocity", x_t, x_t, ALPHA, SIGMA)


def test_convert_prediction_by_hand():
    x_t = scalars(X_T)
    # network predicts x0, loss in epsilon space
    close(convert_prediction(X0, "sample", "epsilon", x_t, ALPHA, SIGMA).flatten(), [0.5, 3.0])
    close(convert_prediction(NOISE, "epsilon", "v_prediction", x_t, ALPHA, SIGMA).flatten(), V)
    close(convert_prediction(scalars(V), "v_prediction", "flow", x_t, ALPHA, SIGMA).flatten(), [-0.5, 5.0])
    with pytest.raises(ValueError, match="unknown prediction kind"):
        convert_prediction(X0, "sample", "score", x_t, ALPHA, SIGMA)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("from_kind", DDPM_KINDS)
@pytest.mark.parametrize("to_kind", DDPM_KINDS)
def test_convert_prediction_round_trip(shape, from_kind, to_kind):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    alpha, sigma = alpha_sigma(torch.tensor([0.9, 0.3], dtype=torch.float64), torch.tensor([0, 1]))
    x_t = add_noise(x0, noise, alpha, sigma)
    src = target(from_kind, x0, noise, alpha, sigma)
    out = convert_prediction(src, from_kind, to_kind, x_t, alpha, sigma)
    assert out.shape == shape
    assert torch.allclose(out, target(to_kind, x0, noise, alpha, sigma), atol=1e-10)
    back = convert_prediction(out, to_kind, from_kind, x_t, alpha, sigma)
    assert torch.allclose(back, src, atol=1e-10)


# ---- flow matching -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_flow_interpolate_endpoints_and_velocity(shape):
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    assert torch.equal(flow_interpolate(x0, noise, torch.zeros(2, dtype=torch.float64)), x0)
    assert torch.equal(flow_interpolate(x0, noise, torch.ones(2, dtype=torch.float64)), noise)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    h = 1e-4
    fd = (flow_interpolate(x0, noise, t + h) - flow_interpolate(x0, noise, t - h)) / (2 * h)
    assert torch.allclose(fd, target("flow", x0, noise), atol=1e-8)


def test_flow_interpolate_by_hand():
    # t = [0.25, 0.5]: 0.75·1 + 0.25·0.5 = 0.875 ; 0.5·(-2) + 0.5·3 = 0.5
    close(flow_interpolate(X0, NOISE, torch.tensor([0.25, 0.5])).flatten(), [0.875, 0.5])


def test_flow_prediction_on_flow_path_converts_to_x0_eps():
    # on the flow path alpha = 1 - t, sigma = t; u = eps - x0 = [-0.5, 5]
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    x_t = flow_interpolate(X0, NOISE, t)
    x0_hat, eps_hat = to_x0_eps("flow", scalars([-0.5, 5.0]), x_t, 1 - t, t)
    # x0 = x_t - t·u = 0.875 + 0.125 = 1.0 ; 0.5 - 2.5 = -2.0 ; eps = x_t + (1-t)·u = 0.875 - 0.375 = 0.5 ; 0.5 + 2.5 = 3
    close(x0_hat.flatten(), [1.0, -2.0])
    close(eps_hat.flatten(), [0.5, 3.0])


def test_shift_flow_t_by_hand():
    # 3·0.5 / (1 + 2·0.5) = 1.5 / 2 = 0.75
    assert shift_flow_t(0.5, 3.0) == pytest.approx(0.75)
    # t = [0, 0.25, 1], shift 3: 0 ; 0.75 / 1.5 = 0.5 ; 3 / 3 = 1
    close(shift_flow_t(torch.tensor([0.0, 0.25, 1.0]), 3.0), [0.0, 0.5, 1.0])
    close(shift_flow_t(torch.tensor([0.1, 0.6]), 1.0), [0.1, 0.6])


def test_sample_flow_t_uniform_and_logit_normal():
    gen = torch.Generator().manual_seed(3)
    u = sample_flow_t(20000, "uniform", generator=gen)
    assert u.shape == (20000,)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    t = sample_flow_t(20000, "logit_normal", mean=0.5, std=1.0, generator=gen)
    assert t.min() > 0 and t.max() < 1
    # median of sigmoid(N(0.5, 1)) is sigmoid(0.5) = 1 / (1 + e^-0.5)
    assert abs(t.median().item() - 1.0 / (1.0 + math.exp(-0.5))) < 0.01
    # spread controlled by std: fraction above sigmoid(mean + std) is P(N > 1) ≈ 0.1587
    frac = (t > 1.0 / (1.0 + math.exp(-1.5))).double().mean().item()
    assert abs(frac - 0.1587) < 0.01
    with pytest.raises(ValueError, match="unknown flow t scheme"):
        sample_flow_t(4, "cosine")


def test_sample_timesteps():
    gen = torch.Generator().manual_seed(4)
    t = sample_timesteps(3000, 3, generator=gen)
    assert t.shape == (3000,) and t.dtype == torch.int64
    assert set(t.tolist()) == {0, 1, 2}
    counts = torch.bincount(t, minlength=3).double() / 3000
    assert torch.allclose(counts, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03)


# ---- Min-SNR ---------------------------------------------------------------------------------

SNRS = torch.tensor([0.25, 1.0, 4.0, 9.0])  # gamma = 5: three below, one above


@pytest.mark.parametrize(
    "kind, expected",
    [
        # min(SNR, 5) / SNR
        ("epsilon", [1.0, 1.0, 1.0, 5.0 / 9.0]),
        # min(SNR, 5) / (SNR + 1): 0.25/1.25, 1/2, 4/5, 5/10
        ("v_prediction", [0.2, 0.5, 0.8, 0.5]),
        # min(SNR, 5)
        ("sample", [0.25, 1.0, 4.0, 5.0]),
    ],
)
def test_min_snr_weight_paper_formula(kind, expected):
    close(min_snr_weight(SNRS, 5.0, kind), expected)


@pytest.mark.parametrize(
    "kind, expected",
    [
        # x0-space weight max(min(SNR, 5), 1) = [1, 1, 4, 5]
        ("epsilon", [1.0 / 0.25, 1.0, 1.0, 5.0 / 9.0]),
        ("v_prediction", [1.0 / 1.25, 0.5, 0.8, 0.5]),
        ("sample", [1.0, 1.0, 4.0, 5.0]),
    ],
)
def test_min_snr_weight_floor(kind, expected):
    close(min_snr_weight(SNRS, 5.0, kind, floor=1.0), expected)


def test_min_snr_weight_plain_mse_and_errors():
    for gamma in (None, math.inf):
        close(min_snr_weight(SNRS, gamma, "epsilon", floor=1.0), [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown kind"):
        min_snr_weight(SNRS, 5.0, "flow")


# ---- offset noise ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_offset_noise_constant_per_sample_channel(shape):
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(shape, generator=gen)
    out = offset_noise(noise, 0.1, generator=gen)
    assert out.shape == shape
    offset = (out - noise).reshape(shape[0], shape[1], -1)
    per_bc = offset[..., 0]
    assert torch.allclose(offset, per_bc.unsqueeze(-1).expand_as(offset), atol=1e-6)
    assert per_bc.flatten().unique().numel() == shape[0] * shape[1]
    assert offset_noise(noise, 0.0, generator=gen) is noise


def test_offset_noise_std_matches_strength():
    gen = torch.Generator().manual_seed(6)
    noise = torch.zeros(4000, 4, 1, 2, 2)
    out = offset_noise(noise, 0.1, generator=gen)
    per_bc = out[:, :, 0, 0, 0]
    assert abs(per_bc.std().item() - 0.1) < 0.005
    assert abs(per_bc.mean().item()) < 0.005


# ---- per-sample MSE --------------------------------------------------------------------------


def test_masked_mse_per_sample_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    tgt = torch.tensor([[[[1.0, 0.0], [3.0, 1.0]]], [[[1.0, -1.0], [2.0, 0.0]]]])
    # sample 0: (0 + 4 + 0 + 9) / 4 = 3.25 ; sample 1: (1 + 1 + 4 + 0) / 4 = 1.5
    close(masked_mse_per_sample(pred, tgt), [3.25, 1.5])
    # mask keeps the first row only: sample 0: (0 + 4) / 2 = 2 ; sample 1: (1 + 1) / 2 = 1
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    close(masked_mse_per_sample(pred, tgt, mask), [2.0, 1.0])


def test_masked_mse_per_sample_5d():
    pred = torch.zeros(2, 3, 2, 4, 5)
    tgt = torch.ones(2, 3, 2, 4, 5)
    tgt[1] = 2.0
    out = masked_mse_per_sample(pred.bfloat16(), tgt.bfloat16())
    assert out.dtype == torch.float32
    close(out, [1.0, 4.0])
