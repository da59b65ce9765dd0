"""The one optimizer step every manual loop takes (stages.optim.optimizer_step): clip, guard, step; and the
reward-gradient stages (VADER, DDPO) stepping through it."""

import math

import pytest
import torch

from lifecycle.errors import DivergenceError
from lifecycle.rewards import Reward
from lifecycle.stages.guard import LossGuard
from lifecycle.stages.optim import optimizer_step, sample_seed, step_seed

from .helpers import compose_cfg


class Loop:
    """What optimizer_step reads of a LightningModule: its optimizer and schedule, weights, step and printer."""

    def __init__(self):
        self.w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        self.opt = torch.optim.SGD([self.w], lr=0.1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1.0)
        self.global_step, self.printed = 0, []

    def optimizers(self):
        return self.opt

    def lr_schedulers(self):
        return self.sched

    def parameters(self):
        return [self.w]

    def print(self, message):
        self.printed.append(message)


def test_a_finite_gradient_is_clipped_and_applied():
    loop = Loop()
    (loop.w ** 2).sum().backward()  # gradient 2w = (6, 8), norm 10
    norm = optimizer_step(loop, LossGuard(spike_factor=None), gradient_clip=5.0)
    assert norm.item() == pytest.approx(10.0)  # the norm before clipping, as torch reports it
    # clipped to norm 5: (3, 4); SGD lr 0.1 moves w by -(0.3, 0.4)
    assert loop.w.detach().tolist() == pytest.approx([2.7, 3.6])
    assert loop.w.grad is None


def test_a_non_finite_gradient_is_dropped_and_the_weights_stay():
    loop, guard = Loop(), LossGuard(spike_factor=None, max_skips_in_a_row=2)
    (loop.w * math.nan).sum().backward()
    assert optimizer_step(loop, guard, gradient_clip=1.0) is None
    assert loop.w.detach().tolist() == [3.0, 4.0] and loop.w.grad is None and guard.rejected == 1
    assert "gradient norm is nan" in loop.printed[0]
    (loop.w * math.nan).sum().backward()
    with pytest.raises(DivergenceError, match="the last 2 updates were all skipped"):
        optimizer_step(loop, guard, gradient_clip=1.0)


def test_without_a_spike_factor_only_non_finite_losses_are_problems():
    """A reward used as a loss (VADER's −reward) has no scale to spike against."""
    guard = LossGuard(spike_factor=None, warmup=1)
    guard.update(-0.5)
    assert guard.problem(-0.01) is None and guard.problem(1e9) is None and guard.problem(math.inf) is not None
    spiky = LossGuard(spike_factor=10.0, warmup=1)
    spiky.update(0.5)
    assert spiky.problem(6.0) is not None


def test_step_seeds_are_the_formulas_every_stage_used():
    assert step_seed(7, 3, 1) == 7 * 1_000_003 + 3 * 4099 + 1
    assert sample_seed(7, 3, 5) == (7 * 1_000_003 + 3) * 1_000_003 + 5


class NaNReward(Reward):
    """A differentiable reward whose value is NaN: every update VADER would take is non-finite."""

    def forward(self, videos, prompts):
        return videos.mean(dim=tuple(range(1, videos.ndim))) * math.nan


def test_vader_stops_on_a_non_finite_reward_before_it_reaches_the_weights(tmp_path, synthetic_shards):
    from lifecycle.stages.vader import run

    cfg = compose_cfg(tmp_path, "stage=vader", "stage.steps=4", "stage.batch_size=2", "stage.sampling.num_steps=2",
                      "stage.evaluation.num_steps=2", "stage.evaluation.batch_size=2",
                      "prompts.train=[a large green circle moving right quickly on a black background]",
                      "prompts.test=[a small blue triangle moving up slowly on a gray background]",
                      "stage.guard.action=stop", "reward=vivid", f"+reward.nan={{_target_:{__name__}.NaNReward}}",
                      shards=synthetic_shards)
    with pytest.raises(DivergenceError, match="step 0: loss is nan"):
        run(cfg)
    assert not (tmp_path / "export").exists()
