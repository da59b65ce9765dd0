"""EMA of the trainable weights, kept next to each parameter.

Lightning's WeightAveraging deep-copies the whole LightningModule (frozen encoders included)
and does not support sharded parameters; this callback keeps one shadow tensor per trainable
parameter on the parameter's own device (a shard under FSDP2), so it never gathers a model.
"""

from contextlib import contextmanager

import lightning as L
import torch


class EMA(L.Callback):
    """shadow ← decay·shadow + (1 − decay)·param after every `every` optimizer steps."""

    def __init__(self, decay: float = 0.999, every: int = 1):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay: must be in (0, 1), got {decay}")
        self.decay, self.every = decay, every
        self.shadow: dict[str, torch.Tensor] | None = None
        self._last_step = 0  # global_step before the first optimizer step

    @staticmethod
    def _params(pl_module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer, pl_module) -> None:
        params = self._params(pl_module)
        if self.shadow is None:
            self.shadow = {n: p.detach().clone() for n, p in params.items()}
        else:  # restored from a checkpoint: place each shadow like its parameter
            self.shadow = {n: self.shadow[n].to(device=p.device, dtype=p.dtype) for n, p in params.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every:
            return  # no optimizer step happened (accumulation or a skipped update)
        self._last_step = step
        params = self._params(pl_module)
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach() for n in names], 1.0 - self.decay)

    @contextmanager
    def swapped(self, pl_module):
        """Temporarily put the EMA weights into the module (for sampling or export)."""
        params = self._params(pl_module)
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield pl_module
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "decay": self.decay, "last_step": self._last_step}

    def load_state_dict(self, state: dict) -> None:
        self.shadow, self._last_step = state["shadow"], state["last_step"]
