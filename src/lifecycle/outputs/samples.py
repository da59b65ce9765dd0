"""Generated videos written to disk under the output policy."""

from pathlib import Path

import numpy as np
import torch

from . import current
from .export import write_samples as export


def to_uint8(videos: torch.Tensor) -> list[np.ndarray]:
    """(B, F, C, H, W) in [0, 1] -> list of uint8 (F, H, W, C)."""
    return list((videos.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy())


def write_samples(out: Path, videos: torch.Tensor, prompts: list[str], scores: dict, fps: int = 8,
                  name: str = "fidelity.json") -> None:
    """`out/`: an mp4 and a gif per video, filmstrip.png with the prompts, prompts.json, the scores and
    provenance.json, under the output policy (lifecycle.outputs: content filter, watermark, provenance)."""
    export(out, to_uint8(videos), prompts, scores, fps, name, current())
