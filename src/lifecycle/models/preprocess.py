"""Differentiable image preprocessing for reward backbones, in torch (never PIL).

Equivalent to a CLIP/ViT image processor's resize-shorter-side, centre-crop and normalise,
but on (N, C, H, W) tensors in [0, 1], so gradients reach the generated pixels.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_shorter(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is `size` (bicubic with antialiasing, as the processors do)."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    if new == (h, w):
        return images
    # in float32 (cheap): CPUs have no half-precision antialiased bicubic kernel (frozen_dtype=bf16 runs there too)
    return F.interpolate(images.float(), size=new, mode="bicubic", antialias=True, align_corners=False).to(images.dtype)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - m) / s


def prepare(images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> the backbone's (N, C, size, size) input."""
    return normalize(center_crop(resize_shorter(images, size), size), mean, std)
