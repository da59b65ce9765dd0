"""DiffusionNFT (Zheng et al. 2025, "Online Diffusion Reinforcement with Forward Process", arXiv 2509.16117).

Online RL on the forward (noising) process of a flow model x_t = (1 − t)·x0 + t·ε, v = ε − x0: no
log-probabilities, any sampler for the rollouts, no CFG. The clean samples x0 of the old (sampling) policy
v_old are scored; each reward becomes an optimality probability

    r = ½ + ½·clip(A/Z, −1, 1)    (A the group-normalised reward, Z = adv_clip_max),

and the trained velocity v_θ enters through the implicit positive and negative policies

    v⁺ = (1 − β)·v_old + β·v_θ,    v⁻ = (1 + β)·v_old − β·v_θ,

mirror images about v_old (v⁺ − v_old = β·(v_θ − v_old) = v_old − v⁻). The loss fits the positive policy to
the samples in proportion r and the negative one in proportion 1 − r (flow matching on both):

    L = E_{x0 ~ π_old, t, ε}[r·‖v⁺(x_t) − v‖² + (1 − r)·‖v⁻(x_t) − v‖²]/β,

so the best samples pull v_θ towards their velocity and the worst push it away (the paper's implicit
improvement direction, which needs no likelihood). The division by β keeps the gradient's scale
independent of β, as the reference implementation does; v_old is the rollout policy, kept fixed in the loss.

Any parameterisation (DDPM-family models). The implicit policies are combinations with weights summing to 1,
and every kind of prediction p (epsilon, v_prediction, sample, flow) implies a clean sample x0_hat = a·x_t + c·p
affine in p (`noise.to_x0_eps`; flow: alpha = 1 − t, sigma = t, x0_hat = x_t − t·v). So the implicit policies
are taken in the network's own output space, p± from p_θ and p_old as v± above, and x0_hat(p±) = (1 ∓ β)·x0_hat(p_old)
± β·x0_hat(p_θ): the same two policies whatever the model predicts, and the same loss for flow and DDPM models.

Adaptive weighting (paper §4.1, reference code): each branch's squared error is taken on the implied clean sample,
‖x0_hat(p±) − x0‖², and divided by the per-sample mean absolute error of that prediction (detached, floored at
1e-5), so every sample and noise level contributes on the same scale; without it the loss is the plain
per-sample mean squared error in the network's output space, ‖p± − target‖² (flow: ‖v± − v‖² as above). The
reference code also multiplies the loss by adv_clip_max, a constant that only rescales the learning rate; it is
left out here.
"""

from typing import NamedTuple

from torch import Tensor

from .noise import target, to_x0_eps


class NFTTerms(NamedTuple):
    """The loss (scalar, differentiable) and what is logged, per-batch means, detached."""

    loss: Tensor
    positive: Tensor  # mean of the positive branch's per-sample error
    negative: Tensor  # mean of the negative branch's per-sample error


def optimality_probability(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """r = ½ + ½·clip(A/adv_clip_max, −1, 1) ∈ [0, 1]: 1 for the best samples, ½ for average ones, 0 for the worst."""
    return 0.5 + 0.5 * (advantages / adv_clip_max).clamp(-1.0, 1.0)


def implicit_policies(v_theta: Tensor, v_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(v⁺, v⁻) = ((1 − β)·v_old + β·v_θ, (1 + β)·v_old − β·v_θ) of outputs of any kind; v_old carries no gradient."""
    v_old = v_old.detach()
    return (1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta


def _branch_error(kind: str, pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, x0: Tensor, noise: Tensor,
                  adaptive: bool) -> Tensor:
    """Per-sample error (B,) of a prediction of `kind` at x_t = alpha·x0 + sigma·noise against (x0, noise)."""
    dims = tuple(range(1, x0.ndim))
    if not adaptive:
        return ((pred.float() - target(kind, x0, noise, alpha, sigma).float()) ** 2).mean(dim=dims)
    err = to_x0_eps(kind, pred.float(), x_t.float(), alpha.float(), sigma.float())[0] - x0.float()  # x0_hat − x0
    weight = err.detach().abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
    return (err**2 / weight).mean(dim=dims)


def nft_loss(kind: str, pred_theta: Tensor, pred_old: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, x0: Tensor,
             noise: Tensor, r: Tensor, beta: float, adaptive: bool = True) -> NFTTerms:
    """DiffusionNFT's loss on a batch of noised rollouts x_t = alpha·x0 + sigma·noise (alpha, sigma (B,); a flow
    model's x_t = (1 − t)·x0 + t·noise has alpha = 1 − t, sigma = t, t in (0, 1]).

    `pred_theta` and `pred_old` are the trained and the sampling policy's outputs of `kind` (`noise.PREDICTION_KINDS`)
    at x_t; `r` (B,) the optimality probabilities. loss = mean_B(r·E⁺ + (1 − r)·E⁻)/β with E± the branches'
    per-sample errors.
    """
    if beta <= 0:
        raise ValueError(f"nft beta must be > 0, got {beta}")
    p_pos, p_neg = implicit_policies(pred_theta, pred_old, beta)
    err_pos = _branch_error(kind, p_pos, x_t, alpha, sigma, x0, noise, adaptive)
    err_neg = _branch_error(kind, p_neg, x_t, alpha, sigma, x0, noise, adaptive)
    r = r.float()
    loss = (r * err_pos + (1 - r) * err_neg).mean() / beta
    return NFTTerms(loss, err_pos.detach().mean(), err_neg.detach().mean())
