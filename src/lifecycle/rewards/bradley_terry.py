"""The Bradley–Terry preference model: P(chosen ≻ rejected) = σ(r(chosen) − r(rejected))."""

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood −log σ(r_c − r_r) of the observed preferences, from (B,) scores."""
    return -F.logsigmoid(chosen - rejected).mean()


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked as labelled, r_c > r_r (a tie counts as wrong)."""
    return (chosen > rejected).float().mean()
