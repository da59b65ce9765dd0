import math

import lightning as L
import pytest
import torch

from lifecycle.callbacks.ema import EMA
from lifecycle.stages.guard import LossGuard


def test_guard_flags_non_finite_and_spikes_after_warmup():
    g = LossGuard(action="skip", spike_factor=3.0, ema_beta=0.5, warmup=2)
    assert g.problem(float("nan")) == "loss is nan"
    assert g.problem(float("inf"), "gradient norm") == "gradient norm is inf"
    assert g.problem(100.0) is None  # no EMA yet
    assert g.update(1.0) == 1.0
    assert g.problem(100.0) is None  # still warming up (1 of 2)
    assert g.update(3.0) == pytest.approx(0.5 * 1.0 + 0.5 * 3.0)  # EMA by hand: 2.0
    assert g.problem(5.9) is None  # 5.9 < 3 x 2.0
    assert "above 3 x its EMA 2" in g.problem(6.1)
    state = g.state_dict()
    h = LossGuard(action="stop")
    h.load_state_dict(state)
    assert (h.ema, h.seen) == (2.0, 2)


def test_guard_rejects_unknown_action():
    with pytest.raises(ValueError, match="stage.guard.action"):
        LossGuard(action="ignore")


class _Toy(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)


class _Trainer:
    def __init__(self):
        self.global_step = 0


def test_ema_update_matches_hand_computation_and_swaps():
    module, trainer = _Toy(), _Trainer()
    ema = EMA(decay=0.9)
    ema.on_fit_start(trainer, module)
    assert set(ema.shadow) == {"w"}  # frozen weights are not averaged
    for step, value in [(1, 1.0), (2, 2.0)]:
        module.w.data.fill_(value)
        trainer.global_step = step
        ema.on_train_batch_end(trainer, module, None, None, 0)
    ema.on_train_batch_end(trainer, module, None, None, 0)  # no new optimizer step: no update
    expected = 0.9 * (0.9 * 0.0 + 0.1 * 1.0) + 0.1 * 2.0  # = 0.29
    assert torch.allclose(ema.shadow["w"], torch.full((2,), expected))
    with ema.swapped(module):
        assert torch.allclose(module.w, torch.full((2,), expected))
    assert torch.equal(module.w.data, torch.full((2,), 2.0))
    restored = EMA(decay=0.9)
    restored.load_state_dict(ema.state_dict())
    restored.on_fit_start(trainer, module)
    assert torch.equal(restored.shadow["w"], ema.shadow["w"])


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match="ema.decay"):
        EMA(decay=1.5)
    assert math.isfinite(EMA(decay=0.5).decay)
