"""Shared by the training stages: the optimizer (AdamW on the trainable weights, a diffusers LR
schedule), the guarded manual-optimization update, per-step seeds, step logging, and checkpoints that hold only
trained weights."""

import math

import torch
from diffusers.optimization import get_scheduler
from torch import nn


def adamw_with_schedule(module: nn.Module, optimizer: dict, lr_scheduler: dict, total_steps: int) -> dict:
    """Lightning's `configure_optimizers` answer: AdamW (`fused` from config) + a per-step schedule."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__}: nothing to train (enable LoRA or full fine-tuning)")
    opt = torch.optim.AdamW(params, lr=optimizer["lr"], betas=tuple(optimizer["betas"]),
                            weight_decay=optimizer["weight_decay"], eps=optimizer["eps"], fused=optimizer.get("fused"))
    sched = get_scheduler(lr_scheduler["name"], opt, num_warmup_steps=lr_scheduler["warmup_steps"],
                          num_training_steps=total_steps)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's randomness on one rank (a DDPO epoch's: `step` counts epochs), a function of
    (seed, step, rank) alone: a resumed run draws what the uninterrupted one would have."""
    return seed * 1_000_003 + step * 4099 + rank


def sample_seed(seed: int, step: int, index: int) -> int:
    """Pre-training's seed of one sample: (seed, step, the sample's place in the global batch), whatever the
    number of ranks sharing the batch."""
    return (seed * 1_000_003 + step) * 1_000_003 + index


def optimizer_step(module, guard, gradient_clip: float | None = None) -> torch.Tensor | None:
    """Clip the gradients backpropagated so far, then step the optimizer and the LR schedule, unless the guard
    rejects the gradient norm (non-finite; the gradients are then dropped). Every manual optimization loop
    steps through here. Returns the gradient norm, or None when the weights did not move."""
    opt, sched = module.optimizers(), module.lr_schedulers()
    params = [p for p in module.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip or math.inf, foreach=True)
    if guard.reject(guard.problem(grad_norm.item(), "gradient norm"), module.global_step, opt, module.print):
        return None
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return grad_norm


def guarded_step(module, loss: torch.Tensor, guard, accumulate: int = 1, gradient_clip: float | None = None):
    """Backward, then `optimizer_step` every `accumulate` batches, unless the guard rejects the loss.

    The guard judges the loss averaged over ranks (and the gradient norm, which every rank shares),
    so all ranks take the same decision. Call after counting the batch in `module.batches_seen`.
    Returns (gradient norm, or None when the weights did not move; the rank-mean loss).
    """
    mean_loss = module.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
    if guard.reject(guard.problem(mean_loss.item()), module.global_step, module.optimizers(), module.print):
        return None, mean_loss
    module.manual_backward(loss / accumulate)
    if module.batches_seen % accumulate:
        return None, mean_loss
    return optimizer_step(module, guard, gradient_clip), mean_loss


def log_step(module, metrics: dict, bar: str, value: torch.Tensor) -> None:
    """Log a training step's `metrics` on the steps the loggers write (`trainer.log_every_n_steps`), and `bar`
    (shown in the progress bar only) every step.

    Why not `log_dict` every step: Lightning re-walks its result store on each key, about 2 ms of CPU per key,
    a tenth of a tiny model's step at ten keys; step values logged between two writes are dropped anyway.
    """
    trainer = module.trainer
    if trainer._logger_connector.should_update_logs or trainer.fast_dev_run:  # Lightning's monitors' own test
        module.log_dict(metrics, on_step=True, on_epoch=False)
    module.log(bar, value, prog_bar=True, logger=False)


def keep_trainable(module, checkpoint: dict) -> None:
    """Drop frozen weights from a Lightning checkpoint: they are rebuilt from their sources on resume.

    Stages using it set `strict_loading = False` and call `check_trainable` when loading.
    """
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def check_trainable(module, checkpoint: dict) -> None:
    """Every trainable weight must be in the checkpoint (non-strict loading would skip it silently)."""
    missing = [n for n, p in module.named_parameters() if p.requires_grad and n not in checkpoint["state_dict"]]
    if missing:
        raise ValueError(f"trainer.resume: the checkpoint lacks trainable weights {missing[:3]} (different LoRA or model?)")
