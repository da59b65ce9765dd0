"""Prompt fidelity in the synthetic world, read from pixels alone.

Backgrounds are neutral grey, so object pixels are those with chroma
(max(rgb) - min(rgb)) above a threshold. The dominant colour is a chroma-weighted
hue vote over all frames; the direction of motion is the least-squares slope of the
chroma-weighted centroid over time. Videos are float tensors (B, F, C, H, W) in [0, 1].

Each step is a separate tensor function (object weight, votes, centroids, slope), so
a differentiable variant can swap the hard threshold and argmax for soft ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from .synthetic import COLOURS, DIRECTIONS

NONE = "none"
ORACLE_COLUMNS = ("colour_accuracy", "direction_accuracy", "both_accuracy")  # the scores of prompt_fidelity
CHROMA_THRESHOLD = 0.2  # object pixels: chroma above this (fraction of full scale)
MIN_COLOUR_SHARE = 0.5  # the winning colour needs this share of the object weight
MIN_DISPLACEMENT = 0.1  # fitted travel over the clip, as a fraction of the frame
_EPS = 1e-8


def _check(videos: torch.Tensor) -> torch.Tensor:
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"expected videos of shape (B, F, 3, H, W), got {tuple(videos.shape)}")
    if not videos.is_floating_point():
        raise TypeError(f"expected float videos in [0, 1], got {videos.dtype}")
    return videos


def hue(rgb: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Hue angle in radians, [0, 2*pi), of the RGB values along ``dim``.

    Uses the circular form atan2(sqrt(3) (g - b), 2r - g - b), which is exact at the six
    primary and secondary colours and unchanged by mixing with any neutral grey.
    """
    r, g, b = rgb.unbind(dim)
    return torch.remainder(torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b), 2 * math.pi)


def colour_hues() -> torch.Tensor:
    """Hue of each entry of ``COLOURS``, in its order."""
    return hue(torch.tensor(list(COLOURS.values()), dtype=torch.float64) / 255).float()


def chroma(videos: torch.Tensor) -> torch.Tensor:
    """max(rgb) - min(rgb) per pixel, (B, F, H, W)."""
    videos = _check(videos)
    return videos.amax(dim=2) - videos.amin(dim=2)


def object_weight(videos: torch.Tensor) -> torch.Tensor:
    """Chroma of the pixels above ``CHROMA_THRESHOLD``, zero elsewhere; (B, F, H, W)."""
    c = chroma(videos)
    return c * (c > CHROMA_THRESHOLD)


def colour_votes(videos: torch.Tensor) -> torch.Tensor:
    """Share of the object weight whose hue is nearest each colour, (B, len(COLOURS)).

    Rows sum to 1, or to 0 when a video has no object pixels.
    """
    weight = object_weight(videos).flatten(1)
    offset = hue(videos, dim=2).flatten(1)[..., None] - colour_hues().to(videos.device)
    distance = (torch.remainder(offset + math.pi, 2 * math.pi) - math.pi).abs()
    votes = torch.zeros(weight.shape[0], len(COLOURS), dtype=weight.dtype, device=weight.device)
    votes.scatter_add_(1, distance.argmin(dim=-1), weight)
    return votes / votes.sum(dim=1, keepdim=True).clamp_min(_EPS)


def dominant_colour(videos: torch.Tensor) -> list[str]:
    """Name of the colour holding at least ``MIN_COLOUR_SHARE`` of the votes, else "none"."""
    share, index = colour_votes(videos).max(dim=1)
    names = list(COLOURS)
    return [
        names[i] if s >= MIN_COLOUR_SHARE else NONE
        for s, i in zip(share.tolist(), index.tolist())
    ]


def centroids(videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Object-weighted centre per frame as (x, y) frame fractions (B, F, 2), and mass (B, F).

    Frames without object pixels have mass 0 and centre (0, 0).
    """
    weight = object_weight(videos)
    height, width = weight.shape[-2:]
    ys = (torch.arange(height, device=weight.device, dtype=weight.dtype) + 0.5) / height
    xs = (torch.arange(width, device=weight.device, dtype=weight.dtype) + 0.5) / width
    mass = weight.sum(dim=(-2, -1))
    x = (weight.sum(dim=-2) * xs).sum(dim=-1)
    y = (weight.sum(dim=-1) * ys).sum(dim=-1)
    return torch.stack([x, y], dim=-1) / mass.clamp_min(_EPS)[..., None], mass


def displacement(videos: torch.Tensor) -> torch.Tensor:
    """Fitted (dx, dy) travel of the object over the clip, in frame fractions, (B, 2).

    Least-squares slope of the centroid against time in [0, 1], over the frames that
    contain the object; zero when fewer than two frames do.
    """
    position, mass = centroids(videos)
    present = (mass > 0).to(position.dtype)
    frames = position.shape[1]
    t = torch.linspace(0.0, 1.0, frames, device=position.device, dtype=position.dtype)
    count = present.sum(dim=1, keepdim=True).clamp_min(1)
    t_centred = (t - (present * t).sum(dim=1, keepdim=True) / count) * present
    p_mean = (present[..., None] * position).sum(dim=1, keepdim=True) / count[..., None]
    covariance = (t_centred[..., None] * (position - p_mean)).sum(dim=1)
    variance = (t_centred**2).sum(dim=1, keepdim=True)
    return covariance / variance.clamp_min(_EPS)


def motion_direction(videos: torch.Tensor) -> list[str]:
    """left/right/up/down by the dominant axis of :func:`displacement`, else "none".

    Image rows grow downward, so "up" is a decreasing y. Travel below
    ``MIN_DISPLACEMENT`` counts as no motion.
    """
    travel = displacement(videos)
    horizontal = travel[:, 0].abs() >= travel[:, 1].abs()
    along = torch.where(horizontal, travel[:, 0], travel[:, 1])
    # (horizontal, positive) -> direction
    names = {(True, False): "left", (True, True): "right",
             (False, False): "up", (False, True): "down"}
    return [
        names[(h, a > 0)] if abs(a) >= MIN_DISPLACEMENT else NONE
        for h, a in zip(horizontal.tolist(), along.tolist())
    ]


def parse_prompt(prompt: str) -> dict:
    """The first colour and direction words of ``prompt`` (None where absent)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    return {
        "colour": next((w for w in words if w in COLOURS), None),
        "direction": next((w for w in words if w in DIRECTIONS), None),
    }


def prompt_fidelity(videos: torch.Tensor, prompts: Sequence[str]) -> dict:
    """Fraction of videos whose colour, direction, and both match their prompt.

    Videos judged "none" count as misses. Also returns the chance levels of a
    uniform guess and the number of videos ``n``.
    """
    videos = _check(videos)
    if not prompts:
        raise ValueError("need at least one prompt")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {videos.shape[0]} videos")
    targets = [parse_prompt(p) for p in prompts]
    unreadable = [p for p, t in zip(prompts, targets) if None in t.values()]
    if unreadable:
        raise ValueError(f"prompts without a colour or direction word: {unreadable[:3]}")
    colour_hit = [t["colour"] == c for t, c in zip(targets, dominant_colour(videos))]
    direction_hit = [t["direction"] == d for t, d in zip(targets, motion_direction(videos))]
    n = len(targets)
    return {
        "colour_accuracy": sum(colour_hit) / n,
        "direction_accuracy": sum(direction_hit) / n,
        "both_accuracy": sum(c and d for c, d in zip(colour_hit, direction_hit)) / n,
        "chance_colour": 1 / len(COLOURS),
        "chance_direction": 1 / len(DIRECTIONS),
        "n": n,
    }
