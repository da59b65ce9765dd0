"""Loss guard: catch NaN/Inf and spikes far above the loss EMA before they reach the weights."""

import math

from ..errors import DivergenceError


class LossGuard:
    """Tracks an EMA of accepted losses and flags non-finite values and spikes.

    A spike is a loss above `spike_factor` x the EMA, checked once `warmup` losses have been seen; `spike_factor`
    None checks non-finite values only (a reward used as a loss has no scale to spike against).
    """

    def __init__(self, action: str = "skip", spike_factor: float | None = 10.0, ema_beta: float = 0.98, warmup: int = 20,
                 max_skips_in_a_row: int = 20):
        if action not in ("skip", "stop"):
            raise ValueError(f"stage.guard.action: expected 'skip' or 'stop', got {action!r}")
        self.action, self.spike_factor, self.ema_beta, self.warmup = action, spike_factor, ema_beta, warmup
        self.max_skips_in_a_row = max_skips_in_a_row
        self.ema: float | None = None
        self.seen = 0
        self.rejected = 0
        self.in_a_row = 0  # updates skipped since the last accepted one

    def problem(self, value: float, name: str = "loss") -> str | None:
        """Why `value` must not be applied, or None if it is fine."""
        if not math.isfinite(value):
            return f"{name} is {value}"
        spikes = name == "loss" and self.spike_factor is not None and self.ema is not None and self.seen >= self.warmup
        if spikes and value > self.spike_factor * self.ema:
            return f"loss {value:.4g} is above {self.spike_factor:g} x its EMA {self.ema:.4g}"
        return None

    def reject(self, problem: str | None, step: int, optimizer, report) -> bool:
        """Act on `problem` (from `problem()`): stop with DivergenceError, or drop the step's gradients.

        Returns True when the update must be skipped; `report` prints the reason.
        """
        if problem is None:
            return False
        message = f"step {step}: {problem}"
        if self.action == "stop":
            raise DivergenceError(f"{message}; stopping, the last checkpoint written before it is intact")
        optimizer.zero_grad(set_to_none=True)
        self.rejected += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_skips_in_a_row:  # every update rejected: the run would never advance
            raise DivergenceError(f"{message}; the last {self.in_a_row} updates were all skipped "
                                  "(stage.guard.max_skips_in_a_row), stopping; the last checkpoint written before it "
                                  "is intact")
        report(f"guard: {message}; update skipped ({self.rejected} so far)")
        return True

    def update(self, loss: float) -> float:
        """Fold an accepted loss into the EMA and return it."""
        self.ema = loss if self.ema is None else self.ema_beta * self.ema + (1 - self.ema_beta) * loss
        self.seen += 1
        self.in_a_row = 0
        return self.ema

    def state_dict(self) -> dict:
        return {"ema": self.ema, "seen": self.seen, "rejected": self.rejected, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.seen, self.rejected = state["ema"], state["seen"], state["rejected"]
        self.in_a_row = state.get("in_a_row", 0)  # checkpoints written before it was kept
