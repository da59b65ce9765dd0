"""Rewards for the synthetic world that need no downloaded weights.

Differentiable versions of the checks in ``lifecycle.data.oracle``: the hard chroma
threshold becomes a sigmoid, the nearest-hue vote a von Mises kernel, and the centroid fit
a presence-weighted least-squares slope. Each stands in for a real reward so that reward
alignment (e.g. VADER) can be exercised on CPU in minutes:

- :class:`ColourReward` — image-text alignment (CLIP score, HPS, PickScore),
- :class:`MotionReward` — video-text / action alignment (ViCLIP, action classifiers),
- :class:`VividReward` — an aesthetic predictor (LAION aesthetic),
- :class:`TemporalConsistencyReward` — V-JEPA's feature-prediction temporal consistency.

All pixel maths is smooth and guarded so that gradients stay finite on blank (grey or
black) videos, where there is no object and no hue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lifecycle.data.synthetic import COLOURS
from lifecycle.data.oracle import CHROMA_THRESHOLD, chroma, colour_hues, parse_prompt
from lifecycle.rewards.base import Reward, check_videos

# Chroma-weighted share of the pixels (of a video or a frame) at which an object counts as
# half present: rewards fade to 0 on blank videos instead of dividing by zero.
MASS_EPS = 1e-4
# Chroma below which a pixel's hue direction fades to undecided (keeps d(hue)/d(rgb) bounded).
HUE_EPS = 0.02
_EPS = 1e-8
# Unit travel per direction word in image coordinates (x right, y down).
UNIT_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
LUMA = (0.299, 0.587, 0.114)  # Rec. 601


def object_mask(c: torch.Tensor, temperature: float) -> torch.Tensor:
    """sigmoid((c - CHROMA_THRESHOLD) / temperature): soft "is object" of a chroma map."""
    return torch.sigmoid((c - CHROMA_THRESHOLD) / temperature)


def soft_object_weight(videos: torch.Tensor, temperature: float) -> torch.Tensor:
    """chroma · :func:`object_mask`, (B, F, H, W).

    Tends to ``oracle.object_weight`` as ``temperature`` -> 0; exactly 0 on neutral pixels.
    """
    c = chroma(videos)
    return c * object_mask(c, temperature)


def hue_vector(videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r - (g + b) / 2, sqrt(3) / 2 · (g - b)) per pixel, two (B, F, H, W) tensors.

    Its angle is ``oracle.hue`` and its length equals the chroma at the six palette colours;
    linear in the pixels, so it has gradients where the angle (atan2) has none.
    """
    r, g, b = videos.unbind(dim=2)
    return r - (g + b) / 2, math.sqrt(3) / 2 * (g - b)


def hue_match(videos: torch.Tensor, target: torch.Tensor, concentration: float) -> torch.Tensor:
    """Von Mises kernel exp(κ (cos Δ - 1)) between each pixel's hue and ``target`` (B,) radians.

    cos Δ = <v, u> / sqrt(|v|² + HUE_EPS²) with v the :func:`hue_vector` and u the unit vector
    of the target hue, so near-grey pixels have cos Δ ≈ 0. Returns (B, F, H, W) in (0, 1].
    """
    a, b = hue_vector(videos)
    u_a, u_b = (f(target).to(a)[:, None, None, None] for f in (torch.cos, torch.sin))
    cos = (a * u_a + b * u_b) / (a.square() + b.square() + HUE_EPS**2).sqrt()
    return torch.exp(concentration * (cos - 1))


