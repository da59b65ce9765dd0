"""DiffusionNFT math: optimality probabilities, the implicit positive/negative policies, the loss by hand for a flow
model and a DDPM epsilon model, and the same loss whatever the network predicts."""

import pytest
import torch

from lifecycle.diffusion.noise import convert_prediction
from lifecycle.diffusion.nft import implicit_policies, nft_loss, optimality_probability

# Two samples of two dims, noised at t = 0.5 and 0.25: x_t = (1 − t)·x0 + t·noise, target v = noise − x0.
X0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
NOISE = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
T = torch.tensor([0.5, 0.25])
X_T = torch.tensor([[0.5, 0.5], [0.25, 1.5]])
V_OLD = torch.zeros(2, 2)
V_THETA = torch.tensor([[-2.0, 2.0], [2.0, 0.0]])
R = torch.tensor([1.0, 0.25])
BETA = 0.5
FLOW = ("flow", V_THETA, V_OLD, X_T, 1 - T, T, X0, NOISE)  # the flow path: alpha = 1 − t, sigma = t


def test_optimality_probability_by_hand():
    a = torch.tensor([-10.0, -2.5, 0.0, 2.5, 10.0])
    torch.testing.assert_close(optimality_probability(a, adv_clip_max=5.0), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


def test_implicit_policies_by_hand_mirror_about_the_old_policy():
    v_pos, v_neg = implicit_policies(V_THETA, V_OLD + 1, BETA)
    # v⁺ = 0.5·1 + 0.5·v_θ, v⁻ = 1.5·1 − 0.5·v_θ
    torch.testing.assert_close(v_pos, torch.tensor([[-0.5, 1.5], [1.5, 0.5]]))
    torch.testing.assert_close(v_neg, torch.tensor([[2.5, 0.5], [0.5, 1.5]]))
    torch.testing.assert_close((v_pos + v_neg) / 2, V_OLD + 1)


def test_nft_loss_by_hand_plain():
    """v⁺ = ((−1, 1), (1, 0)), v⁻ = ((1, −1), (−1, 0)), v = ((−1, 1), (1, −2)).
    E⁺ = (0, (0 + 4)/2 = 2), E⁻ = (4, 4); loss = mean(1·0 + 0·4, 0.25·2 + 0.75·4)/β = 1.75/0.5."""
    assert torch.equal(X_T, (1 - T[:, None]) * X0 + T[:, None] * NOISE)
    terms = nft_loss(*FLOW, R, BETA, adaptive=False)
    assert terms.loss.item() == pytest.approx(3.5)
    assert (terms.positive.item(), terms.negative.item()) == pytest.approx((1.0, 4.0))


def test_nft_loss_by_hand_adaptive():
    """x0_hat − x0 = t·(v − v±): sample 0: (0, 0) and (−1, 1); sample 1: (0, −0.5) and (0.5, −0.5). Divided by
    their mean absolute values (floor 1e-5 for the exact one): E⁺ = (0, 0.125/0.25), E⁻ = (1/1, 0.25/0.5);
    loss = mean(1·0 + 0·1, 0.25·0.5 + 0.75·0.5)/β = 0.25/0.5."""
    terms = nft_loss(*FLOW, R, BETA, adaptive=True)
    assert terms.loss.item() == pytest.approx(0.5)
    assert (terms.positive.item(), terms.negative.item()) == pytest.approx((0.25, 0.75))


def test_gradients_pull_towards_positive_and_push_from_negative_samples():
    """dL/dv_θ by hand (B = 1, D dims): r = 1: 2·(v⁺ − v)/D; r = 0: −2·(v⁻ − v)/D; adaptive with r = 1:
    2·t²·(v⁺ − v)/(w·D), w = mean|t·(v⁺ − v)| held constant. At v_θ = v_old with r = ½ the pulls cancel."""
    g = torch.Generator().manual_seed(0)
    x0, noise, v_old, v_theta = (torch.randn(1, 3, 4, generator=g) for _ in range(4))
    t = torch.tensor([0.4])
    x_t, v, d = 0.6 * x0 + 0.4 * noise, noise - x0, 12
    v_pos, v_neg = implicit_policies(v_theta, v_old, BETA)
    expected = {
        (1.0, False): 2 * (v_pos - v) / d,
        (0.0, False): -2 * (v_neg - v) / d,
        (1.0, True): 2 * 0.16 * (v_pos - v) / ((0.4 * (v_pos - v)).abs().mean() * d),
    }
    for (r, adaptive), grad in expected.items():
        leaf = v_theta.clone().requires_grad_()
        nft_loss("flow", leaf, v_old, x_t, 1 - t, t, x0, noise, torch.tensor([r]), BETA, adaptive).loss.backward()
        torch.testing.assert_close(leaf.grad, grad, msg=f"r={r}, adaptive={adaptive}")
    leaf = v_old.clone().requires_grad_()
    nft_loss("flow", leaf, v_old, x_t, 1 - t, t, x0, noise, torch.tensor([0.5]), BETA, adaptive=False).loss.backward()
    assert leaf.grad.abs().max() < 1e-6  # float32 rounding of v⁺ and v⁻


def test_the_minimiser_moves_from_the_negative_towards_the_positive_sample():
    """A good (r = 1) and a bad (r = 0) sample at the same x_t with targets v_good, v_bad: the plain loss is
    minimal at v_θ = v_old + (v_good − v_bad)/(2β) (setting the two gradients' sum to 0); gradient descent
    finds it."""
    g = torch.Generator().manual_seed(1)
    v_old, v_good, v_bad, x_t = (torch.randn(1, 6, generator=g) for _ in range(4))
    t = torch.tensor([0.5, 0.5])
    # choose x0 and noise of each sample so that noise − x0 is its target and (1 − t)·x0 + t·noise = x_t
    x0 = torch.cat([x_t - 0.5 * v_good, x_t - 0.5 * v_bad])
    noise = torch.cat([x_t + 0.5 * v_good, x_t + 0.5 * v_bad])
    v_theta = v_old.clone().requires_grad_()
    opt = torch.optim.SGD([v_theta], lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        loss = nft_loss("flow", v_theta.expand(2, -1), v_old.expand(2, -1), x_t.expand(2, -1), 1 - t, t, x0, noise,
                        torch.tensor([1.0, 0.0]), BETA, adaptive=False).loss
        loss.backward()
        opt.step()
    torch.testing.assert_close(v_theta.detach(), v_old + (v_good - v_bad) / (2 * BETA), rtol=0, atol=1e-4)


def test_nft_loss_by_hand_ddpm_epsilon():
    """alpha = 0.6, sigma = 0.8, x0 = (1, 0), ε = (0, 1): x_t = (0.6, 0.8); ε_old = 0, ε_θ = (1, −1), β = ½, r = ¾.
    ε⁺ = (0.5, −0.5), ε⁻ = (−0.5, 0.5). Plain: E⁺ = (0.25 + 2.25)/2 = 1.25, E⁻ = (0.25 + 0.25)/2 = 0.25,
    loss = (0.75·1.25 + 0.25·0.25)/0.5 = 2. Adaptive: x0_hat − x0 = −(σ/α)·(ε± − ε) = −(4/3)·(ε± − ε):
    (−2/3, 2) and (2/3, 2/3); E⁺ = (20/9)/(4/3) = 5/3, E⁻ = (4/9)/(2/3) = 2/3, loss = (0.75·5/3 + 0.25·2/3)/0.5 = 17/6."""
    x0, eps, alpha, sigma = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0.6]), torch.tensor([0.8])
    x_t = torch.tensor([[0.6, 0.8]])
    args = ("epsilon", torch.tensor([[1.0, -1.0]]), torch.zeros(1, 2), x_t, alpha, sigma, x0, eps, torch.tensor([0.75]), BETA)
    plain, adaptive = nft_loss(*args, adaptive=False), nft_loss(*args, adaptive=True)
    assert (plain.loss.item(), plain.positive.item(), plain.negative.item()) == pytest.approx((2.0, 1.25, 0.25))
    assert (adaptive.loss.item(), adaptive.positive.item(), adaptive.negative.item()) == pytest.approx((17 / 6, 5 / 3, 2 / 3))


@pytest.mark.parametrize("kind", ["sample", "epsilon"])
def test_the_adaptive_loss_is_the_same_whatever_the_network_predicts(kind):
    """A flow model's outputs re-expressed as another kind at the same x_t (alpha = 1 − t, sigma = t) imply the same
    clean samples, so the same implicit policies and the same adaptive loss and gradient direction."""
    alpha, sigma = 1 - T, T
    theta, old = (convert_prediction(v, "flow", kind, X_T, alpha, sigma) for v in (V_THETA, V_OLD))
    for r in (R, torch.tensor([0.0, 1.0])):
        flow = nft_loss(*FLOW, r, BETA).loss
        other = nft_loss(kind, theta, old, X_T, alpha, sigma, X0, NOISE, r, BETA).loss
        torch.testing.assert_close(other, flow)


def test_beta_must_be_positive():
    with pytest.raises(ValueError, match="beta"):
        nft_loss(*FLOW, R, 0.0)
