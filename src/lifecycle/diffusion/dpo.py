"""Diffusion-DPO (Wallace et al. 2024, "Diffusion Model Alignment Using Direct Preference Optimization").

The DPO objective with the intractable log-likelihoods replaced by denoising errors. For a pair
(chosen x_w, rejected x_l) noised with the *same* timestep t and noise ε, with per-sample MSEs
L = ‖target − model(x_t, t)‖² of the trained model and L_ref of the frozen reference:

    inside = −½·β·((L_w − L_l) − (Lref_w − Lref_l))
    loss   = −log σ(inside)                       (mean over the batch)

β absorbs the paper's T·ω(λ_t) factor. The MSEs are means over all elements (as in the paper's
reference implementation), so a useful β depends on the model's typical MSE change per update:
5000 for SD-class latent models, 1000 for the tiny pixel-space default (see conf/stage/dpo.yaml).

The implicit reward of a sample is r(x) = −½·β·(L(x) − L_ref(x)) (the DPO reward β·log π/π_ref
with the ELBO standing in for log π), so inside = r_w − r_l: the reward margin.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class DPOTerms(NamedTuple):
    """The loss (scalar, differentiable) and what is logged: accuracy, margin and rewards are batch means."""

    loss: Tensor
    inside: Tensor  # (B,) r_w − r_l per pair
    accuracy: Tensor  # fraction of pairs with inside > 0: the model prefers x_w more than the reference does
    margin: Tensor  # mean r_w − r_l
    reward_chosen: Tensor  # mean r_w
    reward_rejected: Tensor  # mean r_l


def implicit_reward(loss: Tensor, ref_loss: Tensor, beta: float) -> Tensor:
    """r = −½·β·(L − L_ref): positive where the model denoises x better than the reference does."""
    return -0.5 * beta * (loss - ref_loss)


def dpo_loss(loss_w: Tensor, loss_l: Tensor, ref_loss_w: Tensor, ref_loss_l: Tensor, beta: float) -> DPOTerms:
    """Diffusion-DPO loss from per-sample (B,) denoising MSEs on the chosen (w) and rejected (l) samples."""
    reward_w = implicit_reward(loss_w, ref_loss_w, beta)
    reward_l = implicit_reward(loss_l, ref_loss_l, beta)
    inside = reward_w - reward_l
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        return DPOTerms(loss, inside, (inside > 0).float().mean(), inside.mean(), reward_w.mean(), reward_l.mean())
