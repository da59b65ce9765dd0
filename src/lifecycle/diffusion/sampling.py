"""Sampling loops over diffusers schedulers, with classifier-free guidance.

The loop is plain torch: with gradients enabled it is differentiable end to end, which is what
reward-gradient alignment backpropagates through.
"""

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guided(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale·(cond − uncond)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def sample(
    denoise: Denoise,
    scheduler,
    noise: torch.Tensor,
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
    guidance_scale: float = 1.0,
    num_steps: int = 25,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run `num_steps` of `scheduler` from `noise` (B, C, F, h, w) and return the final latents.

    `cond`/`uncond` are (hidden states, pooled) text embeddings; guidance is applied when
    `uncond` is given and `guidance_scale != 1`. `eta > 0` makes DDIM stochastic.
    """
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    use_cfg = uncond is not None and guidance_scale != 1.0
    hidden, pooled = cond
    if use_cfg:
        hidden, pooled = torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]])
    step_kwargs = {"eta": eta, "generator": generator} if isinstance(scheduler, DDIMScheduler) else {}
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x]) if use_cfg else x
        pred = denoise(scheduler.scale_model_input(x_in, t), t.expand(x_in.shape[0]), hidden, pooled)
        if use_cfg:
            pred = guided(*pred.chunk(2), guidance_scale)
        x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
    return x