def soft_share(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean(weight · values) / (mean(weight) + MASS_EPS) over all but the batch dim, (B,)."""
    return (weight * values).flatten(1).mean(dim=1) / (weight.flatten(1).mean(dim=1) + MASS_EPS)


def soft_centroids(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted centre per frame as (x, y) frame fractions (B, F, 2), and mass (B, F).

    mass = mean(weight) over the frame; centre = (mean(weight · xy) + MASS_EPS · 0.5) /
    (mass + MASS_EPS), i.e. a frame without an object sits at the frame centre.
    """
    height, width = weight.shape[-2:]
    ys = (torch.arange(height, device=weight.device, dtype=weight.dtype) + 0.5) / height
    xs = (torch.arange(width, device=weight.device, dtype=weight.dtype) + 0.5) / width
    mass = weight.mean(dim=(-2, -1))
    x = (weight.mean(dim=-2) * xs).sum(dim=-1) / width
    y = (weight.mean(dim=-1) * ys).sum(dim=-1) / height
    centre = (torch.stack([x, y], dim=-1) + MASS_EPS * 0.5) / (mass + MASS_EPS)[..., None]
    return centre, mass


def weighted_slope(t: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares slope of ``y`` (B, F, D) against ``t`` (F,), weights (B, F) -> (B, D)."""
    total = weight.sum(dim=1, keepdim=True) + _EPS
    t_centred = t - (weight * t).sum(dim=1, keepdim=True) / total
    y_mean = (weight[..., None] * y).sum(dim=1, keepdim=True) / total[..., None]
    covariance = (weight[..., None] * t_centred[..., None] * (y - y_mean)).sum(dim=1)
    variance = (weight * t_centred**2).sum(dim=1, keepdim=True)
    return covariance / (variance + _EPS)


def soft_displacement(videos: torch.Tensor, temperature: float) -> torch.Tensor:
    """Fitted (dx, dy) travel over the clip in frame fractions, (B, 2); soft ``oracle.displacement``.

    Slope of the :func:`soft_centroids` against time in [0, 1], each frame weighted by its
    presence mass / (mass + MASS_EPS), so frames without the object drop out of the fit.
    """
    centre, mass = soft_centroids(soft_object_weight(videos, temperature))
    t = torch.linspace(0.0, 1.0, centre.shape[1], device=centre.device, dtype=centre.dtype)
    return weighted_slope(t, centre, mass / (mass + MASS_EPS))


def _prompt_words(prompts: Sequence[str], key: str) -> list[str]:
    """The ``key`` ("colour" or "direction") word of each prompt; ValueError naming any without."""
    words = [parse_prompt(p)[key] for p in prompts]
    missing = [p for p, w in zip(prompts, words) if w is None]
    if missing:
        raise ValueError(f"prompts without a {key} word: {missing[:3]}")
    return words


class ColourReward(Reward):
    """Soft share of the object pixels that have the prompt's colour, in [0, 1].

    Stand-in for an image-text alignment reward (CLIP score, HPS). With w the
    :func:`soft_object_weight` and m the :func:`hue_match` to the prompt's colour,
    reward = mean(w · m) / (mean(w) + MASS_EPS): about 1 for a clean clip of the right colour,
    exp(-2κ) for the opposite hue, and 0 without any coloured pixel.
    """

    differentiable = True

    def __init__(self, chroma_temperature: float = 0.05, hue_concentration: float = 4.0):
        super().__init__()
        self.chroma_temperature = chroma_temperature
        self.hue_concentration = hue_concentration
        self.hues = dict(zip(COLOURS, colour_hues().tolist()))

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        videos = check_videos(videos, prompts)
        colours = _prompt_words(prompts, "colour")
        target = torch.tensor([self.hues[c] for c in colours], device=videos.device, dtype=videos.dtype)
        weight = soft_object_weight(videos, self.chroma_temperature)
        return soft_share(hue_match(videos, target, self.hue_concentration), weight)


class MotionReward(Reward):
    """tanh(d / displacement_scale), d the object's travel along the prompt's direction.

    Stand-in for a video-text or action-recognition reward. d is the component of
    :func:`soft_displacement` (frame fractions over the whole clip) along the direction word
    (left = -x, up = -y), so the reward is in (-1, 1): positive for the right direction,
    negative for the opposite one, 0 for a static or blank clip. The squashing caps the pull
    towards ever faster motion (the synthetic world travels 0.3 or 0.6 of the frame).
    """

    differentiable = True

    def __init__(self, chroma_temperature: float = 0.05, displacement_scale: float = 0.3):
        super().__init__()
        self.chroma_temperature = chroma_temperature
        self.displacement_scale = displacement_scale

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        videos = check_videos(videos, prompts)
        directions = _prompt_words(prompts, "direction")
        unit = torch.tensor([UNIT_DIRECTIONS[d] for d in directions], device=videos.device, dtype=videos.dtype)
        along = (soft_displacement(videos, self.chroma_temperature) * unit).sum(dim=1)
        return torch.tanh(along / self.displacement_scale)


class VividReward(Reward):
    """Vividness in [0, 1]: object-weighted mean of ½ (chroma + |luma - background luma|).

    A weight-free stand-in for an aesthetic predictor; the prompt is ignored. It prefers
    saturated objects that stand out from their background. Weights are the
    :func:`soft_object_weight` (normalised as in :func:`soft_share`, so a blank video scores
    0); the background luma is the mean luma weighted by 1 - :func:`object_mask`; luma uses
    Rec. 601 weights.
    """

    differentiable = True

    def __init__(self, chroma_temperature: float = 0.05):
        super().__init__()
        self.chroma_temperature = chroma_temperature

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        videos = check_videos(videos, prompts)
        c = chroma(videos)
        mask = object_mask(c, self.chroma_temperature)
        luma = (videos * videos.new_tensor(LUMA)[:, None, None]).sum(dim=2)
        background = 1 - mask
        background_luma = (background * luma).flatten(1).sum(1) / (background.flatten(1).sum(1) + _EPS)
        contrast = (luma - background_luma[:, None, None, None]).abs()
        return soft_share((c + contrast) / 2, c * mask)


class TemporalConsistencyReward(Reward):
    """−mean |x_t − x̂_t|: how well each frame is predicted from the frames before it, ≤ 0.

    Stands in for V-JEPA (``rewards.vjepa``), which predicts masked video features from the
    visible ones, with pixels in place of features: frames are average-pooled by ``pool``
    (so sub-pool jitter is forgiven), frame 1 is predicted by frame 0 and frame t ≥ 2 by linear
    extrapolation 2·x_{t−1} − x_{t−2}; the error is L1 (V-JEPA's loss), averaged over the
    predicted frames. Static clips and pixel-wise constant-velocity changes score 0. The prompt
    is ignored.
    """

    differentiable = True

    def __init__(self, pool: int = 2):
        super().__init__()
        self.pool = pool

    def forward(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        videos = check_videos(videos, prompts)
        b, f = videos.shape[:2]
        if f < 2:
            raise ValueError(f"temporal consistency needs at least 2 frames, got {f}")
        x = F.avg_pool2d(videos.flatten(0, 1), self.pool).unflatten(0, (b, f))
        predicted = torch.cat([x[:, :1], 2 * x[:, 1:-1] - x[:, :-2]], dim=1)
        return -(x[:, 1:] - predicted).abs().flatten(1).mean(dim=1)
