"""Sampling loops over diffusers schedulers, with classifier-free guidance.

The loop is plain torch: with gradients enabled it is differentiable end to end, which is what
reward-gradient alignment backpropagates through.
"""

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

Denoise = Callable[..., torch.Tensor]  # denoise(x_t, t, *cond) -> prediction shaped like x_t


def guided(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale·(cond − uncond)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def sample(
    denoise: Denoise,
    scheduler,
    noise: torch.Tensor,
    cond: tuple[torch.Tensor, ...],
    uncond: tuple[torch.Tensor, ...] | None = None,
    guidance_scale: float = 1.0,
    num_steps: int = 25,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    grad_steps: int | None = None,
) -> torch.Tensor:
    """Run `num_steps` of `scheduler` from `noise` (B, C, F, h, w) and return the final latents.

    `cond`/`uncond` are the batch-first tensors passed as `denoise(x, t, *cond)`: (hidden states,
    pooled) text embeddings, or an image-to-video condition. Guidance is applied when `uncond`
    is given and `guidance_scale != 1`, in one batch of cond then uncond. `eta > 0` makes DDIM
    stochastic. With `grad_steps = K` only the last K steps record a graph (VADER's truncated
    backpropagation); None keeps the caller's grad mode for every step.
    """
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts from plain noise
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    use_cfg = uncond is not None and guidance_scale != 1.0
    if use_cfg:
        cond = tuple(torch.cat([c, u]) for c, u in zip(cond, uncond, strict=True))
    step_kwargs = {"eta": eta, "generator": generator} if isinstance(scheduler, DDIMScheduler) else {}
    grad = torch.is_grad_enabled()
    first_grad = len(scheduler.timesteps) - grad_steps if grad_steps is not None else 0
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(grad and i >= first_grad):
            x_in = torch.cat([x, x]) if use_cfg else x
            pred = denoise(scale(x_in, t), t.expand(x_in.shape[0]), *cond)
            if use_cfg:
                pred = guided(*pred.chunk(2), guidance_scale)
            x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
    return x
